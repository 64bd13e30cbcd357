"""AdaCLIP (moeclip/methods/adaclip.py) against straightforward re-computations of the official code's rules.

The references recompute the forward from the tiny random-weight CLIP's own tensors with plain loops and index
assignment (prompts appended / replaced at the end of the visual sequence, overwritten after SOT in the text),
scikit-learn's KMeans with explicit per-cluster means, scipy's gaussian_filter, and the official focal and Dice
formulas written out, so that a wrong position, layer, order or constant shows up as a mismatch.

Mutations (42, applied one at a time to the module; each made the named tests fail):
- visual context also replacing at block 1 / kept in the taps / one block short: test_vision_reference (+ predict)
- text context from block 1 / at positions 0..n-1 / cut before the EOT: test_text_reference (+ predict)
- dynamic tokens dropped: test_dynamic_prompts_*; generator fed the normalised embedding: test_predict_*
- no float16 rounding of the contexts: test_fp16_rounding_*
- five templates / '-' kept in the class name: test_class_tokens_*
- prompt embeddings not normalised before the state mean: test_text_*, test_predict_*
- HSF: 4 tokens per cluster / ranked by the normal probability: test_hsf_*; the paper variant taking the least
  anomalous cluster / every patch: test_paper_hsf_*; a plain mean instead of the
  per-cluster weights: test_hsf_cluster_weights_*; k-means unseeded / n_init 10: test_hsf_matches_*,
  test_kmeans_is_seeded_*; alpha swapped / HSF off / no CLS projection / CLS without ln_post / logit scale
  halved: test_predict_*, test_training_outputs_*
- test map from the layer max / align_corners False / no Gaussian / sigma halved / normal probability as the
  score: test_predict_matches_the_reference
- training maps softmaxed before upsampling: test_training_outputs_*
- image focal without smoothing / gamma fixed at 2 / Dice always per image / always per row / without its
  normal-channel term / without smoothing / layer mean instead of sum: test_losses_are_*
- unknown masks counted / image term restricted to known masks: test_losses_row_and_image_*
- position table bilinear: test_position_resize_*; projections without bias: test_parameter_count_*;
  static tokens N(0, 1): test_initialisation_*
Equivalent (no test can tell): the map as p_a instead of (p_a + 1 - p_n) / 2 (equal after a 2-way softmax),
dropping HSF's 1 / C (the fused vector is normalised), the order of the layers in the k-means features
(Euclidean distances do not see it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from scipy.ndimage import gaussian_filter
from sklearn.cluster import KMeans

from moeclip.bench.baselines import method_runs
from moeclip.bench.experiments import load_plan
from moeclip.config import TrainConfig
from moeclip.methods.adaclip import AdaCLIP, AdaCLIPConfig, AdaCLIPOutputs, cluster_weights, hybrid_semantic_fusion
from moeclip.methods.execution import Execution
from moeclip.methods.targets import Targets
from moeclip.training import build_optimizer, train_step

TINY = {
    "backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": False, "precision": "fp32",
    "position_resize": "bicubic", "class_text": "folder", "feature_layers": (1, 3, 4), "prompting_branch": "VL",
    "prompting_type": "SD", "prompting_length": 3, "prompting_depth": 2, "prompt_fp16": True, "use_hsf": True,
    "k_clusters": 4, "hsf_tokens_per_cluster": 5, "hsf_variant": "code", "hsf_alpha": 0.2, "kmeans_seed": 7,
    "logit_scale": 100.0, "sigma": 4.0, "focal_gamma": 2.0, "dice_unit": "row",
}
NAMES = ["metal-nut", "pcb1"]


def tiny_config(**overrides: object) -> AdaCLIPConfig:
    return AdaCLIPConfig.model_validate({**TINY, **overrides})


def tiny_model(**overrides: object) -> AdaCLIP:
    """The tiny method with its prompt tensors drawn large, so that every one of them moves the outputs."""
    model = AdaCLIP.build(tiny_config(**overrides), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "prompts" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if "static" in name else 0.3))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> AdaCLIP:
    return tiny_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


# -- independent references --------------------------------------------------------------------
def contexts(model: AdaCLIP, prompts, embedding: torch.Tensor) -> torch.Tensor:
    """(J, B, n, W): static + one linear per position on the unnormalised CLIP embedding."""
    dynamic = torch.stack([embedding @ head.weight.T + head.bias for head in prompts.dynamic.heads], dim=1)
    return prompts.static[:, None] + dynamic[None]


def vision_reference(model: AdaCLIP, images: torch.Tensor, context: torch.Tensor):
    """Context appended at the end before block 1, the last n replaced before blocks 2..J, dropped from the taps."""
    visual, n = model.clip.visual, model.config.prompting_length
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    tokens = x.shape[1]
    x = torch.cat([x, torch.zeros(x.shape[0], n, x.shape[2])], dim=1)
    taps = []
    for index, block in enumerate(visual.transformer.resblocks):
        if index < context.shape[0]:
            x = x.clone()
            x[:, tokens:] = context[index].half().float()
        x = block(x)
        if index + 1 in model.config.feature_layers:
            taps.append(x[:, 1:tokens])
    return visual.ln_post(x[:, 0]) @ visual.proj, taps


def text_reference(model: AdaCLIP, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(P, D) unit embeddings of one image's prompts: positions 1..n overwritten before blocks 2..J only."""
    clip, n = model.clip, model.config.prompting_length
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for index, block in enumerate(clip.transformer.resblocks):
        if 1 <= index < context.shape[0]:
            x = x.clone()
            x[:, 1:1 + n] = context[index].half().float()
        x = block(x, attn_mask=clip.attn_mask)
    eot = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ clip.text_projection
    return F.normalize(eot, dim=-1)


