"""The benchmark datasets: one declaration each, `register(DatasetSpec(...))` at the end of this module.

A declaration is everything the code knows about a dataset (names, domain, layout, classes, metrics, the
paper's Table 3 counts, the release's image counts, source, real image size, how the synthetic demo draws
it), so that adding a dataset is one declaration here plus its params.yaml entries. Class descriptions are
the "{}" of the text prompts (DATASETS.md of the project brief).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping

from moeclip.config import Domain
from moeclip.errors import MoeclipError

# The generators of moeclip/data/synthetic.py, one per family of layouts.
DemoGenerator = Literal["mvtec", "visa", "class_folders", "scans", "endoscopy"]


class DataError(MoeclipError):
    """An expected data problem (missing download, bad archive, bad image): reported without traceback."""


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from.

    `url` is an http(s) URL or `gdrive:<file id>`; `manual` marks data behind a
    registration page, for which `instructions` tell the user where to get it.
    """

    url: str | None = None
    sha256: str | None = None
    manual: bool = False
    instructions: str = ""


def _freeze(instance: object, name: str) -> None:
    """Replace a mapping field by a read-only copy, so that a frozen declaration is immutable all the way down."""
    object.__setattr__(instance, name, MappingProxyType(dict(getattr(instance, name))))


@dataclass(frozen=True)
class DemoPlan:
    """How the synthetic demo draws a dataset in its real layout (moeclip/data/synthetic.py).

    `generator` names the family of layouts; `scenes` gives each class folder its look (mvtec, visa,
    class_folders); `normal`, `anomalous` and `mask` are the paths the class_folders, scans and endoscopy
    generators write ({c}: class folder, {i}: index; no mask: labels only). Each image's random stream is
    keyed by the dataset's name and its place in the plan, so its bytes do not depend on other declarations.
    """

    generator: DemoGenerator
    scenes: Mapping[str, str] = field(default_factory=dict, hash=False)  # class folder -> synthetic.SCENES key
    normal: str = ""
    anomalous: str = ""
    mask: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "scenes")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's declaration: everything the data layer, the demo and the report know about it."""

    name: str
    display_name: str
    table_name: str  # as the paper's tables (and so the report's) print it
    domain: Domain
    layout: str  # a parser of moeclip/data/layouts.py (several datasets may share one)
    classes: Mapping[str, str] = field(hash=False)  # class -> prompt description
    pixel_metrics: bool
    image_metrics: bool
    expected_normal: int  # test images, paper Table 3 (prepare compares the manifest with them)
    expected_anomalous: int
    # What a run reads, for the cost model (moeclip/bench/schedule.py): the number of images in the published
    # release's test split, which an evaluation on the dataset scores; the same as Table 3's total except
    # where count_note says the release differs.
    test_images: int
    # Images one training epoch on the dataset reads. The zero-shot protocol (SPEC.md section 7) trains on
    # the auxiliary dataset's test split (the manifests hold only that split), so this equals test_images
    # for every declared dataset; it is a field of its own so that a dataset trained on another split can
    # say so. A training on it also calibrates on the same images (moeclip/calibration.py).
    train_images: int
    source: Source
    # (width, height) of a typical real image, roughly: large and small, square and not. The smoke run
    # stretches its synthetic images to it, so loaders, resizing and masks meet what the real files do.
    real_size: tuple[int, int]
    demo: DemoPlan
    count_note: str = ""

    def __post_init__(self) -> None:
        _freeze(self, "classes")
        if self.test_images < 1 or self.train_images < 1:
            raise ValueError(f"dataset {self.name!r}: test_images and train_images must be at least 1")
        if self.test_images != self.expected_normal + self.expected_anomalous and not self.count_note:
            raise ValueError(f"dataset {self.name!r}: test_images ({self.test_images}) differs from Table 3's "
                             f"{self.expected_normal} + {self.expected_anomalous} without a count_note saying why")

    def description(self, class_name: str) -> str | None:
        """The prompt description of `class_name`, or None for an unknown class."""
        return self.classes.get(class_name)


_DATASETS: dict[str, DatasetSpec] = {}
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(_DATASETS)  # read-only, in declaration order


