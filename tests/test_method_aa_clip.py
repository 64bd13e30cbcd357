"""AA-CLIP (moeclip/methods/aa_clip.py) against written-out reference computations of the official code
(Mwxinnn/AA-CLIP 53db195) and closed-form values, on the tiny random-weight ViT (4 blocks, 8x8 grid at 64 px).

Mutations of the module, each caught (test that fails):
  adapter mix w <-> 1-w, or no norm rescale            -> test_residual_adapter_known_values, test_encode_image_*
  image adapters after blocks 0..n-2 / text off-by-one -> test_encode_image_matches_reference, test_encode_text_*
  taps without ln_post / det from the first tap        -> test_encode_image_matches_reference
  image embedding = mean of raw outputs                -> test_encode_image_matches_reference
  surgery: no + CLS, surgery_from off by one           -> test_surgery_features_match_reference
  surgery attention batch <-> tokens                   -> test_surgery_attention_*
  text_loss_layers ignored                             -> test_text_stage_uses_the_last_tapped_block_only
  orthogonality not squared / weight dropped           -> test_orthogonality_loss_known_value, test_text_stage_loss
  classification bce instead of cross-entropy          -> test_image_stage_loss
  Dice/focal paper forms instead of the release's      -> test_image_stage_loss, test_text_stage_loss
  image score from s_N, blur domains swapped, scale    -> test_predict_matches_reference
  per-class rule into_unit_range, medical fused        -> test_protocol_scores_*
  prompts (states, templates) changed                  -> test_prompt_ensemble_is_the_official_one
  text head = CLIP's projection                        -> test_encode_text_matches_reference
  stage order / text lr / milestones kept              -> test_training_stages_*
  trainer: stage modules not frozen, resume stage     -> test_training_stages_through_the_generic_trainer,
                                                          test_resume_at_a_stage_boundary_*
  text cache not invalidated                           -> test_text_cache_follows_the_adapter_weights
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from moeclip.bench.baselines import method_runs
from moeclip.bench.experiments import load_plan
from moeclip.config import TrainConfig
from moeclip.data.manifest import read_manifest
from moeclip.data.prepare import prepare_dataset
from moeclip.data.synthetic import generate_demo_datasets
from moeclip.methods.aa_clip import (
    AAClip,
    AAClipConfig,
    orthogonality_loss,
    residual_adapt,
    unit_unless_max_one,
)
from moeclip.methods.moeclip.text import prompt_ensemble
from moeclip.methods.targets import Targets
from moeclip.training import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": False, "precision": "fp32",
        "class_text": "description", "feature_layers": (1, 2, 3, 4), "image_adapter_layers": 2,
        "text_adapter_layers": 1, "image_adapt_weight": 0.1, "text_adapt_weight": 0.1, "projection_activation": False,
        "logit_scale": 100.0, "surgery_from": 2, "surgery_attention": "batch", "text_loss_layers": "last",
        "text_norm_weight": 0.1, "focal_gamma": 2.0, "blur_industrial": {"kernel_size": 7, "sigma": 1.0},
        "blur_medical": {"kernel_size": 9, "sigma": 1.5}, "text_epochs": 1, "text_batch_size": 4, "text_lr": 1e-2}
PAPER = {**TINY, "backbone": "ViT-L-14-336", "image_size": 518, "weights": "openai",
         "feature_layers": (6, 12, 18, 24), "image_adapter_layers": 6, "text_adapter_layers": 3, "surgery_from": 6,
         "text_epochs": 5, "text_batch_size": 16, "text_lr": 1e-5}


def tiny(**overrides: object) -> AAClip:
    return AAClip.build(AAClipConfig.model_validate({**TINY, **overrides}), seed=0)


def train_config(**overrides: object) -> TrainConfig:
    values = {"epochs": 1, "batch_size": 2, "lr": 5e-4, "betas": (0.5, 0.999), "weight_decay": 0.0,
              "milestones": (16000, 32000), "gamma": 0.5, "seed": 111, "augment": False, "num_workers": 0, "checkpoint_every": 1000,
              "max_steps": None}
    return TrainConfig.model_validate({**values, **overrides})


@pytest.fixture(scope="module")
def model() -> AAClip:
    return tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.01 * x)


def ref_adapt(x: torch.Tensor, weight: torch.Tensor, w: float) -> torch.Tensor:
    a = leaky(x @ weight.T)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return w * a + (1 - w) * x


# -- config, sizes ---------------------------------------------------------------------------------
def test_config_has_no_defaults_and_checks_layers() -> None:
    with pytest.raises(ValidationError, match="text_lr"):
        AAClipConfig.model_validate({k: v for k, v in TINY.items() if k != "text_lr"})
    with pytest.raises(ValidationError, match="strictly increasing"):
        AAClipConfig.model_validate({**TINY, "feature_layers": (2, 1)})
    with pytest.raises(ValueError, match="has 4 blocks"):
        tiny(feature_layers=(1, 5))
    with pytest.raises(ValueError, match="text tower has 2 blocks"):
        tiny(text_adapter_layers=3)


def test_paper_parameter_count() -> None:
    """ViT-L-14-336 at 518 px: 6 image adapters 1024^2, 4 + 1 projections 1024x768, 3 text adapters 768^2 and the
    768x768 text head, all bias-free: 12,582,912 trained (the official AdaptedCLIP's count)."""
    counts = AAClip.count_parameters(AAClipConfig.model_validate(PAPER))
    assert counts["trainable"] == 6 * 1024**2 + 5 * 1024 * 768 + 4 * 768**2 == 12_582_912
    assert counts["total"] == 441_339_137


# -- adapters, towers --------------------------------------------------------------------------------
def test_residual_adapter_known_values() -> None:
    linear = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.LeakyReLU())
    with torch.no_grad():
        linear[0].weight.copy_(torch.eye(2))
    x = torch.tensor([[3.0, -4.0]])
    a = torch.tensor([3.0, -0.04])
    expected = 0.1 * a * 5 / a.norm() + 0.9 * x
    torch.testing.assert_close(residual_adapt(x, linear, 0.1), expected)