def hsf_reference(patches: list[torch.Tensor], logits: list[torch.Tensor], k_clusters: int, per_cluster: int,
                  seed: int) -> torch.Tensor:
    """One image: patches / logits per layer (N, D) / (N, 2); top 5k by the mean-logit softmax, k-means on the
    layers' tokens concatenated, each cluster's mean over its members of all layers, the mean of those."""
    probability = torch.stack(logits).mean(dim=0).softmax(dim=-1)[:, 1]
    top = probability.topk(min(len(probability), k_clusters * per_cluster)).indices
    selected = [layer[top] for layer in patches]
    labels = KMeans(n_clusters=k_clusters, n_init=1, random_state=seed).fit_predict(
        torch.cat(selected, dim=1).numpy())
    centres = [torch.cat([layer[torch.as_tensor(labels == c)] for layer in selected]).mean(dim=0)
               for c in range(k_clusters)]
    return F.normalize(torch.stack(centres).mean(dim=0), dim=0)


def reference(model: AdaCLIP, images: torch.Tensor, names: list[str]):
    """(B,) scores, (B, H, W) test maps before the Gaussian and (B, L, 2, H, W) training maps, image by image."""
    config, scores, maps, training = model.config, [], [], []
    grid = model.clip.visual.grid_size
    for image, name in zip(images, names):
        image = image[None]
        embedding = model.clip.visual(image)
        pooled, taps = vision_reference(model, image, contexts(model, model.visual_prompts, embedding))
        prompts = text_reference(model, model._class_tokens(name), contexts(model, model.text_prompts, embedding)[:, 0])
        text = F.normalize(torch.stack([F.normalize(prompts[:28].mean(0), dim=0),
                                        F.normalize(prompts[28:].mean(0), dim=0)]), dim=-1)
        patches = [F.normalize(tap[0] @ p.weight.T + p.bias, dim=-1) for tap, p in zip(taps, model.patch_projections)]
        logits = [100 * patch @ text.T for patch in patches]  # (N, 2) per layer
        cls = F.normalize(pooled[0] @ model.cls_projection.weight.T + model.cls_projection.bias, dim=0)
        fused = hsf_reference(patches, logits, config.k_clusters, config.hsf_tokens_per_cluster, config.kmeans_seed)
        feature = F.normalize(0.2 * fused + 0.8 * cls, dim=0)
        scores.append((100 * feature @ text.T).softmax(dim=0)[1])
        upsampled = [F.interpolate(lg.T.reshape(1, 2, *grid), size=(64, 64), mode="bilinear", align_corners=True)[0]
                     for lg in logits]
        states = torch.stack(upsampled).mean(dim=0).softmax(dim=0)
        maps.append((states[1] + 1 - states[0]) / 2)
        training.append(torch.stack([u.softmax(dim=0) for u in upsampled]))
    return torch.stack(scores), torch.stack(maps), torch.stack(training)


