"""The zero-shot evaluator: which metrics each class gets, and exact values on an oracle model."""
import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from moeclip import build_model
from moeclip.data.dataset import ManifestDataset
from moeclip.methods.scoring import per_class_protocol_scores
from moeclip.evaluation import evaluate_frame, summarize
from tiny_models import tiny_config

SIZE = 16


def _write(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _frame(tmp_path: Path) -> pd.DataFrame:
    """Three classes: with masks and both labels, anomalies only (colon-like), no masks (Head-CT-like)."""
    rows = []
    rng = np.random.default_rng(0)
    specs = [("mvtec", "bottle", "industrial", [0, 0, 1, 1], True),
             ("colondb", "colon", "medical", [1, 1], True),
             ("headct", "head", "medical", [0, 1, 1], False)]
    for dataset, class_name, domain, labels, masks in specs:
        for i, label in enumerate(labels):
            image = _write(tmp_path / dataset / f"{i}.png", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
            mask = None
            if label and masks:
                square = np.zeros((SIZE, SIZE), np.uint8)
                square[2 + i:8 + i, 3:9] = 255
                mask = _write(tmp_path / dataset / f"{i}_mask.png", square)
            rows.append(dict(image_path=image, mask_path=mask, label=label, class_name=class_name,
                             description=class_name, dataset=dataset, domain=domain, split="test",
                             width=SIZE, height=SIZE))
    return pd.DataFrame(rows)


class OracleModel(torch.nn.Module):
    """Predicts the ground-truth mask as the map (plus a small per-image offset) and the label as S_A, and scores
    classes by MoECLIP's protocol rule."""

    def __init__(self, frame: pd.DataFrame) -> None:
        super().__init__()
        self.config = tiny_config(image_size=SIZE)
        self.truth = {}
        for row in frame.itertuples():
            mask = np.zeros((SIZE, SIZE), np.float32) if pd.isna(row.mask_path) else \
                (np.asarray(Image.open(row.mask_path)) > 0).astype(np.float32)
            self.truth[row.image_path] = (mask, float(row.label))
        self.paths: list[str] = []

    def expert_dispatch(self, sparse):  # the hook the evaluator's execution modes call: no experts to switch
        return contextlib.nullcontext()

    def inputs(self, frame, **options):
        return ManifestDataset(frame, SIZE, **options)

    def prompt_texts(self, batch):
        return list(batch["class_name"])

    def protocol_scores(self, maps, scores, domain):
        return per_class_protocol_scores(maps, scores, domain)

    def predict(self, images, descriptions, domain):
        paths, self.paths = self.paths[:len(images)], self.paths[len(images):]
        maps = torch.stack([torch.from_numpy(self.truth[p][0]) for p in paths])
        return maps, torch.tensor([self.truth[p][1] for p in paths])


def test_each_class_gets_exactly_the_metrics_it_can_have(tmp_path):
    frame = _frame(tmp_path)
    oracle = OracleModel(frame)
    # the evaluator walks classes in sorted order, images in manifest order
    oracle.paths = [p for _, g in frame.groupby(["dataset", "class_name"], sort=True) for p in g["image_path"]]
    per_class = evaluate_frame(oracle, frame, batch_size=2).per_class.set_index("dataset")
    assert per_class.loc["mvtec", "image_auroc"] == 1.0 and per_class.loc["mvtec", "pixel_auroc"] == 1.0
    assert per_class.loc["mvtec", "pixel_aupro"] == pytest.approx(1.0)
    assert pd.isna(per_class.loc["colondb", "image_auroc"]) and per_class.loc["colondb", "pixel_ap"] == 1.0
    # medical image score = max(map) alone: S_A is ignored, and maps without masks are blank
    assert pd.isna(per_class.loc["headct", "pixel_auroc"]) and per_class.loc["headct", "image_auroc"] == 0.5
    summary = summarize(per_class.reset_index())
    assert summary.loc["mvtec", "image_auroc"] == 100.0


def test_pixel_auroc_equals_sklearn_on_the_normalised_class_maps(tmp_path):
    frame = _frame(tmp_path)
    model = build_model(tiny_config(image_size=32, moe_layers=(1, 2)), seed=0)  # 4x4 grid fits the blur
    per_class = evaluate_frame(model, frame[frame["dataset"] == "mvtec"], batch_size=3).per_class
    dataset = ManifestDataset(frame[frame["dataset"] == "mvtec"], 32)
    batch = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    masks = torch.stack([dataset[i]["mask"][0] > 0.5 for i in range(len(dataset))])
    with torch.no_grad():
        maps, scores = model.eval().predict(batch, ["bottle"] * len(dataset), "industrial")
    maps, _ = per_class_protocol_scores(maps, scores, "industrial")
    expected = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert per_class.loc[0, "pixel_auroc"] == pytest.approx(expected, abs=1e-9)




def test_a_baseline_is_scored_by_its_own_image_score_without_the_moeclip_fusion(tmp_path):
    """The evaluator asks the method for its per-class rule: WinCLIP's image AUROC is that of S alone."""
    from moeclip.methods.winclip import WinCLIP, WinCLIPConfig

    frame = _frame(tmp_path)
    frame = frame[frame["dataset"] == "mvtec"]
    config = WinCLIPConfig(backbone="MoECLIP-Tiny-ViT", image_size=64, weights=None, quick_gelu=False,
                           precision="fp32", class_text="folder", window_sizes=(2, 3), include_image_scale=True,
                           temperature=0.07)
    model = WinCLIP.build(config, seed=1).eval()  # a seed whose maps' maxima reorder the images
    per_class = evaluate_frame(model, frame, batch_size=3).per_class
    dataset = ManifestDataset(frame, 64)
    batch = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        maps, scores = model.predict(batch, ["bottle"] * len(dataset), "industrial")
    labels = frame["label"].to_numpy()
    assert per_class.loc[0, "image_auroc"] == pytest.approx(roc_auc_score(labels, scores.numpy()), abs=1e-9) == 0.25
    fused = 0.5 * maps.flatten(1).amax(1) + 0.5 * scores  # MoECLIP's rule ranks these images differently
    assert roc_auc_score(labels, fused.numpy()) == 0.0
