"""Preprocessing, augmentation and the manifest Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moeclip.data.dataset import ManifestDataset, loader_options, seed_worker
from moeclip.data.synthetic import generate_demo_datasets
from moeclip.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    ImageReadError,
    augment,
    image_to_tensor,
    mask_to_tensor,
    normalize,
    read_image,
    read_mask,
)

SIZE = 32
NO_JITTER = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0)


def _save(array: np.ndarray, path: Path, **kwargs: object) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _marker_pair(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A white off-centre square on black, and the same square as a mask."""
    mask = torch.zeros(1, size, size)
    mask[:, 8:16, 10:18] = 1.0
    return mask.expand(3, -1, -1).clone(), mask


def _frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    defaults = {
        "class_name": "candle",
        "description": "candle",
        "dataset": "visa",
        "domain": "industrial",
        "split": "test",
        "width": 48,
        "height": 48,
    }
    return pd.DataFrame([{**defaults, **row} for row in rows])


def test_normalisation_of_a_constant_image(tmp_path: Path) -> None:
    colour = (200, 100, 30)
    path = _save(np.full((7, 5, 3), colour, np.uint8), tmp_path / "c.png")
    image = normalize(image_to_tensor(read_image(path), SIZE))
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert torch.allclose(image, expected[:, None, None].expand_as(image), atol=1e-5)


def test_sixteen_bit_is_scaled_by_its_own_maximum(tmp_path: Path) -> None:
    values = np.array([[0, 500], [1000, 1000]], np.uint16)
    rgb = np.asarray(read_image(_save(values, tmp_path / "deep.png")))
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == [[0, 128], [255, 255]] and (rgb == rgb[..., :1]).all()


def test_grayscale_rgba_and_palette_conversions(tmp_path: Path) -> None:
    gray = np.asarray(read_image(_save(np.full((3, 3), 77, np.uint8), tmp_path / "g.png")))
    assert gray.shape == (3, 3, 3) and (gray == 77).all()
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (0, 255, 0, 0)
    assert np.asarray(read_image(_save(rgba, tmp_path / "a.png"))).tolist() == [[[255, 0, 0], [0, 0, 0]]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 255, 9, 9, 9])
    palette.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(read_image(tmp_path / "p.png")).tolist() == [[[0, 0, 255], [0, 0, 0]]]


def test_masks_png_nonzero_and_jpeg_threshold(tmp_path: Path) -> None:
    png = np.zeros((16, 16), np.uint8)
    png[:, 8:] = 1
    assert read_mask(_save(png, tmp_path / "m.png"), 8)[0].tolist() == [[0.0] * 4 + [1.0] * 4] * 8
    jpeg = np.zeros((32, 32), np.uint8)
    jpeg[:, 8:16], jpeg[:, 16:24], jpeg[:, 24:] = 40, 100, 220
    mask = read_mask(_save(jpeg, tmp_path / "m.jpg", quality=60), 32)
    assert mask[0, :, 2:6].sum() == 0 and mask[0, :, 10:14].sum() == 0 and mask[0, :, 18:22].sum() == 0
    assert mask[0, :, 26:30].all()


def test_mask_resize_stays_binary() -> None:
    mask = np.random.default_rng(0).random((37, 53)) > 0.7
    resized = mask_to_tensor(mask, 24)
    assert resized.shape == (1, 24, 24) and set(resized.unique().tolist()) <= {0.0, 1.0}


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        read_image(bad)
    with pytest.raises(ImageReadError, match=r"missing\.png"):
        read_mask(tmp_path / "missing.png", SIZE)


def test_augmentation_moves_image_and_mask_together() -> None:
    image, mask = _marker_pair()
    generator = torch.Generator().manual_seed(0)
    moved = 0
    for _ in range(60):
        new_image, new_mask = augment(image, mask, generator, NO_JITTER)
        assert set(new_mask.unique().tolist()) <= {0.0, 1.0}
        marker = new_image.mean(0) > 0.5
        region = new_mask[0] > 0.5
        union = (marker | region).sum()
        assert union == 0 or (marker & region).sum() / union > 0.7
        moved += not torch.equal(new_mask, mask)
    assert moved > 30


def test_colour_jitter_never_touches_the_mask() -> None:
    image, mask = _marker_pair()
    image = image * 0.5 + 0.2
    jittered = 0
    for seed in range(30):
        full = augment(image, mask, torch.Generator().manual_seed(seed))
        geometry_only = augment(image, mask, torch.Generator().manual_seed(seed), NO_JITTER)
        assert torch.equal(full[1], geometry_only[1])
        jittered += not torch.allclose(full[0], geometry_only[0])
    assert 5 < jittered < 25