def test_encode_text_matches_reference(model: AAClip) -> None:
    clip = model.clip
    tokens = model.tokenizer(["a photo of a damaged bottle.", "bottle."])
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for index, block in enumerate(clip.transformer.resblocks):
        x = block(x, attn_mask=clip.attn_mask)
        if index < 1:
            x = ref_adapt(x, model.text_adapters[0][0].weight, 0.1)
    x = clip.ln_final(x)[torch.arange(2), tokens.argmax(dim=-1)]
    torch.testing.assert_close(model.encode_text(tokens), leaky(x @ model.text_head[0].weight.T))


def test_prompt_ensemble_is_the_official_one(model: AAClip) -> None:
    normal, abnormal = prompt_ensemble("bottle")
    assert sorted(normal) == sorted(f"{t}" for s in ("bottle", "a bottle", "the bottle")
                                    for t in (f"{s}.", f"a photo of {s}."))
    states = ("a damaged bottle", "a broken bottle", "a bottle with flaw", "a bottle with defect",
              "a bottle with damage")
    assert sorted(abnormal) == sorted(t for s in states for t in (f"{s}.", f"a photo of {s}."))
    with torch.no_grad():
        rows = [F.normalize(F.normalize(model.encode_text(model.tokenizer(p)), dim=-1).mean(0), dim=-1)
                for p in (normal, abnormal)]
        torch.testing.assert_close(model.text_features(["bottle"])[0], torch.stack(rows))


def test_encode_image_matches_reference(model: AAClip, images: torch.Tensor) -> None:
    visual = model.clip.visual
    with torch.no_grad():
        x, taps = visual._embeds(images), []
        for index, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if index < 2:
                x = ref_adapt(x, model.image_adapters[index][0].weight, 0.1)
            taps.append(visual.ln_post(x[:, 1:]))
        weights = [model.projections[str(k)].linear.weight for k in (1, 2, 3, 4)]
        patches = torch.stack([F.normalize(t @ w.T, dim=-1) for t, w in zip(taps, weights)], dim=1)
        det = F.normalize(taps[-1] @ model.det_projection["4"].linear.weight.T, dim=-1).mean(dim=1)
        ours_patches, ours_det = model.encode_image(images)
    torch.testing.assert_close(ours_patches, patches)
    torch.testing.assert_close(ours_det, det)


