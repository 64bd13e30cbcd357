"""April-GAN (moeclip/methods/april_gan.py) against straightforward reference computations of BASELINES.md 2 and
closed-form loss values, on the tiny random-weight ViT (4 blocks, 8x8 grid at 64 px)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import moeclip.methods.april_gan as april_gan_module
import moeclip.methods.scoring as scoring_module
from moeclip.backbone import load_clip, tokenizer_for
from moeclip.config import TrainConfig
from moeclip.methods.april_gan import AprilGAN, AprilGANConfig
from moeclip.methods.targets import Targets
from moeclip.methods.prompts import APRIL_GAN_TEMPLATES, ensemble

TINY = {"backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": False,
        "precision": "fp32", "class_text": "folder", "feature_layers": (1, 2, 3, 4), "logit_scale": 100.0,
        "focal_gamma": 2.0}
PAPER = {**TINY, "backbone": "ViT-L-14-336", "image_size": 518, "weights": "openai",
         "feature_layers": (6, 12, 18, 24)}
NAMES = ["metal_nut", "bottle"]

# BASELINES.md 2c, written out here so that a changed list in moeclip/methods/prompts.py is caught.
NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
          "{} without damage"]
ANOMALOUS = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES_HEAD = ["a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}."]
TEMPLATES_TAIL = ["there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
                  "this is one {} in the scene."]


def train_config(**overrides: object) -> TrainConfig:
    """The paper's April-GAN training settings."""
    values = {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999), "weight_decay": 0.0, "milestones": (),
              "gamma": 1.0, "seed": 111, "augment": False, "num_workers": 0, "checkpoint_every": 1000,
              "max_steps": None}
    return TrainConfig.model_validate({**values, **overrides})