def test_augmentation_is_repeatable_with_a_seed() -> None:
    image, mask = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)), _marker_pair()[1]

    def run(seed: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return [t for _ in range(8) for t in augment(image, mask, generator)]

    assert all(torch.equal(a, b) for a, b in zip(run(3), run(3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(run(3), run(4), strict=True))
    torch.manual_seed(7)
    first = augment(image, mask)
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(first, augment(image, mask), strict=True))


@pytest.fixture(scope="module")
def visa_frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Test rows of the demo VisA-style set, plus one anomalous image whose mask is unknown."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_datasets(root, image_size=48, per_class=2)
    data = root / "visa" / "candle" / "Data"
    rows: list[dict[str, object]] = [
        {"image_path": str(p), "mask_path": str(data / "Masks" / "Anomaly" / f"{p.stem}.png"), "label": 1}
        for p in sorted((data / "Images" / "Anomaly").glob("*.JPG"))
    ]
    normals = sorted((data / "Images" / "Normal").glob("*"))
    rows += [{"image_path": str(p), "mask_path": None, "label": 0} for p in normals]
    rows.append({"image_path": rows[0]["image_path"], "mask_path": float("nan"), "label": 1})
    return _frame(rows)


def test_dataset_items(visa_frame: pd.DataFrame) -> None:
    dataset = ManifestDataset(visa_frame, SIZE)
    assert len(dataset) == len(visa_frame)
    anomalous, normal, unknown = dataset[0], dataset[2], dataset[len(dataset) - 1]
    for item in (anomalous, normal, unknown):
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert item["label"].dtype == torch.long
        assert (item["class_name"], item["dataset"], item["domain"]) == ("candle", "visa", "industrial")
    assert anomalous["label"] == 1 and anomalous["has_mask"] and anomalous["mask"].sum() > 0
    assert set(anomalous["mask"].unique().tolist()) == {0.0, 1.0}
    assert normal["label"] == 0 and normal["has_mask"] and normal["mask"].sum() == 0
    assert unknown["label"] == 1 and not unknown["has_mask"] and unknown["mask"].sum() == 0
    assert torch.equal(anomalous["image"], unknown["image"]) and anomalous["path"] == unknown["path"]


def test_dataset_rejects_a_frame_without_the_manifest_columns() -> None:
    with pytest.raises(ValueError, match="mask_path"):
        ManifestDataset(pd.DataFrame({"image_path": ["x.png"]}), SIZE)


def test_dataloader_with_two_workers_is_repeatable(visa_frame: pd.DataFrame) -> None:
    dataset = ManifestDataset(visa_frame, SIZE, train=True, generator=torch.Generator().manual_seed(0))

    def epoch() -> list[dict[str, object]]:
        loader = DataLoader(
            dataset,
            batch_size=3,
            num_workers=2,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(11),
        )
        return list(loader)

    first, second = epoch(), epoch()
    assert sum(len(b["path"]) for b in first) == len(dataset)
    assert first[0]["image"].shape == (3, 3, SIZE, SIZE) and first[0]["mask"].shape == (3, 1, SIZE, SIZE)
    assert first[0]["has_mask"].dtype == torch.bool and first[0]["label"].dtype == torch.long
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_seed_worker_gives_each_worker_its_own_stream(visa_frame: pd.DataFrame) -> None:
    same_image = _frame([visa_frame.iloc[0].to_dict()] * 8)
    dataset = ManifestDataset(same_image, SIZE, train=True, generator=torch.Generator().manual_seed(0))

    def pairs(worker_init_fn: object) -> list[bool]:
        loader = DataLoader(
            dataset,
            batch_size=1,
            num_workers=2,
            worker_init_fn=worker_init_fn,
            generator=torch.Generator().manual_seed(3),
        )
        images = [batch["image"] for batch in loader]
        return [torch.equal(images[i], images[i + 1]) for i in range(0, len(images), 2)]

    assert all(pairs(None))
    assert not all(pairs(seed_worker))


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index(visa_frame: pd.DataFrame) -> None:
    forward = ManifestDataset(visa_frame, SIZE, train=True, seed=5)
    backward = ManifestDataset(visa_frame, SIZE, train=True, seed=5)
    last = len(forward) - 1
    late = backward[last]["image"]  # drawn first here, last there: order must not matter
    first = [forward[i]["image"] for i in range(len(forward))]
    assert torch.equal(first[last], late)
    assert torch.equal(first[0], backward[0]["image"])
    forward.set_epoch(1)
    assert not torch.equal(forward[0]["image"], first[0])


def test_loader_options_use_workers_and_pinned_memory_only_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert loader_options(torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    assert loader_options(torch.device("cuda")) == {"num_workers": 15, "pin_memory": True, "prefetch_factor": 4}
    assert loader_options(torch.device("cpu"), num_workers=2) == {"num_workers": 2, "pin_memory": False,
                                                                   "prefetch_factor": 4}
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert loader_options(torch.device("cuda"))["num_workers"] == 1