# -- prompts and towers -------------------------------------------------------------------------
def test_class_tokens_are_the_seven_normal_and_five_anomalous_states_in_four_templates(model: AdaCLIP) -> None:
    templates = ["a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
                 "a cropped photo of the {}."]
    normal = ["metal nut", "flawless metal nut", "perfect metal nut", "unblemished metal nut",
              "metal nut without flaw", "metal nut without defect", "metal nut without damage"]
    anomalous = ["damaged metal nut", "broken metal nut", "metal nut with flaw", "metal nut with defect",
                 "metal nut with damage"]
    sentences = [t.format(s) for s in normal for t in templates] + [t.format(s) for s in anomalous for t in templates]
    assert torch.equal(model._class_tokens("metal-nut"), model.tokenizer(sentences))


def test_dynamic_prompts_add_one_linear_per_position_to_the_static_tokens(model: AdaCLIP) -> None:
    embedding = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    for prompts in (model.visual_prompts, model.text_prompts):
        out = prompts(embedding)
        assert out.shape == (2, 3, 3, prompts.static.shape[-1])
        torch.testing.assert_close(out, contexts(model, prompts, embedding))
    static_only = tiny_model(prompting_type="S").visual_prompts
    assert static_only.dynamic is None
    torch.testing.assert_close(static_only(embedding), static_only.static[:, None].expand(-1, 3, -1, -1))
    dynamic_only = tiny_model(prompting_type="D").text_prompts
    assert dynamic_only.static is None
    torch.testing.assert_close(dynamic_only(embedding)[1], dynamic_only(embedding)[0])


def test_fp16_rounding_of_the_contexts_and_of_their_gradients(model: AdaCLIP) -> None:
    value = torch.tensor([1 + 2 ** -12, 3.0])
    assert model._entering(value, torch.float32).tolist() == [1.0, 3.0]
    tokens = torch.zeros(2, requires_grad=True)  # the official .half() rounds the gradient too (compare_adaclip)
    (model._entering(tokens, torch.float32) * value).sum().backward()
    assert tokens.grad.tolist() == [1.0, 3.0]
    assert tiny_model(prompt_fp16=False)._entering(value, torch.float32).tolist() == value.tolist()