# -- the text stage's features ------------------------------------------------------------------------
def vv(attn: torch.nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """softmax(v v^T / sqrt(d)) v per head over the second dimension of (S, N, W), out_proj'd."""
    v = (h @ attn.in_proj_weight.T + attn.in_proj_bias)[..., 2 * h.shape[-1]:]
    v = v.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (S, heads, N, d)
    out = ((v @ v.transpose(-1, -2)) / math.sqrt(v.shape[-1])).softmax(-1) @ v
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def reference_surgery(model: AAClip, images: torch.Tensor, across: str) -> torch.Tensor:
    visual = model.clip.visual
    x, taps = visual._embeds(images), []
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if index < 2:
            x = block(x)
        else:
            h = block.ln_1(x)
            x = x + (vv(block.attn, h) if across == "tokens" else vv(block.attn, h.transpose(0, 1)).transpose(0, 1))
            x = x + block.mlp(block.ln_2(x))
        taps.append(F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1))
    plain = F.normalize(model.clip.encode_image(images), dim=-1)
    return torch.stack(taps, dim=1) + plain[:, None, None]


@pytest.mark.parametrize("across", ["batch", "tokens"])
def test_surgery_features_match_reference(across: str, images: torch.Tensor) -> None:
    method = tiny(surgery_attention=across)
    with torch.no_grad():
        torch.testing.assert_close(method.surgery_features(images), reference_surgery(method, images, across))


def test_surgery_attention_batch_mixes_images_and_tokens_does_not(images: torch.Tensor) -> None:
    """The official attention runs across the batch: image 0's features change with image 1; with one image the
    attention is the value path alone."""
    changed = images.clone()
    changed[1] += 1
    batch, tokens = tiny(surgery_attention="batch"), tiny(surgery_attention="tokens")
    assert not torch.allclose(batch.surgery_features(images)[0], batch.surgery_features(changed)[0])
    torch.testing.assert_close(tokens.surgery_features(images)[0], tokens.surgery_features(changed)[0])
    block = batch.clip.visual.transformer.resblocks[1]
    h = torch.randn(1, 5, 64)
    v = (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias)[..., 128:]
    torch.testing.assert_close(batch._surgery_attention(block.attn, h), block.attn.out_proj(v))


# -- losses -----------------------------------------------------------------------------------------
def test_orthogonality_loss_known_value() -> None:
    text = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[1.0, 0.0], [0.0, 1.0]]])
    assert orthogonality_loss(text).item() == pytest.approx(0.3**2)