@pytest.fixture(scope="module")
def model() -> AprilGAN:
    return AprilGAN.build(AprilGANConfig.model_validate(TINY), seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def reference_text(model: AprilGAN, name: str) -> torch.Tensor:
    """(2, D): per state list, normalise every prompt embedding, average, normalise again."""
    rows = []
    for states in (NORMAL, ANOMALOUS):
        prompts = [template.format(state.format(name)) for state in states for template in APRIL_GAN_TEMPLATES]
        embeddings = model.clip.encode_text(model.tokenizer(prompts))
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def block_outputs_and_embedding(model: AprilGAN, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Every block's output (1-indexed, hooked) and CLIP's own image embedding, from one `encode_image`."""
    outputs: dict[int, torch.Tensor] = {}
    blocks = model.clip.visual.transformer.resblocks
    hooks = [block.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(blocks, start=1)]
    try:
        embedding = model.clip.encode_image(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, embedding


def reference_outputs(model: AprilGAN, images: torch.Tensor,
                      text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer anomalous probabilities (B, 4, H, W), their sum, and the image scores (BASELINES.md 2b)."""
    outputs, embedding = block_outputs_and_embedding(model, images)
    batch, size = images.shape[0], images.shape[-1]
    layers = []
    for projection, block in zip(model.projections, (1, 2, 3, 4)):
        tokens = outputs[block][:, 1:]  # raw residual stream, CLS dropped
        projected = tokens @ projection.weight.T + projection.bias
        projected = projected / projected.norm(dim=-1, keepdim=True)
        logits = 100 * torch.einsum("bld,bkd->bkl", projected, text).reshape(batch, 2, 8, 8)
        upsampled = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
        layers.append(upsampled.softmax(dim=1)[:, 1])
    per_layer = torch.stack(layers, dim=1)
    unit = embedding / embedding.norm(dim=-1, keepdim=True)
    scores = (100 * torch.einsum("bd,bkd->bk", unit, text)).softmax(dim=-1)[:, 1]
    return per_layer, per_layer.sum(dim=1), scores


# -- configuration, prompts, sizes -------------------------------------------------------------
def test_config_has_no_defaults_and_needs_increasing_layers() -> None:
    with pytest.raises(ValidationError):
        AprilGANConfig.model_validate({k: v for k, v in TINY.items() if k != "logit_scale"})
    with pytest.raises(ValidationError):
        AprilGANConfig.model_validate({**TINY, "feature_layers": (2, 1)})
    with pytest.raises(ValueError, match="do not fit"):
        AprilGAN.count_parameters(AprilGANConfig.model_validate({**TINY, "feature_layers": (1, 5)}))


def test_prompt_ensembles() -> None:
    assert len(APRIL_GAN_TEMPLATES) == 35 == len(set(APRIL_GAN_TEMPLATES))
    assert list(APRIL_GAN_TEMPLATES[:3]) == TEMPLATES_HEAD and list(APRIL_GAN_TEMPLATES[-4:]) == TEMPLATES_TAIL
    normal = ensemble("metal_nut", NORMAL, APRIL_GAN_TEMPLATES)
    anomalous = ensemble("metal_nut", april_gan_module.APRIL_GAN_ANOMALOUS_STATES, APRIL_GAN_TEMPLATES)
    assert (len(normal), len(anomalous)) == (245, 175)
    assert list(april_gan_module.NORMAL_STATES) == NORMAL
    assert list(april_gan_module.APRIL_GAN_ANOMALOUS_STATES) == ANOMALOUS
    assert "a photo of my broken metal_nut." in anomalous


def test_paper_parameter_count() -> None:
    """Four Linear(1024 -> 768) with bias: 4 x (1024 * 768 + 768); nothing else trains."""
    counts = AprilGAN.count_parameters(AprilGANConfig.model_validate(PAPER))
    assert counts["trainable"] == counts["added"] == 3_148_800 == 4 * (1024 * 768 + 768)


def test_paper_size_gives_a_37x37_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """ViT-L-14-336 at 518 px laid out on the meta device (autocast has no meta backend: switched off)."""
    for module in (april_gan_module, scoring_module):
        monkeypatch.setattr(module, "float32", lambda _where: contextlib.nullcontext())
    config = AprilGANConfig.model_validate({**PAPER, "weights": None})
    with torch.device("meta"):
        method = AprilGAN(config, load_clip(config.backbone, 518, None, False, device="meta"),
                          tokenizer_for(config.backbone))
        patches, embedding = method._encode_image(torch.empty(1, 3, 518, 518))
        maps = method._layer_maps(patches, torch.empty(1, 2, 768), 518)
    assert tuple(method.clip.visual.grid_size) == (37, 37)
    assert patches.shape == (1, 4, 37 * 37, 768) and embedding.shape == (1, 768)
    assert maps.shape == (1, 4, 2, 518, 518)


def test_position_table_is_resized_bicubic_with_antialias(tmp_path) -> None:
    """A checkpoint trained at another size: the grid part of the table is resized as the release does
    (bicubic, antialias, align_corners False), the CLS entry kept."""
    clip = load_clip("MoECLIP-Tiny-ViT", 64, None, False)
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    resized = load_clip("MoECLIP-Tiny-ViT", 96, str(tmp_path / "tiny.pt"), False).visual.positional_embedding
    table = clip.visual.positional_embedding
    grid = table[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)

    def resize(antialias: bool) -> torch.Tensor:
        out = F.interpolate(grid, size=(12, 12), mode="bicubic", antialias=antialias, align_corners=False)
        return torch.cat([table[:1], out.permute(0, 2, 3, 1).reshape(144, -1)])
    torch.testing.assert_close(resized, resize(True))
    assert not torch.allclose(resized, resize(False), atol=1e-4)


# -- forward ----------------------------------------------------------------------------------
def test_text_features_normalise_each_prompt_then_the_mean(model: AprilGAN) -> None:
    with torch.no_grad():
        expected = torch.stack([reference_text(model, name) for name in NAMES])
        torch.testing.assert_close(model.text_features(NAMES), expected, atol=1e-6, rtol=0)
        raw = model.clip.encode_text(model.tokenizer(ensemble("bottle", ANOMALOUS, APRIL_GAN_TEMPLATES))).mean(0)
    # The order matters on these weights (the check would be void otherwise).
    assert not torch.allclose(F.normalize(raw, dim=0), expected[1, 1], atol=1e-4)


def test_text_features_are_cached_per_class_text(model: AprilGAN, monkeypatch: pytest.MonkeyPatch) -> None:
    first = model.text_features(NAMES)

    def fail(*_args: object) -> None:
        raise AssertionError("the frozen text tower ran again")
    monkeypatch.setattr(model.clip, "encode_text", fail)
    torch.testing.assert_close(model.text_features(NAMES[::-1]), first.flip(0), atol=0, rtol=0)


def test_predict_matches_the_reference(model: AprilGAN, images: torch.Tensor) -> None:
    with torch.no_grad():
        text = torch.stack([reference_text(model, name) for name in NAMES])
        _, expected_map, expected_score = reference_outputs(model, images, text)
        maps, scores = model.predict(images, NAMES, "industrial")
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)
    torch.testing.assert_close(maps, expected_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, expected_score, atol=1e-5, rtol=1e-5)
    assert 0 <= maps.min() and maps.max() <= 4
    # The protocol is the baselines' default: raw maps and S alone.
    protocol_maps, protocol_scores = model.protocol_scores(maps, scores, "industrial")
    assert torch.equal(protocol_maps, maps) and torch.equal(protocol_scores, scores)


def test_map_pixels_on_patch_centres_are_the_patch_values(model: AprilGAN, images: torch.Tensor) -> None:
    """align_corners=True puts pixel 9 k (k = 0..7) of the 64 px map exactly on patch k of the 8x8 grid, so
    there the map is the sum over layers of softmax(100 * [cos(p, t_n), cos(p, t_a)])[1] of that patch."""
    with torch.no_grad():
        text = model.text_features(NAMES)
        outputs, _ = block_outputs_and_embedding(model, images)
        maps, _ = model.predict(images, NAMES, "industrial")
        for row, col in ((0, 0), (0, 1), (1, 1), (7, 3)):
            expected = torch.zeros(2)
            for projection, block in zip(model.projections, (1, 2, 3, 4)):
                patch = F.normalize(projection(outputs[block][:, 1 + 8 * row + col]), dim=-1)
                expected += (100 * torch.einsum("bd,bkd->bk", patch, text)).softmax(dim=-1)[:, 1]
            torch.testing.assert_close(maps[:, 9 * row, 9 * col], expected, atol=1e-5, rtol=1e-5)


def test_training_outputs_are_the_per_layer_probabilities(model: AprilGAN, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected, _, _ = reference_outputs(model, images, model.text_features(NAMES))
        probs = model.training_outputs(images, NAMES)
    assert probs.shape == (2, 4, 2, 64, 64)
    torch.testing.assert_close(probs[:, :, 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(dim=2), torch.ones(2, 4, 64, 64))


# -- losses and training ------------------------------------------------------------------------
def constant_maps(anomalous: list[float], batch: int = 2, size: int = 4) -> torch.Tensor:
    """(B, M, 2, size, size) maps whose anomalous probability is anomalous[m] everywhere."""
    a = torch.tensor(anomalous).view(1, -1, 1, 1).expand(batch, -1, size, size)
    return torch.stack([1 - a, a], dim=2)


def expected_loss(anomalous: list[float], positives: list[int], pixels: int) -> tuple[float, float]:
    """(focal, dice) summed over layers: per pixel -(1 - p_t)^2 log p_t with the target clamped to
    [1e-5, 1 - 1e-5] and p_t + 1e-5, mean over all pixels; Dice (2 a n + 1) / (a N + n + 1) per image."""
    eps, focal, dice = 1e-5, 0.0, 0.0

    def term(p: float) -> float:
        return -((1 - p) ** 2) * math.log(p)
    for a in anomalous:
        p_pos = (1 - eps) * a + eps * (1 - a) + eps
        p_neg = (1 - eps) * (1 - a) + eps * a + eps
        total = sum(n * term(p_pos) + (pixels - n) * term(p_neg) for n in positives)
        focal += total / (pixels * len(positives))
        dice += 1 - sum((2 * a * n + 1) / (a * pixels + n + 1) for n in positives) / len(positives)
    return focal, dice


def test_losses_have_known_values(model: AprilGAN) -> None:
    anomalous = [0.1, 0.3, 0.6, 0.9]
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :3] = 1  # 6 positive pixels; the second image is normal
    targets = Targets(masks=masks, labels=torch.tensor([1, 0]), known=torch.tensor([True, True]))
    losses = model.training_losses(constant_maps(anomalous), targets)
    focal, dice = expected_loss(anomalous, [6, 0], 16)
    assert losses["focal_loss"].item() == pytest.approx(focal, rel=1e-5)
    assert losses["dice_loss"].item() == pytest.approx(dice, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(focal + dice, rel=1e-5)


def test_samples_without_a_mask_are_left_out(model: AprilGAN) -> None:
    anomalous = [0.2, 0.4, 0.5, 0.7]
    masks = torch.zeros(2, 4, 4)
    masks[1, 1:, 1:] = 1  # 9 positives, but this mask is unknown
    known = Targets(masks=masks, labels=torch.tensor([0, 1]), known=torch.tensor([True, False]))
    losses = model.training_losses(constant_maps(anomalous), known)
    focal, dice = expected_loss(anomalous, [0], 16)
    assert losses["loss"].item() == pytest.approx(focal + dice, rel=1e-5)
    maps = constant_maps(anomalous).requires_grad_(True)
    none = Targets(masks=masks, labels=torch.tensor([0, 1]), known=torch.tensor([False, False]))
    empty = model.training_losses(maps, none)["loss"]
    empty.backward()
    assert empty.item() == 0 and maps.grad.abs().sum() == 0


def test_training_reduces_the_loss_and_updates_only_the_projections() -> None:
    method = AprilGAN.build(AprilGANConfig.model_validate(TINY), seed=0)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    masks = torch.zeros(4, 64, 64)
    masks[:2, 16:40, 8:32] = 1
    targets = Targets(masks=masks, labels=torch.tensor([1, 1, 0, 0]), known=torch.ones(4, dtype=torch.bool))
    texts = ["bottle"] * 4
    config = train_config()
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in method.projections.parameters()]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=config.betas)
    history = []
    method.train()
    for _ in range(4):
        loss = method.training_losses(method.training_outputs(images, texts), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0]
    assert all(p.grad is None for p in method.clip.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.projections.parameters())
