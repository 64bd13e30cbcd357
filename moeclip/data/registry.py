"""Declarative registry of the 14 benchmark datasets.

One frozen `DatasetSpec` per dataset; adding a dataset means adding one entry
to `_SPECS`. Counts are the test-set counts of the paper's Table 3; class
descriptions are the "{}" of the text prompts (see DATASETS.md of the project brief).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from moeclip.config import Domain
from moeclip.errors import MoeclipError


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


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the data layer needs to know about one benchmark dataset."""

    name: str
    display_name: str
    domain: Domain
    layout: str
    classes: Mapping[str, str] = field(hash=False)
    pixel_metrics: bool
    image_metrics: bool
    expected_normal: int
    expected_anomalous: int
    source: Source
    count_note: str = ""

    def __post_init__(self) -> None:
        # A read-only view keeps the frozen spec immutable all the way down.
        object.__setattr__(self, "classes", MappingProxyType(dict(self.classes)))

    def description(self, class_name: str) -> str | None:
        """The prompt description of `class_name`, or None for an unknown class."""
        return self.classes.get(class_name)


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

_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "mvtec", "MVTec-AD", "industrial", "mvtec", _MVTEC_CLASSES, True, True, 467, 1258,
        _manual("https://www.mvtec.com/company/research/datasets/mvtec-ad (free registration); "
                "file mvtec_anomaly_detection.tar.xz"),
    ),
    DatasetSpec(
        "visa", "VisA", "industrial", "visa", _VISA_CLASSES, True, True, 962, 1200,
        Source(url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
               instructions="https://github.com/amazon-science/spot-diff (VisA_20220922.tar)"),
    ),
    DatasetSpec(
        "btad", "BTAD", "industrial", "btad", {c: "product" for c in ("01", "02", "03")},
        True, True, 451, 290,
        _manual("http://avires.dimi.uniud.it/papers/btad/btad.zip (BeanTech Anomaly Detection)"),
    ),
    DatasetSpec(
        "rsdd", "RSDD", "industrial", "rsdd", {"metal": "metal"}, True, True, 387, 387,
        _manual("the MVTec-style RSDD release used by zero-shot AD work (folder Metal15/)"),
    ),
    DatasetSpec(
        "dtd", "DTD-Synthetic", "industrial", "dtd", {f: texture_name(f) for f in _DTD_FOLDERS},
        True, True, 375, 947,
        _manual("the DTD-Synthetic release (Aota et al., WACV 2023), one folder per texture "
                "such as Woven_001/"),
        count_note="the release metadata lists 357 normal images",
    ),
    DatasetSpec(
        "brainmri", "Brain MRI (BMAD)", "medical", "bmad", {"brain": "scan"}, True, True, 640, 1013,
        _manual(f"{_BMAD}: the Brain MRI (BraTS2021) set"),
        count_note="the release metadata lists 3,075 anomalous images",
    ),
    DatasetSpec(
        "headct", "Head CT", "medical", "headct", {"head": "scan"}, False, True, 100, 100,
        _manual("the MVTec-style Head CT release (Kaggle 'head-ct-hemorrhage', split into "
                "test/good and test/defect)"),
    ),
    DatasetSpec(
        "liverct", "Liver CT (BMAD)", "medical", "bmad", {"liver": "scan"}, True, True, 833, 660,
        _manual(f"{_BMAD}: the Liver CT (BTCV + LiTS) set"),
    ),
    DatasetSpec(
        "retinaoct", "Retina OCT (BMAD)", "medical", "bmad", {"retina": "scan"}, True, True, 1041, 764,
        _manual(f"{_BMAD}: the Retinal OCT (RESC) set"),
    ),
    DatasetSpec(
        "colondb", "CVC-ColonDB", "medical", "colon", {"colon": _COLON}, True, False, 0, 380, _PRANET,
    ),
    DatasetSpec(
        "clinicdb", "CVC-ClinicDB", "medical", "colon", {"colon": _COLON}, True, False, 0, 612, _PRANET,
    ),
    DatasetSpec(
        "cvc300", "CVC-300", "medical", "colon", {"colon": _COLON}, True, False, 0, 60, _PRANET,
    ),
    DatasetSpec(
        "endo", "Endo (EndoTect)", "medical", "endo", {"polyp": "polyp"}, True, False, 0, 200,
        _manual("the EndoTect 2020 segmentation test set (https://endotect.com), folder "
                "'test dataset' with images/ and masks/"),
    ),
    DatasetSpec(
        "kvasir", "Kvasir-SEG", "medical", "colon", {"colon": _COLON}, True, False, 0, 1000,
        Source(url="https://datasets.simula.no/downloads/kvasir-seg.zip",
               instructions="https://datasets.simula.no/kvasir-seg/ (kvasir-seg.zip)"),
    ),
)

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def get_dataset(name: str) -> DatasetSpec:
    """Look up a registry entry; the error lists the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None
