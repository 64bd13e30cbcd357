"""Our AA-CLIP (moeclip/methods/aa_clip.py) against the official code, on the same weights and inputs.

The official code (github.com/Mwxinnn/AA-CLIP) is imported at run time from a checkout: its `model.model.CLIP`,
`model.adapter.AdaptedCLIP`, `forward_utils` (text embeddings, similarity maps, losses, metrics_eval) and the
real `train.train_text_adapter` / `train.train_image_adapter` loops and `test.get_predictions`, each run on one
fixed batch. Nothing of it is copied here; the script only supplies what those read:
  - their CLIP is built from ViT-L-14-336's config at our input size and loads OUR random CLIP state dict (their
    pretrained loader needs the OpenAI file); the surgery copy gets their `DAPM_replace(depth - surgery_from + 2)`;
  - their AdaptedCLIP loads OUR adapter and projection weights; the loaders are one-batch lists of their dicts;
  - modules they import but this comparison never runs are stubbed: `ipdb`, `cv2` (visualisation), and `kornia`
    (absent here): `gaussian_blur2d` is replaced by kornia's documented computation written out below (normalised
    Gaussian taps, reflect borders), so the test-map blur is compared with that formula, not with kornia itself;
    `pkg_resources` (gone from recent setuptools) gets `packaging` if missing;
  - their training loops log each epoch's mean loss (read back from the logger) and take one Adam step; the
    optimiser passed in records the gradients before stepping.
Measured (random weights, ViT-L-14-336 at 112 px, batch 2, seed 0): maps 3e-6 (values ~ 1e2), image scores 0,
anchors 6e-8, per-class metrics equal, losses 1e-7 (text) and 0 (image), gradients 2e-7 / 4e-7 (largest 0.13 /
0.24). The weights after one Adam step differ by up to 2e-6 (text, lr 1e-5) and 4e-4 (image, lr 5e-4) only where
|grad| is near Adam's eps 1e-8: its first step lr * g / (|g| + eps) turns the rounding of such g into up to lr;
where |grad| > 1e-5 they agree to fp32 rounding. At 518 px (the paper's 37x37 grid, ~18 min on one core): same
parameter count (441,339,137), maps 3e-6, scores 0, anchors 6e-8, metrics equal, losses 1e-6 / 5e-7, gradients
1e-6 (text, largest 0.45) and 3e-5 (image, largest 0.22: sums over 4 x 2 x 518^2 pixels in another order).
Their model code hard-codes ViT-L-14-336's widths (1024 / 768) and 24 + 12 blocks, so only that backbone runs; a
small input size (default 112 px, an 8x8 grid) keeps it to about a minute on a CPU. --size 518 compares the paper's
37x37 grid. Their train script's threads setting (4) is reset to ours after import.

    python -m benchmarks.compare_aa_clip --official /path/to/AA-CLIP [--size 518]
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import tempfile
import types
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks.official import official_imports
from moeclip.methods.aa_clip import AAClip, AAClipConfig
from moeclip.methods.targets import Targets

OFFICIAL_MODULES = ("model", "forward_utils", "train", "test", "dataset", "utils")
# (their dataset, their class, the text both sides prompt with = their REAL_NAMES entry, our domain)
CASES = (("MVTec", "bottle", "dark bottle", "industrial"), ("Brain", "Brain", "scan", "medical"))


def config(size: int) -> AAClipConfig:
    return AAClipConfig.model_validate({
        "backbone": "ViT-L-14-336", "image_size": size, "weights": None, "quick_gelu": False, "precision": "fp32",
        "class_text": "description", "feature_layers": (6, 12, 18, 24), "image_adapter_layers": 6,
        "text_adapter_layers": 3, "image_adapt_weight": 0.1, "text_adapt_weight": 0.1,
        "projection_activation": False, "logit_scale": 100.0, "surgery_from": 6, "surgery_attention": "batch",
        "text_loss_layers": "last", "text_norm_weight": 0.1, "focal_gamma": 2.0,
        "blur_industrial": {"kernel_size": 7, "sigma": 1.0}, "blur_medical": {"kernel_size": 9, "sigma": 1.5},
        "text_epochs": 1, "text_batch_size": 2, "text_lr": 1e-5})


def gaussian_blur2d(x: torch.Tensor, kernel_size: tuple[int, int], sigma: tuple[float, float]) -> torch.Tensor:
    """kornia.filters.gaussian_blur2d's computation (border_type 'reflect'), for (N, C, H, W)."""
    taps = []
    for size, s in zip(kernel_size, sigma):
        t = torch.arange(size, dtype=x.dtype) - size // 2
        g = torch.exp(-t.pow(2) / (2 * s ** 2))
        taps.append(g / g.sum())
    kernel = (taps[0][:, None] * taps[1][None, :]).expand(x.shape[1], 1, *kernel_size)
    padded = F.pad(x, [kernel_size[1] // 2, kernel_size[1] // 2, kernel_size[0] // 2, kernel_size[0] // 2],
                   mode="reflect")
    return F.conv2d(padded, kernel, groups=x.shape[1])


def official_stubs() -> dict[str, types.ModuleType]:
    """ipdb and cv2 (imported, never run here) and kornia's gaussian_blur2d (above)."""
    kornia = types.ModuleType("kornia")
    kornia.filters = types.SimpleNamespace(gaussian_blur2d=gaussian_blur2d)  # type: ignore[attr-defined]
    return {"ipdb": types.ModuleType("ipdb"), "cv2": types.ModuleType("cv2"), "kornia": kornia,
            "kornia.filters": kornia.filters}


def their_clip(model_module: Any, state: dict[str, torch.Tensor], size: int) -> Any:
    cfg = open_clip.get_model_config("ViT-L-14-336")
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": size}}
    clip = model_module.CLIP(**cfg)
    clip.load_state_dict(state)
    return clip.eval()


def load_our_weights(theirs: Any, ours: AAClip) -> None:
    """Our added modules' values into their AdaptedCLIP (seg_proj / det_proj are plain linears without --relu)."""
    with torch.no_grad():
        for mine, their in zip(ours.image_adapters, theirs.image_adapter["layer_adapters"]):
            their.fc[0].weight.copy_(mine[0].weight)
        for layer, their in zip(ours.config.feature_layers, theirs.image_adapter["seg_proj"]):
            their.fc.weight.copy_(ours.projections[str(layer)].linear.weight)
        theirs.image_adapter["det_proj"].fc.weight.copy_(ours.det_projection["24"].linear.weight)
        for mine, their in zip([*ours.text_adapters, ours.text_head], theirs.text_adapter):
            their.fc[0].weight.copy_(mine[0].weight)


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps a copy of every gradient it steps on."""

    grads: list[torch.Tensor]

    def step(self, closure: Any = None) -> Any:
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None]
        return super().step(closure)


class LossLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("loss: "):
            self.losses.append(float(record.getMessage()[6:]))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def compare(checkout: Path, size: int, seed: int) -> dict[str, float]:
    cfg = config(size)
    ours = AAClip.build(cfg, seed=seed).eval()
    state = ours.clip.state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, size, size, generator=generator)
    masks = torch.zeros(2, size, size)
    masks[1, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    labels = torch.tensor([0, 1])
    result: dict[str, float] = {}
    with official_imports(checkout, OFFICIAL_MODULES, official_stubs()), tempfile.TemporaryDirectory() as workdir:
        model_module = importlib.import_module("model.model")
        adapter = importlib.import_module("model.adapter")
        forward_utils = importlib.import_module("forward_utils")
        train = importlib.import_module("train")
        test = importlib.import_module("test")
        torch.set_num_threads(1)
        theirs = adapter.AdaptedCLIP(their_clip(model_module, state, size), relu=False).eval()
        load_our_weights(theirs, ours)
        result["parameters, theirs minus ours (AdaptedCLIP)"] = (sum(p.numel() for p in theirs.parameters())
                                                                 - ours.parameter_counts()["total"])
        surgery = their_clip(model_module, state, size)
        surgery.visual.DAPM_replace(DPAM_layer=len(surgery.visual.transformer.resblocks) - cfg.surgery_from + 2)

        # -- test time: text anchors, maps, image scores, per-class metrics, both domains -----------------
        for dataset, name, text, domain in CASES:
            with torch.no_grad():
                their_text = forward_utils.get_adapted_single_class_text_embedding(theirs, dataset, name, "cpu")
                our_text = ours.text_features([text])[0]
                loader = [{"image": images, "mask": masks[:, None], "label": labels, "file_name": ["a", "b"],
                           "class_name": [name, name]}]
                their_masks, their_labels, their_maps, their_scores, _ = test.get_predictions(
                    theirs, their_text, loader, "cpu", size, dataset)
                our_maps, our_scores = ours.predict(images, [text, text], domain)
            result[f"{domain} text anchors"] = max_diff(our_text, their_text.T)
            result[f"{domain} maps"] = max_diff(our_maps, torch.from_numpy(their_maps))
            result[f"{domain} image scores"] = max_diff(our_scores, torch.from_numpy(their_scores))
            final_maps, final_scores = ours.protocol_scores(our_maps, our_scores, domain)
            their_metrics = forward_utils.metrics_eval(their_masks, their_labels, their_maps, their_scores, name,
                                                       "Industrial" if domain == "industrial" else "Medical")
            flat_masks = their_masks.flatten()
            ours_metrics = {"pixel AUC": roc_auc_score(flat_masks, final_maps.flatten().numpy()),
                            "pixel AP": average_precision_score(flat_masks, final_maps.flatten().numpy()),
                            "image AUC": roc_auc_score(their_labels, final_scores.numpy()),
                            "image AP": average_precision_score(their_labels, final_scores.numpy())}
            result[f"{domain} per-class metrics (x100, theirs rounded to 4 places)"] = max(
                abs(round(v, 4) * 100 - their_metrics[k]) for k, v in ours_metrics.items())

        # -- training: one step of each stage on the same batch ------------------------------------------
        log = LossLog()
        logger = logging.getLogger("compare_aa_clip")
        logger.addHandler(log)
        logger.setLevel(logging.INFO)
        targets = Targets(masks=masks, labels=labels, known=torch.ones(2, dtype=torch.bool))
        batch = {"image": images, "mask": masks[:, None], "label": labels, "class_name": ["bottle", "bottle"]}
        for stage, modules in enumerate(([ours.text_adapters, ours.text_head],
                                         [ours.image_adapters, ours.projections, ours.det_projection])):
            ours.begin_stage(stage)
            for module in (ours.text_adapters, ours.text_head, ours.image_adapters, ours.projections,
                           ours.det_projection):
                module.requires_grad_(any(module is m for m in modules))
            params = [p for m in modules for p in m.parameters()]
            losses = ours.training_losses(ours.training_outputs(images, ["dark bottle"] * 2), targets)
            grads = torch.autograd.grad(losses["loss"], params)
            if stage == 0:
                optimizer = RecordingAdam(theirs.text_adapter.parameters(), lr=cfg.text_lr, betas=(0.5, 0.999))
                train.train_text_adapter(theirs, surgery, cfg.text_norm_weight, [batch], optimizer, "cpu", 0,
                                         workdir, 1, "MVTec", size, logger)
                their_params = list(theirs.text_adapter.parameters())
                name = "text stage"
            else:
                with torch.no_grad():
                    embeddings = {"bottle": forward_utils.get_adapted_single_class_text_embedding(
                        theirs, "MVTec", "bottle", "cpu")}
                optimizer = RecordingAdam(theirs.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
                scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [16000, 32000], 0.5)
                train.train_image_adapter(theirs, embeddings, [batch], optimizer, scheduler, "cpu", 0, workdir, 1,
                                          size, logger)
                their_params = list(theirs.image_adapter.parameters())
                name = "image stage"
            result[f"{name} loss"] = abs(losses["loss"].item() - log.losses[-1])
            result[f"{name} loss (value)"] = losses["loss"].item()
            # their parameter order: adapters, projections, det / text adapters then head, as ours
            result[f"{name} gradients"] = max(max_diff(a, b) for a, b in zip(grads, optimizer.grads))
            result[f"{name} gradient scale"] = max(float(g.abs().max()) for g in grads)
            ours_step = torch.optim.Adam(params, lr=optimizer.param_groups[0]["lr"], betas=(0.5, 0.999))
            for p, g in zip(params, grads):
                p.grad = g
            ours_step.step()
            result[f"{name} weights after one Adam step"] = max(max_diff(a, b) for a, b in zip(params, their_params))
            # Adam's first step is lr * g / (|g| + 1e-8): for |g| near 1e-8 the rounding of g decides it
            result[f"{name} weights after one Adam step, where |grad| > 1e-5"] = max(
                float(((a - b).abs() * (g.abs() > 1e-5)).max()) for a, b, g in zip(params, their_params, grads))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/Mwxinnn/AA-CLIP")
    parser.add_argument("--size", type=int, default=112, help="input size (518: the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(compare(args.official.resolve(), args.size, args.seed), indent=2))


if __name__ == "__main__":
    main()