def ref_seg(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official FocalLoss(smooth 1e-5) + BinaryDiceLoss (smoothing 1) on both channels, one (B, 2, H, W) map."""
    s = 1e-5
    target = mask.clamp(s, 1 - s)
    pt = (1 - target) * probs[:, 0] + target * probs[:, 1] + s
    focal = (-(1 - pt) ** 2 * pt.log()).mean()

    def dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p, t = p.flatten(1), t.flatten(1)
        return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
    return focal + dice(probs[:, 0], 1 - mask) + dice(probs[:, 1], mask)


def targets(batch: int = 3) -> Targets:
    masks = torch.zeros(batch, 64, 64)
    masks[1:, 8:40, 16:48] = 1
    return Targets(masks=masks, labels=torch.tensor([0] + [1] * (batch - 1)), known=torch.ones(batch, dtype=torch.bool))


def test_text_stage_loss(images: torch.Tensor) -> None:
    method = tiny()
    method.begin_stage(0)
    outputs = method.training_outputs(images, ["bottle", "bottle", "cable"])
    losses = method.training_losses(outputs, targets())
    maps = outputs.maps
    assert maps.shape == (3, 1, 2, 64, 64)
    text = outputs.text
    orth = ((text[:, 0] * text[:, 1]).sum(-1).mean()) ** 2
    expected = ref_seg(maps[:, 0], targets().masks) + 0.1 * orth
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_text_stage_uses_the_last_tapped_block_only(images: torch.Tensor) -> None:
    last, every = tiny(), tiny(text_loss_layers="all")
    features, text = last.surgery_features(images)[:, -1], last.text_features(["bottle"] * 3)
    logits = 100 * torch.einsum("bld,bkd->bkl", features, text)
    expected = F.interpolate(logits.unflatten(-1, (8, 8)), size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(last.training_outputs(images, ["bottle"] * 3).maps[:, 0], expected.softmax(1))
    assert every.training_outputs(images, ["bottle"] * 3).maps.shape[1] == 4


def test_image_stage_loss(images: torch.Tensor) -> None:
    method = tiny()
    method.begin_stage(1)
    outputs = method.training_outputs(images, ["bottle", "bottle", "cable"])
    losses = method.training_losses(outputs, targets())
    assert outputs.maps.shape == (3, 4, 2, 64, 64)
    seg = sum(ref_seg(outputs.maps[:, m], targets().masks) for m in range(4))
    dots = torch.einsum("bd,bkd->bk", outputs.embedding, outputs.text)
    ce = -torch.log_softmax(dots, dim=1)[torch.arange(3), targets().labels].mean()
    assert losses["classification_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((seg + ce).item(), rel=1e-5)


# -- test time --------------------------------------------------------------------------------------
def kornia_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """kornia.filters.gaussian_blur2d: normalised Gaussian of `kernel` taps, reflect borders, on (N, 1, h, w)."""
    t = torch.arange(kernel, dtype=torch.float32) - kernel // 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = g / g.sum()
    padded = F.pad(x, [kernel // 2] * 4, mode="reflect")
    return F.conv2d(padded, (g[:, None] * g[None, :])[None, None])


@pytest.mark.parametrize(("domain", "kernel", "sigma"), [("industrial", 7, 1.0), ("medical", 9, 1.5)])
def test_predict_matches_reference(model: AAClip, images: torch.Tensor, domain: str, kernel: int,
                                   sigma: float) -> None:
    texts = ["bottle", "bottle", "cable"]
    with torch.no_grad():
        maps, scores = model.predict(images, texts, domain)
        text = model.text_features(texts)
        patches, det = model.encode_image(images)
    logits = 100 * torch.einsum("bmld,bkd->bmkl", patches, text)
    per = ((logits[:, :, 1] + 1 - logits[:, :, 0]) / 2).unflatten(-1, (8, 8)).flatten(0, 1)[:, None]
    blurred = F.interpolate(kornia_blur(per, kernel, sigma), size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(maps, blurred.view(3, 4, 64, 64).sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(scores, (torch.einsum("bd,bd->b", det, text[:, 1]) + 1) / 2)


def test_protocol_scores_min_max_unless_the_maximum_is_one(model: AAClip) -> None:
    maps = torch.tensor([[[0.2, 0.6]], [[0.4, 1.0]]])  # maximum exactly 1: kept
    scores = torch.tensor([0.5, 0.7, 0.6])[:2]  # inside [0, 1] but max != 1: min-maxed to 0 and 1
    out_maps, final = model.protocol_scores(maps, scores, "industrial")
    torch.testing.assert_close(out_maps, maps)
    torch.testing.assert_close(final, torch.tensor([0.5 * 0.6 + 0.0, 0.5 * 1.0 + 0.5]))
    out_maps, final = model.protocol_scores(maps * 2, scores, "medical")
    torch.testing.assert_close(out_maps, torch.tensor([[[0.0, 0.5]], [[0.25, 1.0]]]))
    torch.testing.assert_close(final, torch.tensor([0.5, 1.0]))
    assert torch.equal(unit_unless_max_one(torch.tensor([0.3, 0.3])), torch.zeros(2))


# -- stages and the generic trainer -----------------------------------------------------------------
def test_training_stages_text_then_image(model: AAClip) -> None:
    text, image = AAClip.training_stages(model.config, train_config())
    assert text.modules == ("text_adapters", "text_head")
    assert (text.config.epochs, text.config.batch_size, text.config.lr, text.config.milestones) == (1, 4, 1e-2, ())
    assert image.modules == ("image_adapters", "projections", "det_projection")
    assert image.config == train_config()
    assert [s.modules for s in AAClip.training_stages(tiny(text_epochs=0).config, train_config())] == [image.modules]


def test_text_cache_follows_the_adapter_weights() -> None:
    method = tiny()
    with torch.no_grad():
        before = method.text_features(["bottle"]).clone()
        method.text_head[0].weight.copy_(torch.randn_like(method.text_head[0].weight))
        after = method.text_features(["bottle"])
    assert not torch.allclose(before, after)


@pytest.fixture(scope="module")
def visa_frame(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo_datasets(root / "raw", seed=0, per_class=2)
    prepare_dataset("visa", root / "raw" / "visa", root / "visa.parquet")
    return read_manifest(root / "visa.parquet").head(4)


def test_training_stages_through_the_generic_trainer(visa_frame, tmp_path) -> None:
    """Stage 1 (1 epoch, batch 4: one step) moves only the text modules, stage 2 (batch 2: two steps) only the
    image modules; a run paused at the stage boundary resumes to the same weights."""
    config = AAClipConfig.model_validate(TINY)
    initial = AAClip.build(config, seed=111).trainable_state_dict()
    after_text = train(config, train_config(), visa_frame, tmp_path / "a" / "checkpoint.pt", max_steps=1)
    assert after_text.steps == 1 and set(after_text.history[0]) == {"step", "loss", "seg_loss", "orthogonal_loss"}
    state = after_text.model.trainable_state_dict()
    moved = {k.split(".")[0] for k in state if not torch.equal(state[k], initial[k])}
    assert moved == {"text_adapters", "text_head"}
    whole = train(config, train_config(), visa_frame, tmp_path / "b" / "checkpoint.pt")
    assert whole.steps == 3 and "classification_loss" in whole.history[-1]
    final = whole.model.trainable_state_dict()
    assert all(torch.equal(final[k], state[k]) for k in state if k.startswith("text"))
    assert {k.split(".")[0] for k in final if not torch.equal(final[k], state[k])} == {
        "image_adapters", "projections", "det_projection"}
    resumed = train(config, train_config(), visa_frame, tmp_path / "a" / "checkpoint.pt")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert all(torch.equal(resumed.model.trainable_state_dict()[k], final[k]) for k in final)
    with torch.no_grad():
        maps, scores = whole.model.predict(torch.zeros(1, 3, 64, 64), ["bottle"], "industrial")
    assert maps.shape == (1, 64, 64) and scores.shape == (1,)


def test_resume_at_a_stage_boundary_loads_the_finished_stages_optimiser(visa_frame, tmp_path) -> None:
    """A checkpoint written at the end of the text stage's last epoch holds that stage's optimiser state."""
    config = AAClipConfig.model_validate(TINY)
    trainer = Trainer(config, train_config(), visa_frame, tmp_path / "checkpoint.pt")
    trainer.run(max_steps=1)
    trainer.progress.update(epoch=1, step_in_epoch=0)  # as the loop saves after finishing epoch 0
    trainer.save()
    resumed = Trainer(config, train_config(), visa_frame, tmp_path / "checkpoint.pt")
    assert resumed.resume() and resumed.stage == 0
    assert resumed.run().steps == 3 and resumed.stage == 1


def test_the_paper_profile_runs_the_official_settings() -> None:
    """train.py's defaults and scripts.sh (no --relu), the same for both auxiliary sets; test.py's blur."""
    benchmark, paper = load_plan(ROOT / "params.yaml", "paper")
    for run in method_runs(benchmark, paper, "aa_clip"):
        model, train_settings = run.model, run.train
        assert (model.backbone, model.image_size, model.weights, model.quick_gelu) == \
            ("ViT-L-14-336", 518, "openai", False)
        assert (model.feature_layers, model.image_adapter_layers, model.text_adapter_layers, model.surgery_from) == \
            ((6, 12, 18, 24), 6, 3, 6)
        assert (model.image_adapt_weight, model.text_adapt_weight, model.text_norm_weight) == (0.1, 0.1, 0.1)
        assert not model.projection_activation and model.class_text == "description"
        assert (model.surgery_attention, model.text_loss_layers) == ("batch", "last")
        assert (model.text_epochs, model.text_batch_size, model.text_lr) == (5, 16, 1e-5)
        assert (model.blur_industrial.kernel_size, model.blur_industrial.sigma) == (7, 1.0)
        assert (model.blur_medical.kernel_size, model.blur_medical.sigma) == (9, 1.5)
        assert (train_settings.epochs, train_settings.batch_size, train_settings.lr, train_settings.betas,
                train_settings.milestones, train_settings.gamma, train_settings.seed) == \
            (20, 2, 5e-4, (0.5, 0.999), (16000, 32000), 0.5, 111)