def register(spec: DatasetSpec) -> DatasetSpec:
    """Declare a dataset; its name must be new (a second declaration would silently shadow the first)."""
    if spec.name in _DATASETS:
        raise ValueError(f"dataset {spec.name!r} is declared twice")
    _DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """Look up a registry entry; the error lists the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


_MVTEC_CLASSES = {
    "bottle": "dark bottle",
    "cable": "top view of three cables",
    "capsule": "black and orange capsule",
    "carpet": "gray carpet",
    "grid": "metal or plastic mesh",
    "hazelnut": "single brown hazelnut",
    "leather": "brown leather",
    "metal_nut": "metal nut which has four notched edges",
    "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
    "screw": "screw",
    "tile": "speckled tile surface",
    "transistor": "a three-legged transistor placed vertically",
    "toothbrush": "toothbrush head",
    "wood": "wood surface",
    "zipper": "a black zipper",
}

_VISA_CLASSES = {
    "candle": "candle",
    "capsules": "capsules",
    "cashew": "cashew nut",
    "chewinggum": "chewing gum",
    "fryum": "wheel-shaped fryum snack",
    "macaroni1": "orange macaroni",
    "macaroni2": "scattered yellow macaroni",
    "pcb1": "dual ultrasonic distance sensor pcb module",
    "pcb2": "integrated circuits board",
    "pcb3": "infrared sensor pcb module",
    "pcb4": "battery charging pcb module",
    "pipe_fryum": "pipe-shaped fryum",
}

_DTD_FOLDERS = (
    "Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037",
    "Stratified_154", "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127",
)


def texture_name(folder: str) -> str:
    """DTD-Synthetic folder `Woven_001` -> texture name `Woven` (the prompt description)."""
    head, _, tail = folder.rpartition("_")
    return head if head and tail.isdigit() else folder


def _manual(where: str) -> Source:
    return Source(manual=True, instructions=where)


_COLON = "colon endoscopy image"
_PRANET = _manual(
    "the polyp-segmentation test sets released with PraNet (github.com/DengPingFan/PraNet, "
    "'TestDataset' on Google Drive); use the dataset's folder containing images/ and masks/"
)
_BMAD = "the BMAD benchmark release (github.com/DorisBao/BMAD, Google Drive links in its README)"

_BMAD_DEMO = DemoPlan("scans", normal="test/good/img/{i:03d}.png", anomalous="test/Ungood/img/{i:03d}.png",
                      mask="test/Ungood/label/{i:03d}.png")
_COLON_DEMO = DemoPlan("endoscopy", anomalous="images/{i:03d}.png", mask="masks/{i:03d}.png")


def _same_names(*classes: str) -> dict[str, str]:
    """Demo scenes named like the classes they show."""
    return {name: name for name in classes}


register(DatasetSpec(
    name="mvtec", display_name="MVTec-AD", table_name="MVTec-AD", domain="industrial", layout="mvtec",
    classes=_MVTEC_CLASSES, pixel_metrics=True, image_metrics=True, expected_normal=467, expected_anomalous=1258,
    test_images=1725, train_images=1725,
    source=_manual("https://www.mvtec.com/company/research/datasets/mvtec-ad (free registration); "
                   "file mvtec_anomaly_detection.tar.xz"),
    real_size=(1024, 1024),
    demo=DemoPlan("mvtec", _same_names("metal_nut", "bottle", "hazelnut", "carpet", "grid", "wood", "tile")),
))
register(DatasetSpec(
    name="visa", display_name="VisA", table_name="VisA", domain="industrial", layout="visa",
    classes=_VISA_CLASSES, pixel_metrics=True, image_metrics=True, expected_normal=962, expected_anomalous=1200,
    test_images=2162, train_images=2162,
    source=Source(url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
                  instructions="https://github.com/amazon-science/spot-diff (VisA_20220922.tar)"),
    real_size=(1500, 1000),
    demo=DemoPlan("visa", _same_names("candle", "capsules", "cashew", "chewinggum", "pcb1", "macaroni1", "fryum")),
))
register(DatasetSpec(
    name="btad", display_name="BTAD", table_name="BTAD", domain="industrial", layout="btad",
    classes={c: "product" for c in ("01", "02", "03")}, pixel_metrics=True, image_metrics=True,
    expected_normal=451, expected_anomalous=290,
    test_images=741, train_images=741,
    source=_manual("http://avires.dimi.uniud.it/papers/btad/btad.zip (BeanTech Anomaly Detection)"),
    real_size=(1600, 1600),
    demo=DemoPlan("class_folders", {"01": "carpet", "02": "wood", "03": "tile"}, "{c}/test/ok/{i:04d}.bmp",
                  "{c}/test/ko/{i:04d}.bmp", "{c}/ground_truth/ko/{i:04d}.png"),
))
register(DatasetSpec(
    name="rsdd", display_name="RSDD", table_name="RSDD", domain="industrial", layout="rsdd",
    classes={"metal": "metal"}, pixel_metrics=True, image_metrics=True, expected_normal=387, expected_anomalous=387,
    test_images=774, train_images=774,
    source=_manual("the MVTec-style RSDD release used by zero-shot AD work (folder Metal15/)"),
    real_size=(160, 1000),
    demo=DemoPlan("class_folders", {"Metal15": "grid"}, "{c}/test/good/{i}.bmp", "{c}/test/anomaly/{i}.bmp",
                  "{c}/ground_truth/anomaly/{i}.png"),
))
register(DatasetSpec(
    name="dtd", display_name="DTD-Synthetic", table_name="DTD-Synthetic", domain="industrial", layout="dtd",
    classes={f: texture_name(f) for f in _DTD_FOLDERS}, pixel_metrics=True, image_metrics=True,
    expected_normal=375, expected_anomalous=947,
    test_images=1304, train_images=1304,  # 357 normal + 947 anomalous (count_note)
    source=_manual("the DTD-Synthetic release (Aota et al., WACV 2023), one folder per texture such as Woven_001/"),
    real_size=(1024, 1024),
    demo=DemoPlan("class_folders", {"Woven_001": "carpet", "Blotchy_099": "tile", "Marbled_078": "wood"},
                  "{c}/test/good/{i:03d}.png", "{c}/test/bad/{i:03d}.png", "{c}/ground_truth/bad/{i:03d}_mask.png"),
    count_note="the release metadata lists 357 normal images",
))
register(DatasetSpec(
    name="brainmri", display_name="Brain MRI (BMAD)", table_name="Brain MRI", domain="medical", layout="bmad",
    classes={"brain": "scan"}, pixel_metrics=True, image_metrics=True, expected_normal=640, expected_anomalous=1013,
    test_images=3715, train_images=3715,  # 640 normal + 3,075 anomalous (count_note)
    source=_manual(f"{_BMAD}: the Brain MRI (BraTS2021) set"),
    real_size=(240, 240), demo=_BMAD_DEMO,
    count_note="the release metadata lists 3,075 anomalous images",
))
register(DatasetSpec(
    name="headct", display_name="Head CT", table_name="Head CT", domain="medical", layout="headct",
    classes={"head": "scan"}, pixel_metrics=False, image_metrics=True, expected_normal=100, expected_anomalous=100,
    test_images=200, train_images=200,
    source=_manual("the MVTec-style Head CT release (Kaggle 'head-ct-hemorrhage', split into "
                   "test/good and test/defect)"),
    real_size=(256, 256),
    demo=DemoPlan("scans", normal="test/good/{i:03d}.png", anomalous="test/defect/{i:03d}.png"),
))
register(DatasetSpec(
    name="liverct", display_name="Liver CT (BMAD)", table_name="Liver CT", domain="medical", layout="bmad",
    classes={"liver": "scan"}, pixel_metrics=True, image_metrics=True, expected_normal=833, expected_anomalous=660,
    test_images=1493, train_images=1493,
    source=_manual(f"{_BMAD}: the Liver CT (BTCV + LiTS) set"),
    real_size=(512, 512), demo=_BMAD_DEMO,
))
register(DatasetSpec(
    name="retinaoct", display_name="Retina OCT (BMAD)", table_name="Retina OCT", domain="medical", layout="bmad",
    classes={"retina": "scan"}, pixel_metrics=True, image_metrics=True, expected_normal=1041, expected_anomalous=764,
    test_images=1805, train_images=1805,
    source=_manual(f"{_BMAD}: the Retinal OCT (RESC) set"),
    real_size=(512, 496), demo=_BMAD_DEMO,
))
register(DatasetSpec(
    name="colondb", display_name="CVC-ColonDB", table_name="ColonDB", domain="medical", layout="colon",
    classes={"colon": _COLON}, pixel_metrics=True, image_metrics=False, expected_normal=0, expected_anomalous=380,
    test_images=380, train_images=380,
    source=_PRANET, real_size=(574, 500), demo=_COLON_DEMO,
))
register(DatasetSpec(
    name="clinicdb", display_name="CVC-ClinicDB", table_name="ClinicDB", domain="medical", layout="colon",
    classes={"colon": _COLON}, pixel_metrics=True, image_metrics=False, expected_normal=0, expected_anomalous=612,
    test_images=612, train_images=612,
    source=_PRANET, real_size=(384, 288), demo=_COLON_DEMO,
))
register(DatasetSpec(
    name="cvc300", display_name="CVC-300", table_name="CVC-300", domain="medical", layout="colon",
    classes={"colon": _COLON}, pixel_metrics=True, image_metrics=False, expected_normal=0, expected_anomalous=60,
    test_images=60, train_images=60,
    source=_PRANET, real_size=(574, 500), demo=_COLON_DEMO,
))
register(DatasetSpec(
    name="endo", display_name="Endo (EndoTect)", table_name="Endo", domain="medical", layout="endo",
    classes={"polyp": "polyp"}, pixel_metrics=True, image_metrics=False, expected_normal=0, expected_anomalous=200,
    test_images=200, train_images=200,
    source=_manual("the EndoTect 2020 segmentation test set (https://endotect.com), folder "
                   "'test dataset' with images/ and masks/"),
    real_size=(1280, 1024),
    demo=DemoPlan("endoscopy", anomalous="test dataset/images/{i:03d}.jpg", mask="test dataset/masks/{i:03d}.jpg"),
))
register(DatasetSpec(
    name="kvasir", display_name="Kvasir-SEG", table_name="Kvasir", domain="medical", layout="colon",
    classes={"colon": _COLON}, pixel_metrics=True, image_metrics=False, expected_normal=0, expected_anomalous=1000,
    test_images=1000, train_images=1000,
    source=Source(url="https://datasets.simula.no/downloads/kvasir-seg.zip",
                  instructions="https://datasets.simula.no/kvasir-seg/ (kvasir-seg.zip)"),
    real_size=(622, 529), demo=_COLON_DEMO,
))
