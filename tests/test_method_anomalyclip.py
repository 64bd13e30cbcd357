"""AnomalyCLIP (moeclip/methods/anomalyclip.py) against straightforward re-computations of BASELINES.md section 3.

The references below recompute every equation from the tiny random-weight CLIP's own tensors with plain
loops (per-head V-V attention, index assignment for the prompts, scipy's gaussian_filter, the official focal
and Dice formulas), so a wrong stream, layer, order or constant in the method shows up as a mismatch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from scipy.ndimage import gaussian_filter

from moeclip.backbone import tokenizer_for
from moeclip.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, gaussian_blur
from moeclip.methods.targets import Targets

TINY = {
    "backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": True,
    "position_resize": "bilinear", "precision": "fp32", "prompt_length": 12, "deep_prompt_length": 4,
    "deep_prompt_depth": 2, "deep_prompt_fp16": True, "dpam_from": 2, "feature_layers": (4,), "temperature": 0.07,
    "lambda_local": 4.0, "focal_gamma": 2.0, "sigma": 4.0, "object_word": "object", "anomaly_word": "damaged",
}


def tiny_config(**overrides: object) -> AnomalyCLIPConfig:
    return AnomalyCLIPConfig.model_validate({**TINY, **overrides})


def tiny_model(**overrides: object) -> AnomalyCLIP:
    """The tiny method with its prompt tensors drawn large (N(0, 1)), so that every one of them moves the outputs."""
    model = AnomalyCLIP.build(tiny_config(**overrides), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.prompts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> AnomalyCLIP:
    return tiny_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


# -- independent references --------------------------------------------------------------------
def reference_vv(attn: torch.nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """out_proj(concat over heads of softmax(v v^T / sqrt(d)) v), v from the in_proj's value rows."""
    width = h.shape[-1]
    d = width // attn.num_heads
    v = h @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:]
    heads = []
    for i in range(attn.num_heads):
        vi = v[..., i * d:(i + 1) * d]
        heads.append(torch.softmax(vi @ vi.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vi)
    return attn.out_proj(torch.cat(heads, dim=-1))


def reference_vision(model: AnomalyCLIP, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """g = x_ori[CLS] @ proj and, per feature layer, ln_post(tokens) @ proj of the stream that layer taps."""
    visual, config = model.clip.visual, model.config
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x_ori, x_vv, taps = visual.ln_pre(x), None, {}
    for layer, block in enumerate(visual.transformer.resblocks, start=1):
        h = block.ln_1(x_ori)
        if layer >= config.dpam_from:
            x_vv = (x_ori if x_vv is None else x_vv) + reference_vv(block.attn, h)
        x_ori = x_ori + block.attn(h, h, h, need_weights=False)[0]
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        if layer in config.feature_layers:
            taps[layer] = visual.ln_post(x_ori if x_vv is None else x_vv) @ visual.proj
    return x_ori[:, 0] @ visual.proj, taps


def reference_text(model: AnomalyCLIP) -> torch.Tensor:
    """[t_n, t_a]: placeholders replaced by ctx, positions 1..m overwritten before text blocks 2..depth."""
    clip, config, prompts = model.clip, model.config, model.prompts
    xs = " ".join(["X"] * config.prompt_length)
    tokens = tokenizer_for(config.backbone)([f"{xs} object.", f"{xs} damaged object."])
    x = clip.token_embedding(tokens)
    x[0, 1:1 + config.prompt_length] = prompts.ctx_pos
    x[1, 1:1 + config.prompt_length] = prompts.ctx_neg
    x = x + clip.positional_embedding
    for layer, block in enumerate(clip.transformer.resblocks, start=1):
        if 2 <= layer <= config.deep_prompt_depth:
            x = x.clone()
            x[:, 1:1 + config.deep_prompt_length] = prompts.deep[layer - 2].half().float()
        x = block(x, attn_mask=clip.attn_mask)
    eot = clip.ln_final(x)[torch.arange(2), tokens.argmax(dim=-1)] @ clip.text_projection
    return eot / eot.norm(dim=-1, keepdim=True)


def reference_probs(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return torch.softmax((features / features.norm(dim=-1, keepdim=True)) @ text.T / 0.07, dim=-1)


def reference_local_maps(patches: dict[int, torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (B, 2, 64, 64): softmax per token, CLS dropped, 8x8 grid, then bilinear to 64 px."""
    maps = []
    for features in patches.values():
        grid = reference_probs(features, text)[:, 1:].reshape(-1, 8, 8, 2).permute(0, 3, 1, 2)
        maps.append(F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False))
    return maps


def reference_focal(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official FocalLoss (gamma 2, smooth 1e-5): clamped one-hot, p_t = sum + 1e-5, mean over pixels."""
    one_hot = torch.stack([1 - mask, mask], dim=1).clamp(1e-5, 1 - 1e-5)
    p_true = (one_hot * probs).sum(dim=1) + 1e-5
    return (-(1 - p_true) ** 2 * p_true.log()).mean()


def reference_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official BinaryDiceLoss: 1 - batch mean of (2 sum(pg) + 1) / (sum p + sum g + 1)."""
    pred, target = pred.flatten(1), target.flatten(1)
    return 1 - ((2 * (pred * target).sum(1) + 1) / (pred.sum(1) + target.sum(1) + 1)).mean()


def masks_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    masks = torch.zeros(2, 64, 64)
    masks[1, 10:30, 20:44] = 1
    return masks, torch.tensor([0, 1])


# -- the equations -----------------------------------------------------------------------------
def test_gaussian_equals_scipy_gaussian_filter() -> None:
    generator = torch.Generator().manual_seed(0)
    for shape, sigma in (((2, 64, 64), 4.0), ((1, 20, 37), 6.0), ((1, 518, 518), 4.0)):
        maps = torch.rand(shape, generator=generator)
        expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])  # truncate 4, mode reflect
        np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-6)


def test_text_features_follow_the_deep_prompt_equations(model: AnomalyCLIP) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), reference_text(model), atol=1e-6, rtol=0)


def test_predict_matches_the_dual_path_reference(model: AnomalyCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        maps, scores = model.predict(images, ["bottle", "cable"], "industrial")
        text = reference_text(model)
        global_embedding, patches = reference_vision(model, images)
        local = reference_local_maps(patches, text)
    raw = sum(m[:, 1] for m in local)
    expected = np.stack([gaussian_filter(m, sigma=4.0) for m in raw.numpy()])
    torch.testing.assert_close(maps, torch.from_numpy(expected), atol=2e-5, rtol=0)
    torch.testing.assert_close(scores, reference_probs(global_embedding, text)[:, 1], atol=1e-5, rtol=0)
    assert scores.std() > 1e-3 and raw.std() > 1e-3  # the check sees real variation, not constant outputs


def test_feature_layers_before_dpam_tap_the_plain_stream_and_sum() -> None:
    model = tiny_model(feature_layers=(1, 3, 4), sigma=1.0)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maps, _ = model.predict(images, ["x"], "industrial")
        _, patches = reference_vision(model, images)
        raw = sum(m[:, 1] for m in reference_local_maps(patches, reference_text(model)))
    expected = torch.from_numpy(gaussian_filter(raw[0].numpy(), sigma=1.0))
    torch.testing.assert_close(maps[0], expected, atol=2e-5, rtol=0)


def test_training_loss_is_ce_plus_four_times_focal_and_two_dice(model: AnomalyCLIP, images: torch.Tensor) -> None:
    masks, labels = masks_and_labels()
    model.train()
    try:
        losses = model.training_losses(model.training_outputs(images, ["a", "b"]),
                                       Targets(masks, labels, torch.tensor([True, True])))
    finally:
        model.eval()
    with torch.no_grad():
        text = reference_text(model)
        global_embedding, patches = reference_vision(model, images)
        image = F.cross_entropy((global_embedding / global_embedding.norm(dim=-1, keepdim=True)) @ text.T / 0.07,
                                labels)
        local = sum(reference_focal(p, masks) + reference_dice(p[:, 1], masks) + reference_dice(p[:, 0], 1 - masks)
                    for p in reference_local_maps(patches, text))
    torch.testing.assert_close(losses["image_loss"], image, atol=1e-5, rtol=0)
    torch.testing.assert_close(losses["local_loss"], local, atol=1e-5, rtol=0)
    torch.testing.assert_close(losses["loss"], image + 4 * local, atol=1e-5, rtol=0)


def test_samples_with_unknown_masks_only_train_the_image_term(model: AnomalyCLIP, images: torch.Tensor) -> None:
    masks, labels = masks_and_labels()
    with torch.no_grad():
        outputs = model.training_outputs(images, ["a", "b"])
        mixed = model.training_losses(outputs, Targets(masks, labels, torch.tensor([False, True])))
        second = type(outputs)(outputs.image_logits[1:], outputs.probabilities[1:])
        alone = model.training_losses(second, Targets(masks[1:], labels[1:], torch.tensor([True])))
        none = model.training_losses(outputs, Targets(masks, labels, torch.tensor([False, False])))
    torch.testing.assert_close(mixed["local_loss"], alone["local_loss"])
    torch.testing.assert_close(mixed["image_loss"], F.cross_entropy(outputs.image_logits, labels))
    torch.testing.assert_close(none["loss"], none["image_loss"])


# -- the method's protocol ---------------------------------------------------------------------
def test_prompts_are_class_agnostic(model: AnomalyCLIP, images: torch.Tensor) -> None:
    assert model.prompt_texts({"class_name": ["metal_nut"], "description": ["a nut"]}) == ["metal_nut"]
    with torch.no_grad():
        first = model.predict(images, ["bottle", "bottle"], "industrial")
        second = model.predict(images, ["cable", "screw"], "medical")
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_text_is_cached_in_eval_only_and_refreshed_after_an_update() -> None:
    model = tiny_model()
    with torch.no_grad():
        cached = model.text_features()
        assert model.text_features() is cached
        model.prompts.ctx_neg.add_(0.5)
        refreshed = model.text_features()
        assert refreshed is not cached
        torch.testing.assert_close(refreshed, reference_text(model), atol=1e-6, rtol=0)
    assert model.text_features().requires_grad  # with autograd on it is recomputed, carrying the gradient
    model.train()
    with torch.no_grad():
        assert model.text_features() is not model.text_features()


def test_training_steps_reduce_the_loss_and_touch_only_the_prompts(images: torch.Tensor) -> None:
    model = AnomalyCLIP.build(tiny_config(), seed=0)
    masks, labels = masks_and_labels()
    targets = Targets(masks, labels, torch.tensor([True, True]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01, betas=(0.5, 0.999))
    model.train()
    history = []
    for _ in range(6):
        loss = model.training_losses(model.training_outputs(images, ["a", "b"]), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] - 0.05
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == {"prompts.ctx_pos", "prompts.ctx_neg", "prompts.deep"}
    assert all(model.prompts.get_parameter(n.split(".")[1]).grad.abs().sum() > 0 for n in with_grad)


def test_trainable_count_at_vit_l_14_336() -> None:
    config = tiny_config(backbone="ViT-L-14-336", image_size=518, deep_prompt_depth=9, dpam_from=6,
                         feature_layers=(24,))
    counts = AnomalyCLIP.count_parameters(config)
    assert counts["trainable"] == counts["added"] == 2 * 12 * 768 + 8 * 4 * 768 == 43_008


def test_bilinear_position_resize_from_the_native_grid() -> None:
    native = AnomalyCLIP.build(tiny_config(), seed=0).clip.visual.positional_embedding
    resized = AnomalyCLIP.build(tiny_config(image_size=80), seed=0).clip.visual
    grid = native[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(10, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized.positional_embedding[1:], expected.flatten(2)[0].T)
    torch.testing.assert_close(resized.positional_embedding[0], native[0])
    assert resized.grid_size == (10, 10)
    bicubic = AnomalyCLIP.build(tiny_config(image_size=80, position_resize="bicubic_antialias"), seed=0)
    assert bicubic.clip.visual.positional_embedding.shape == resized.positional_embedding.shape


def test_official_prompt_state_loads_into_the_prompts() -> None:
    model = AnomalyCLIP.build(tiny_config(deep_prompt_depth=2), seed=0)
    state = {"ctx_pos": torch.ones(1, 1, 12, 64), "ctx_neg": torch.full((1, 1, 12, 64), 2.0),
             "compound_prompts_text.0": torch.full((4, 64), 3.0), "compound_prompt_projections.0.weight": None}
    model.load_official_prompts(state)
    assert model.prompts.ctx_pos.eq(1).all() and model.prompts.ctx_neg.eq(2).all() and model.prompts.deep.eq(3).all()


def test_bf16_autocast_stays_close_to_fp32(model: AnomalyCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        maps, scores = model.predict(images, ["a", "b"], "industrial")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_maps, fast_scores = model.predict(images, ["a", "b"], "industrial")
    assert fast_maps.dtype == fast_scores.dtype == torch.float32
    torch.testing.assert_close(fast_maps, maps, atol=0.05, rtol=0)
    torch.testing.assert_close(fast_scores, scores, atol=0.05, rtol=0)


def test_config_rejects_inconsistent_values() -> None:
    with pytest.raises(ValidationError):
        tiny_config(deep_prompt_length=13)
    with pytest.raises(ValidationError):
        tiny_config(extra_field=1)
    with pytest.raises(ValueError):
        AnomalyCLIP.build(tiny_config(deep_prompt_depth=3), seed=0)  # the tiny text tower has 2 blocks
    with pytest.raises(ValueError):
        AnomalyCLIP.build(tiny_config(feature_layers=(5,)), seed=0)