def test_vision_reference(model: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        context = contexts(model, model.visual_prompts, model.clip.visual(images))
        pooled, taps = model.encode_image(images, context)
        expected_pooled, expected_taps = vision_reference(model, images, context)
    torch.testing.assert_close(pooled, expected_pooled)
    assert taps.shape == (3, 2, 64, 64)
    torch.testing.assert_close(taps, torch.stack(expected_taps))


def test_text_reference(model: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        context = contexts(model, model.text_prompts, model.clip.visual(images))
        tokens = torch.stack([model._class_tokens(name) for name in NAMES])
        prompts = model.encode_text(tokens, context)
        for b in range(2):
            torch.testing.assert_close(prompts[b], text_reference(model, tokens[b], context[:, b]))


def test_text_features_are_unit_means_of_unit_prompts_per_state(model: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        context = contexts(model, model.text_prompts, model.clip.visual(images))
        tokens = torch.stack([model._class_tokens(name) for name in NAMES])
        prompts = model.encode_text(tokens, context)
        text = model.text_features(NAMES, context)
    expected = F.normalize(torch.stack([prompts[:, :28].mean(1), prompts[:, 28:].mean(1)], dim=1), dim=-1)
    torch.testing.assert_close(text, expected)
    assert not torch.allclose(text[0], text[1])  # each image has its own text (its dynamic tokens)


def test_text_without_prompts_is_fixed_and_cached(images: torch.Tensor) -> None:
    model = tiny_model(prompting_branch="V")
    assert model.text_prompts is None
    with torch.no_grad():
        first = model.text_features(NAMES, None)
        assert set(model._text_cache) == set(NAMES)
        torch.testing.assert_close(model.text_features(NAMES[::-1], None), first.flip(0))


# -- HSF and the scores ---------------------------------------------------------------------------
def test_hsf_cluster_weights_are_one_over_clusters_times_size() -> None:
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]])
    weights = cluster_weights(points, 2, seed=0)
    torch.testing.assert_close(weights, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    # duplicates leave a cluster empty: the mean runs over the non-empty ones
    duplicates = torch.tensor([[1.0, 1.0]] * 3 + [[2.0, 2.0]])
    with pytest.warns(Warning):
        torch.testing.assert_close(cluster_weights(duplicates, 3, seed=0).sum(), torch.tensor(1.0))


def test_hsf_matches_the_per_cluster_reference() -> None:
    generator = torch.Generator().manual_seed(4)
    patches = F.normalize(torch.randn(2, 3, 40, 8, generator=generator), dim=-1)
    logits = torch.randn(2, 3, 2, 40, generator=generator) * 3
    config = tiny_config(k_clusters=3, hsf_tokens_per_cluster=4)
    fused = hybrid_semantic_fusion(patches, logits, config)
    for b in range(2):
        expected = hsf_reference(list(patches[b]), list(logits[b].transpose(1, 2)), 3, 4, config.kmeans_seed)
        torch.testing.assert_close(fused[b], expected)


def test_paper_hsf_is_the_centroid_of_the_most_anomalous_cluster_of_all_patches() -> None:
    generator = torch.Generator().manual_seed(9)
    patches = F.normalize(torch.randn(2, 3, 40, 8, generator=generator), dim=-1)
    logits = torch.randn(2, 3, 2, 40, generator=generator) * 3
    config = tiny_config(k_clusters=3, hsf_variant="paper")
    fused = hybrid_semantic_fusion(patches, logits, config)
    for b in range(2):
        tokens = patches[b].mean(dim=0)
        probability = logits[b].mean(dim=0).softmax(dim=0)[1]
        labels = KMeans(n_clusters=3, n_init=1, random_state=config.kmeans_seed).fit_predict(tokens.numpy())
        best = max(range(3), key=lambda c: probability[torch.as_tensor(labels == c)].mean().item())
        torch.testing.assert_close(fused[b], F.normalize(tokens[torch.as_tensor(labels == best)].mean(dim=0), dim=0))
    assert not torch.allclose(fused, hybrid_semantic_fusion(patches, logits, tiny_config(k_clusters=3)))


def test_hsf_uses_only_the_k_clusters_times_five_most_anomalous_patches() -> None:
    generator = torch.Generator().manual_seed(5)
    patches = F.normalize(torch.randn(1, 2, 30, 8, generator=generator), dim=-1)
    logits = torch.zeros(1, 2, 2, 30)
    logits[:, :, 1] = torch.arange(30.0) / 10  # patch i is the (30 - i)-th most anomalous (no ties)
    config = tiny_config(k_clusters=2, hsf_tokens_per_cluster=5)
    fused = hybrid_semantic_fusion(patches, logits, config)
    changed = patches.clone()
    changed[:, :, 19] = F.normalize(torch.randn(2, 8, generator=generator), dim=-1)  # outside the top 10
    torch.testing.assert_close(hybrid_semantic_fusion(changed, logits, config), fused)
    changed[:, :, 20] = changed[:, :, 19]  # inside
    assert not torch.allclose(hybrid_semantic_fusion(changed, logits, config), fused)


def test_predict_matches_the_reference(model: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        maps, scores = model.predict(images, NAMES, "industrial")
        expected_scores, expected_maps, _ = reference(model, images, NAMES)
    torch.testing.assert_close(scores, expected_scores)
    smoothed = np.stack([gaussian_filter(m.numpy(), sigma=4.0) for m in expected_maps])
    np.testing.assert_allclose(maps.numpy(), smoothed, atol=1e-5)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)


def test_training_outputs_are_the_per_layer_upsampled_softmax(model: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        outputs = model.training_outputs(images, NAMES)
        scores, _, expected = reference(model, images, NAMES)
    torch.testing.assert_close(outputs.layer_maps, expected)
    torch.testing.assert_close(outputs.image_probabilities[:, 1], scores)


def test_kmeans_is_seeded_batch_independent_and_leaves_global_rngs_alone(model: AdaCLIP, images: torch.Tensor) -> None:
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    with torch.no_grad():
        _, pair = model.predict(images, NAMES, "industrial")
        _, alone = model.predict(images[1:], NAMES[1:], "industrial")
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()
    assert pair[1].item() == pytest.approx(alone[0].item(), abs=1e-6)  # the same clustering; matmuls round by batch
    points = torch.randn(60, 4, generator=torch.Generator().manual_seed(6))
    for seed in (0, 1):
        labels = KMeans(n_clusters=5, n_init=1, random_state=seed).fit_predict(points.numpy())
        sizes = np.bincount(labels, minlength=5)
        np.testing.assert_allclose(cluster_weights(points, 5, seed).numpy(), 1 / (5 * sizes[labels]), rtol=1e-6)


# -- losses ---------------------------------------------------------------------------------------
def written_out_focal(probs: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """The official FocalLoss: one-hot clamped to [1e-5, 1 - 1e-5], p_t + 1e-5, mean of -(1 - p_t)^gamma log p_t."""
    one_hot = torch.stack([1 - target, target], dim=1).clamp(1e-5, 1 - 1e-5)
    pt = (one_hot * probs).sum(dim=1) + 1e-5
    return (-(1 - pt) ** gamma * pt.log()).mean()


def written_out_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official BinaryDiceLoss over the first axis: mean over its entries of 1 - (2 sum + 1) / (sums + 1)."""
    pred, target = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    return (1 - (2 * (pred * target).sum(1) + 1) / (pred.sum(1) + target.sum(1) + 1)).mean()


def loss_inputs() -> tuple:
    generator = torch.Generator().manual_seed(8)
    layer_maps = torch.randn(2, 3, 2, 6, 5, generator=generator).softmax(dim=2)
    probabilities = torch.tensor([[0.7, 0.3], [0.99, 0.01]])  # the second is sure and wrong: the smoothing shows
    masks = torch.zeros(2, 6, 5)
    masks[1, 1:4, 2:5] = 1
    return layer_maps, probabilities, masks, torch.tensor([0, 1])


@pytest.mark.parametrize(("unit", "gamma"), [("row", 2.0), ("image", 3.0)])
def test_losses_are_image_focal_plus_per_layer_focal_and_two_dice(unit: str, gamma: float) -> None:
    layer_maps, probabilities, masks, labels = loss_inputs()
    model = tiny_model(dice_unit=unit, focal_gamma=gamma)
    losses = model.training_losses(AdaCLIPOutputs(probabilities, layer_maps),
                                   Targets(masks, labels, torch.tensor([True, True])))
    image = written_out_focal(probabilities, labels.float(), gamma)
    per_image = []
    for b in range(2):
        gt = masks[b] if unit == "row" else masks[b][None]  # the official batch-1 squeeze: rows are the samples
        total = 0
        for am in layer_maps[b]:
            a, n = (am[1], am[0]) if unit == "row" else (am[1][None], am[0][None])
            total = total + written_out_focal(am.flatten(1).T, masks[b].flatten(), gamma) + written_out_dice(a, gt) + \
                written_out_dice(n, 1 - gt)
        per_image.append(total)
    torch.testing.assert_close(losses["image_loss"], image)
    torch.testing.assert_close(losses["loss"], image + torch.stack(per_image).mean())
    assert losses["loss"].item() == pytest.approx(losses["image_loss"].item() + losses["focal_loss"].item()
                                                  + losses["dice_loss"].item(), rel=1e-6)


def test_losses_row_and_image_dice_differ_and_unknown_masks_train_only_the_image_term() -> None:
    layer_maps, probabilities, masks, labels = loss_inputs()
    outputs = AdaCLIPOutputs(probabilities, layer_maps)
    rows = tiny_model().training_losses(outputs, Targets(masks, labels, torch.tensor([True, True])))
    whole = tiny_model(dice_unit="image").training_losses(outputs, Targets(masks, labels, torch.tensor([True, True])))
    assert abs(rows["dice_loss"].item() - whole["dice_loss"].item()) > 1e-3
    one = tiny_model().training_losses(outputs, Targets(masks, labels, torch.tensor([False, True])))
    only = tiny_model().training_losses(AdaCLIPOutputs(probabilities[1:], layer_maps[1:]),
                                        Targets(masks[1:], labels[1:], torch.tensor([True])))
    torch.testing.assert_close(one["segmentation_loss"], only["segmentation_loss"])
    torch.testing.assert_close(one["image_loss"], rows["image_loss"])


def test_one_generic_training_step_moves_every_trainable_tensor(images: torch.Tensor) -> None:
    model = AdaCLIP.build(tiny_config(), seed=0)
    train = TrainConfig(epochs=1, batch_size=2, lr=0.01, betas=(0.5, 0.999), weight_decay=0.0, milestones=(),
                        gamma=0.5, seed=0, augment=False, num_workers=0, checkpoint_every=10, max_steps=None)
    optimizer, scheduler = build_optimizer(model, train, torch.device("cpu"))
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    masks = torch.zeros(2, 1, 64, 64)
    masks[1, :, 8:30, 16:40] = 1
    batch = {"image": images, "mask": masks, "label": torch.tensor([0, 1]), "has_mask": [True, True],
             "class_name": NAMES, "description": ["a", "b"]}
    losses = train_step(model, optimizer, scheduler, batch, torch.device("cpu"), Execution())
    assert set(losses) == {"loss", "image_loss", "segmentation_loss", "focal_loss", "dice_loss"}
    assert np.isfinite(losses["loss"])
    moved = {name for name, param in model.named_parameters() if param.requires_grad
             and not torch.equal(param, before[name])}
    assert moved == set(before)
    assert torch.equal(model.text_prompts.static[0], before["text_prompts.static"][0])  # block 1 never sees it
    assert not torch.equal(model.text_prompts.static[1], before["text_prompts.static"][1])
    assert all(not param.requires_grad for param in model.clip.parameters())


# -- backbone, sizes, configuration -------------------------------------------------------------
def test_initialisation_static_tokens_n_0_002_and_pytorch_linears() -> None:
    model = AdaCLIP.build(tiny_config(), seed=0)
    for prompts in (model.visual_prompts, model.text_prompts):
        assert 0.015 < prompts.static.std().item() < 0.025 and abs(prompts.static.mean().item()) < 0.005
        for head in prompts.dynamic.heads:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert head.weight.abs().max() <= 32 ** -0.5 and head.weight.std() > 0.5 * 32 ** -0.5 / 3 ** 0.5


def test_position_resize_is_bicubic_without_antialias_from_the_native_grid() -> None:
    native = AdaCLIP.build(tiny_config(), seed=0).clip.visual.positional_embedding
    resized = AdaCLIP.build(tiny_config(image_size=80), seed=0).clip.visual
    grid = native[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized.positional_embedding[1:], expected.flatten(2)[0].T)
    torch.testing.assert_close(resized.positional_embedding[0], native[0])


def test_parameter_count_at_vit_l_14_336_is_the_official_10_665_472() -> None:
    config = tiny_config(backbone="ViT-L-14-336", image_size=518, feature_layers=(6, 12, 18, 24), prompting_length=5,
                         prompting_depth=4, k_clusters=20)
    counts = AdaCLIP.count_parameters(config)
    prompts = 4 * 5 * (1024 + 768)
    generators = 5 * (768 * 1024 + 1024) + 5 * (768 * 768 + 768)
    projections = 4 * (1024 * 768 + 768) + 768 * 768 + 768
    assert counts["trainable"] == counts["added"] == prompts + generators + projections == 10_665_472
    assert counts["total"] == 439_421_697


def test_config_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        tiny_config(feature_layers=(3, 1))
    with pytest.raises(ValidationError):
        AdaCLIPConfig.model_validate({k: v for k, v in TINY.items() if k != "kmeans_seed"})
    with pytest.raises(ValidationError):
        tiny_config(prompting_type="X")
    with pytest.raises(ValueError, match="prompting_depth 3 exceeds the 2 blocks"):
        AdaCLIP.build(tiny_config(prompting_depth=3), seed=0)
    with pytest.raises(ValueError, match="too few patches"):
        AdaCLIP.build(tiny_config(k_clusters=65), seed=0)
    with pytest.raises(ValueError, match="blocks"):
        AdaCLIP.build(tiny_config(feature_layers=(5,)), seed=0)


def test_bf16_autocast_stays_close_to_fp32(model: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        maps, scores = model.predict(images, NAMES, "industrial")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_maps, fast_scores = model.predict(images, NAMES, "industrial")
            outputs = model.training_outputs(images, NAMES)
    assert fast_maps.dtype == fast_scores.dtype == outputs.layer_maps.dtype == torch.float32
    torch.testing.assert_close(fast_maps, maps, atol=0.05, rtol=0)
    torch.testing.assert_close(fast_scores, scores, atol=0.05, rtol=0)


def test_the_official_adamw_decay_shrinks_each_weight_before_its_adam_step() -> None:
    """AdaCLIP's AdamW (decay 0.01, paper profile): the first step is p (1 - lr wd) - lr g / (|g| + eps); with no
    decay the optimiser is plain Adam, as every other method trains."""
    model = AdaCLIP.build(tiny_config(), seed=0)
    decayed = TrainConfig(epochs=1, batch_size=1, lr=0.01, betas=(0.5, 0.999), weight_decay=0.01, milestones=(),
                          gamma=1.0, seed=0, augment=False, num_workers=0, checkpoint_every=10, max_steps=None)
    optimizer, _ = build_optimizer(model, decayed, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    param = next(p for p in model.parameters() if p.requires_grad)
    before = param.detach().clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) if p is param else None
    optimizer.step()
    torch.testing.assert_close(param.detach(), before * (1 - 0.01 * 0.01) - 0.01 * 0.5 / (0.5 + 1e-8))
    plain, _ = build_optimizer(model, decayed.model_copy(update={"weight_decay": 0.0}), torch.device("cpu"))
    assert type(plain) is torch.optim.Adam


def test_the_paper_profile_trains_adaclip_with_its_adamw_decay() -> None:
    benchmark, paper = load_plan(Path(__file__).resolve().parents[1] / "params.yaml", "paper")
    assert {run.train.weight_decay for run in method_runs(benchmark, paper, "adaclip")} == {0.01}
    assert paper.train.weight_decay == 0.0  # MoECLIP and the other methods: Adam
