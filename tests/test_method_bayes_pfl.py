"""Bayes-PFL (moeclip/methods/bayes_pfl.py) against closed-form values and straightforward reference computations of
the official code's rules, on the tiny random-weight ViT (4 blocks, width 64, embedding 32, 8x8 grid at 64 px).

Mutation checks (each applied alone to the module; the first test that fails):
  feature taps one block late (`index + 1 in layers`)           -> test_vision_taps_raw_block_outputs
  EOS row one too far (`+ length` instead of `+ length - 1`)      -> test_text_embeddings_match_per_sequence_reference
  normal / anomalous state vectors swapped                        -> test_text_embeddings_match_per_sequence_reference
  context sample of another image                                 -> test_text_embeddings_match_per_sequence_reference
  test_samples ignored (fixed 10)                                 -> test_text_embeddings_match_per_sequence_reference
  class renaming dropped (the folder name as it is)               -> test_class_names_are_renamed_and_lower_cased
  log-det epsilon 1e-5 -> 1e-8                                    -> test_planar_flows_closed_form
  tanh' as (1 - a) instead of (1 - a^2)                           -> test_planar_flows_closed_form
  variance exp(h) instead of exp(h / 2)                           -> test_gaussian_encoder_variance_and_draw
  state KL without the per-image repetition                       -> test_kl_of_an_image_agnostic_sample
  KL log-det not subtracted                                       -> test_kl_of_image_specific_samples
  kl_weight / orthogonal_weight ignored                           -> test_total_loss_weights_each_term
  Dice on the normal channel against 1 - mask                     -> test_total_loss_weights_each_term
  orthogonality diagonal kept                                     -> test_orthogonality_loss
  focal not class-balanced (plain mean) / gamma fixed at 2        -> test_balanced_focal_loss
  Dice epsilon 1e-5 -> 1e-12                                      -> test_batch_dice_loss
  RCA scaled by the head width / residual dropped                 -> test_residual_cross_attention
  upsampling with align_corners False                             -> test_map_logits_upsample_with_aligned_corners
  class mapping skipped in the image logits                       -> test_image_logits
  test score: sum instead of mean / normal channel                -> test_predict_matches_reference_means
  sample_seed ignored / test noise from the global RNG            -> test_test_noise_is_seeded_and_leaves_the_global_rng
  context noise differing with the batch position                 -> test_an_images_numbers_do_not_depend_on_its_batch
  score_alpha and 1 - alpha swapped / top-k -> max / sigma fixed /
  medical sets fused like industrial ones                         -> test_protocol_scores_industrial_and_medical
  flow and temperature learning-rate multipliers swapped          -> test_optimiser_groups_and_learning_rates
  training draws in another order / prompt index fixed at 0       -> test_training_draws_in_the_official_order
  samples with unknown masks in the segmentation terms            -> test_samples_with_unknown_masks_only_train_the_rest
  prompt bank means swapped / RCA query re-initialised N(0, 0.02) /
  state flow u scaled to 0.02 N(0, 1)                             -> test_initialisation
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from moeclip.config import TrainConfig
from moeclip.methods.anomalyclip import gaussian_blur
from moeclip.methods.bayes_pfl import (BayesPFL, BayesPFLConfig, FlowSample, GaussianEncoder, ResidualCrossAttention,
                                       balanced_focal_loss, batch_dice_loss, orthogonality_loss, planar_flows)
from moeclip.methods.execution import Execution
from moeclip.methods.targets import Targets
from moeclip.training import build_optimizer, train_step

TINY = {"backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": False, "precision": "fp32",
        "feature_layers": (1, 3, 4), "prompt_num": 3, "context_length": 5, "state_length": 5, "num_flows": 3,
        "test_samples": 3, "sample_seed": 333, "rca_heads": 4, "initial_temperature": 0.07, "kl_weight": 0.01,
        "orthogonal_weight": 1.0, "focal_gamma": 2.0, "sigma": 1.0, "score_alpha": 0.5, "topk": 31,
        "lr_scale_prompts": 10.0, "lr_scale_flows": 10.0, "lr_scale_temperatures": 100.0}
PAPER = {**TINY, "backbone": "ViT-L-14-336", "image_size": 518, "weights": "openai",
         "feature_layers": (6, 12, 18, 24), "num_flows": 10, "test_samples": 10}
NAMES = ["pcb1", "bottle"]


def config(**overrides: object) -> BayesPFLConfig:
    return BayesPFLConfig.model_validate({**TINY, **overrides})


@pytest.fixture(scope="module")
def model() -> BayesPFL:
    return BayesPFL.build(config(), seed=0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def targets() -> Targets:
    masks = torch.zeros(2, 64, 64)
    masks[1, 10:30, 20:40] = 1
    return Targets(masks, torch.tensor([0, 1]), torch.tensor([True, True]))


# -- configuration and size ------------------------------------------------------------------------
def test_config_has_no_defaults_and_names_bad_values_in_one_line() -> None:
    with pytest.raises(ValidationError, match="sample_seed"):
        BayesPFLConfig.model_validate({k: v for k, v in TINY.items() if k != "sample_seed"})
    with pytest.raises(ValidationError, match="feature_layers must name"):
        config(feature_layers=())
    with pytest.raises(ValueError, match="MoECLIP-Tiny-ViT has 4 blocks"):
        BayesPFL.build(config(feature_layers=(2, 5)))
    with pytest.raises(ValueError, match="rca_heads 3 must divide the embedding width 32"):
        BayesPFL.build(config(rca_heads=3))


def test_paper_parameter_count_is_the_official_stage_one_count() -> None:
    """The official Context_Prompting at ViT-L-14-336 has 27,370,017 parameters; without the modules stage 1
    never trains (2 decoders 2 x 1,050,368, 3 p_mu 3 x 590,592, fuse 2,492,161, image_mapping 590,592) 20,414,752."""
    counts = BayesPFL.count_parameters(BayesPFLConfig.model_validate(PAPER))
    assert counts["trainable"] == counts["added"] == 27_370_017 - 2 * 1_050_368 - 4 * 590_592 - 2_492_161 \
        == 20_414_752
    assert counts["total"] == 449_170_977


def test_initialisation(model: BayesPFL) -> None:
    bank = model.prompts
    assert abs(bank.context.mean().item()) < 0.01 and abs(bank.normal.mean().item() - 0.5) < 0.01
    assert abs(bank.anomalous.mean().item() + 0.5) < 0.01 and bank.normal.std().item() < 0.03
    assert model.temperatures["pixel"].item() == model.temperatures["image"].item() == pytest.approx(math.log(1 / 0.07))
    for linear in (model.class_mapping, model.context_flow.u, model.state_encoder.mean[2], model.rca.projections[0]):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.3)
        assert linear.bias is None or not linear.bias.any()
    assert model.rca.query.bias.abs().max() > 0  # the 1x1 conv keeps PyTorch's init
    assert model.normal_flow.u.std().item() > 0.5  # torch.randn


def test_optimiser_groups_and_learning_rates(model: BayesPFL) -> None:
    train = TrainConfig(epochs=1, batch_size=2, lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0, milestones=(), gamma=1.0, seed=0,
                        augment=False, num_workers=0, checkpoint_every=10, max_steps=None)
    optimizer, _ = build_optimizer(model, train, torch.device("cpu"))
    groups = [(len(group["params"]), group["lr"]) for group in optimizer.param_groups]
    assert groups[:3] == [(3, pytest.approx(1e-3)), (2, pytest.approx(1e-2)), (6 + 2 * 4, pytest.approx(1e-3))]
    assert groups[3][1] == pytest.approx(1e-4)
    assert sum(n for n, _ in groups) == len([p for p in model.parameters() if p.requires_grad])


# -- vision and text -------------------------------------------------------------------------------
def test_vision_taps_raw_block_outputs(model: BayesPFL, images: torch.Tensor) -> None:
    captured = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for block in model.clip.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            pooled = model.clip.visual(images)
    finally:
        for hook in hooks:
            hook.remove()
    vision = model.encode_image(images)
    torch.testing.assert_close(vision.global_embedding, pooled)
    torch.testing.assert_close(vision.tokens, torch.stack([captured[i - 1][:, 1:] for i in (1, 3, 4)]))


def test_class_names_are_renamed_and_lower_cased(model: BayesPFL) -> None:
    tokens = model.class_tokens(["pcb3", "metal_nut", "Bottle", "pipe_fryum"], torch.device("cpu"))
    expected = model.tokenizer(["X printed circuit board", "X metal nut", "X bottle", "X pipe fryum"])
    assert torch.equal(tokens, expected)


def reference_sequence(model: BayesPFL, name: str, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One prompt through the text tower: [SOS] context state <rest of "X name">, EOS row projected, unit."""
    clip = model.clip
    tokens = model.tokenizer([f"X {name}"])[0]
    embedded = clip.token_embedding(tokens)
    n = context.shape[0] + state.shape[0]
    x = torch.cat([embedded[:1], context, state, embedded[2:77 - n + 1]])[None] + clip.positional_embedding
    for block in clip.transformer.resblocks:
        x = block(x, attn_mask=clip.attn_mask)
    eos = int(tokens.argmax()) + n - 1
    return F.normalize(clip.ln_final(x)[0, eos] @ clip.text_projection, dim=-1)


def test_text_embeddings_match_per_sequence_reference(model: BayesPFL, images: torch.Tensor) -> None:
    with torch.no_grad():
        vision = model.encode_image(images)
        samples = model.sample(vision.global_embedding, model.test_noise(torch.device("cpu")))
        text = model.text_embeddings(NAMES, samples)  # (N, S, B, 2, D)
        assert text.shape == (2, 3, 3, 2, 32)
        bank, names = model.prompts, ["printed circuit board", "bottle"]
        for n, s, b in ((0, 0, 0), (1, 2, 1), (1, 1, 2)):
            context = bank.context[b] + samples.context.zk[s, n]
            for k, (states, flow) in enumerate(((bank.normal, samples.normal), (bank.anomalous, samples.anomalous))):
                expected = reference_sequence(model, names[n], context, states[b] + flow.zk[s, 0])
                torch.testing.assert_close(text[n, s, b, k], expected, atol=2e-6, rtol=1e-5)


# -- distributions ---------------------------------------------------------------------------------
def test_planar_flows_closed_form() -> None:
    z = torch.tensor([[[1.0, 0.0]]])
    u = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]])
    w = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    b = torch.tensor([[0.1, -0.2]])
    out, log_det = planar_flows(z, u, w, b)
    a1 = math.tanh(0.6)
    z1 = [1 + a1, 2 * a1]
    a2 = math.tanh(z1[0] - 0.2)
    expected = [z1[0] + 0.5 * a2, z1[1] - a2]
    expected_log_det = math.log(1 + (1 - a1 ** 2) * 1.5 + 1e-5) + math.log(abs(1 + (1 - a2 ** 2) * 0.5) + 1e-5)
    torch.testing.assert_close(out, torch.tensor([[expected]]))
    torch.testing.assert_close(log_det, torch.tensor([[expected_log_det]]))


def test_planar_flow_at_a_singular_point() -> None:
    """w.z + b = 0 and u.w = -1: |1 + u.w tanh'| = 0, so the log-det is log(1e-5)."""
    _, log_det = planar_flows(torch.zeros(1, 1, 2), torch.tensor([[[-1.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]]),
                              torch.zeros(1, 1))
    assert log_det.item() == pytest.approx(math.log(1e-5), rel=1e-6)


def test_gaussian_encoder_variance_and_draw() -> None:
    encoder = GaussianEncoder(2, 3, 2)
    with torch.no_grad():
        for mlp, bias in ((encoder.mean, 0.25), (encoder.log_variance, 2.0)):
            mlp[4].weight.zero_()
            mlp[4].bias.fill_(bias)
    mean, variance = encoder(torch.randn(1, 2))
    torch.testing.assert_close(variance, torch.full((1, 2), math.e))
    flow = BayesPFL.build(config(), seed=0).context_flow
    with torch.no_grad():
        for param in flow.u.parameters():  # u = 0: the flows are the identity
            param.zero_()
        for mlp, bias in ((flow.encoder.mean, 0.25), (flow.encoder.log_variance, 2.0)):
            mlp[4].weight.zero_()
            mlp[4].bias.fill_(bias)
    noise = torch.tensor([1.0, -2.0]).repeat(32)[None, None]
    sample = flow(torch.randn(1, 32), noise)
    torch.testing.assert_close(sample.zk, 0.25 + math.exp(0.5) * noise)


def test_kl_of_image_specific_samples() -> None:
    z0, zk = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    mean, variance = torch.tensor([[0.5, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 4.0], [2.0, 0.5]])
    log_det = torch.tensor([[0.3, -0.1]])
    log_q = -0.5 * (torch.log(variance) + (z0[0] - mean) ** 2 / variance).sum(dim=1)
    log_p = -0.5 * (zk[0] ** 2).sum(dim=1)
    expected = ((log_q - log_p).sum() - 0.2) / 2
    torch.testing.assert_close(FlowSample(z0, zk, log_det, mean, variance).kl(2), expected)


def test_kl_of_an_image_agnostic_sample() -> None:
    """One state sample, a batch of 3: (3 (log q - log p) - log|det|) / 3, as loss.py's broadcast computes."""
    z0, zk = torch.tensor([[[1.0, -1.0]]]), torch.tensor([[[0.5, 2.0]]])
    mean, variance = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 2.0]])
    log_q = -0.5 * (2 * math.log(2) + 1.0)
    log_p = -0.5 * (0.25 + 4.0)
    kl = FlowSample(z0, zk, torch.tensor([[0.6]]), mean, variance).kl(3)
    assert kl.item() == pytest.approx((3 * (log_q - log_p) - 0.6) / 3)


# -- the rest of the network -----------------------------------------------------------------------
def test_residual_cross_attention() -> None:
    torch.manual_seed(0)
    rca = ResidualCrossAttention(vision_width=6, embed=4, heads=2, layers=2)
    text = F.normalize(torch.randn(1, 3, 4), dim=-1)
    tokens = torch.randn(1, 5, 6)
    updated, patches = rca(text, tokens, 1)
    expected_patches = F.normalize(tokens @ rca.projections[1].weight.T, dim=-1)
    query = text @ rca.query.weight.T + rca.query.bias
    heads = []
    for h in (slice(0, 2), slice(2, 4)):
        weights = (query[0, :, h] @ expected_patches[0, :, h].T * 4 ** -0.5).softmax(dim=-1)
        heads.append(weights @ expected_patches[0, :, h])
    torch.testing.assert_close(patches, expected_patches)
    torch.testing.assert_close(updated[0], F.normalize(torch.cat(heads, dim=1) + text[0], dim=-1))


def test_image_logits(model: BayesPFL) -> None:
    text = F.normalize(torch.randn(2, 3, 2, 32), dim=-1)
    image = torch.randn(2, 32)
    mapped = F.normalize(text @ model.class_mapping.weight.T + model.class_mapping.bias, dim=-1)
    expected = math.exp(model.temperatures["image"].item()) * torch.einsum("ntsd,nd->nts", mapped,
                                                                          F.normalize(image, dim=-1))
    torch.testing.assert_close(model.image_logits(text, image), expected, rtol=1e-5, atol=1e-5)


def test_map_logits_upsample_with_aligned_corners(model: BayesPFL, images: torch.Tensor) -> None:
    text = F.normalize(torch.randn(2, 1, 2, 32), dim=-1)
    tokens = model.encode_image(images).tokens[2]
    updated, patches = model.rca(text.flatten(1, 2), tokens, 2)
    logits = math.exp(model.temperatures["pixel"].item()) * patches @ updated.transpose(1, 2)
    grid = logits.transpose(1, 2).reshape(2, 2, 8, 8)
    expected = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(model.map_logits(text, tokens, 2, 64)[:, 0], expected, rtol=1e-5, atol=1e-5)


# -- test time -------------------------------------------------------------------------------------
def test_test_noise_is_seeded_and_leaves_the_global_rng(model: BayesPFL, images: torch.Tensor) -> None:
    noise = model.test_noise(torch.device("cpu"))
    stream = torch.randn(3, 3, 1, 64, generator=torch.Generator().manual_seed(333))
    for drawn, expected in zip(noise, stream):  # context, normal, anomalous: the official order
        assert torch.equal(drawn, expected)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = model.predict(images, NAMES, "industrial")
        second = model.predict(images, NAMES, "industrial")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = BayesPFL.build(config(sample_seed=334), seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(other.predict(images, NAMES, "industrial")[1], first[1])


def test_an_images_numbers_do_not_depend_on_its_batch(model: BayesPFL, images: torch.Tensor) -> None:
    with torch.no_grad():
        maps, scores = model.predict(images, NAMES, "industrial")
        alone = model.predict(images[1:], NAMES[1:], "industrial")
    torch.testing.assert_close(alone[0][0], maps[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[1][0], scores[1], rtol=1e-5, atol=1e-6)


def test_predict_matches_reference_means(model: BayesPFL, images: torch.Tensor) -> None:
    """Score: mean over the R x B pairs of softmax([normal, anomalous])[anomalous]; map: the same mean over the
    feature layers too (test.py)."""
    with torch.no_grad():
        vision = model.encode_image(images)
        samples = model.sample(vision.global_embedding, model.test_noise(torch.device("cpu")))
        text = model.text_embeddings(NAMES, samples)
        score_terms, map_terms = [], []
        for s in range(3):
            for b in range(3):
                pair = text[:, s, b][:, None]
                score_terms.append(model.image_logits(pair, vision.global_embedding)[:, 0].softmax(-1)[:, 1])
                for layer in range(3):
                    logits = model.map_logits(pair, vision.tokens[layer], layer, 64)[:, 0]
                    map_terms.append(logits.softmax(dim=1)[:, 1])
        maps, scores = model.predict(images, NAMES, "industrial")
    assert len(score_terms) == 9 and len(map_terms) == 27
    torch.testing.assert_close(scores, torch.stack(score_terms).mean(0))
    torch.testing.assert_close(maps, torch.stack(map_terms).mean(0))


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_protocol_scores_industrial_and_medical(alpha: float) -> None:
    model = BayesPFL.build(config(score_alpha=alpha), seed=0)
    maps = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    scores = torch.tensor([0.2, 0.6, 0.4])
    smoothed, final = model.protocol_scores(maps, scores, "industrial")
    torch.testing.assert_close(smoothed, gaussian_blur(maps, 1.0))
    peak = maps.flatten(1).sort(dim=1, descending=True).values[:, :31].mean(dim=1)
    peak = (peak - peak.min()) / (peak.max() - peak.min())
    torch.testing.assert_close(final, alpha * torch.tensor([0.0, 1.0, 0.5]) + (1 - alpha) * peak)
    _, medical = model.protocol_scores(maps, scores, "medical")
    torch.testing.assert_close(medical, torch.tensor([0.0, 1.0, 0.5]))


# -- training --------------------------------------------------------------------------------------
def test_balanced_focal_loss() -> None:
    anomalous = torch.tensor([[[0.8, 0.3], [0.1, 0.5]]])
    probs = torch.stack([1 - anomalous, anomalous], dim=1)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    term = [-(1 - p) ** 3 * math.log(p + 1e-8) for p in (0.8, 0.7, 0.9, 0.5)]
    expected = term[0] / (1 + 1e-8) + sum(term[1:]) / (3 + 1e-8)
    assert balanced_focal_loss(probs, mask, gamma=3.0).item() == pytest.approx(expected, rel=1e-6)


def test_batch_dice_loss() -> None:
    anomalous = torch.tensor([[[0.8, 0.3], [0.1, 0.5]], [[0.2, 0.2], [0.2, 0.2]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    expected = 1 - (2 * (0.8 + 0.2) + 1e-5) / (2.5 + 2 + 1e-5)
    assert batch_dice_loss(anomalous, mask).item() == pytest.approx(expected, rel=1e-6)


def test_orthogonality_loss() -> None:
    """B = 2: normal prompts identical (cos^2 = 1 twice of 4 entries), anomalous orthogonal: 0.5 + 0."""
    e = torch.eye(4)
    text = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[0], e[2]])])[None]  # (1, B, 2, D)
    assert orthogonality_loss(text).item() == pytest.approx(0.5)
    assert orthogonality_loss(torch.stack([torch.stack([e[0], e[2]]), torch.stack([e[1], e[3]])])[None]) == 0


def test_training_draws_in_the_official_order(model: BayesPFL, images: torch.Tensor) -> None:
    """Context noise (1, N, W), normal (1, 1, W), anomalous (1, 1, W), then the prompt index, all global RNG."""
    for seed in (0, 3, 5):
        torch.manual_seed(seed)
        noise = [torch.randn(1, 2, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64)]
        index = int(torch.randint(0, 3, (1,)))
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs = model.training_outputs(images, NAMES)
            vision = model.encode_image(images)
            expected = model.sample(vision.global_embedding, noise)
        for got, want in ((outputs.samples.context, expected.context), (outputs.samples.normal, expected.normal),
                          (outputs.samples.anomalous, expected.anomalous)):
            torch.testing.assert_close(got.zk, want.zk)
        logits = model.image_logits(outputs.text[:, index:index + 1], vision.global_embedding)[:, 0]
        torch.testing.assert_close(outputs.image_logits, logits)


def test_total_loss_weights_each_term(images: torch.Tensor) -> None:
    weighted = BayesPFL.build(config(kl_weight=0.5, orthogonal_weight=2.0, focal_gamma=3.0), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = weighted.training_outputs(images, NAMES)
        losses = weighted.training_losses(outputs, targets())
    probs, masks = outputs.probabilities, targets().masks
    assert probs.shape == (2, 3, 2, 64, 64)
    torch.testing.assert_close(losses["image_loss"], F.cross_entropy(outputs.image_logits, targets().labels))
    torch.testing.assert_close(losses["focal_loss"], sum(balanced_focal_loss(probs[:, i], masks, 3.0)
                                                         for i in range(3)))
    torch.testing.assert_close(losses["dice_loss"], sum(batch_dice_loss(probs[:, i, 1], masks) for i in range(3)))
    samples = outputs.samples
    torch.testing.assert_close(losses["kl_loss"], samples.context.kl(2) + samples.normal.kl(2)
                               + samples.anomalous.kl(2))
    torch.testing.assert_close(losses["orthogonal_loss"], orthogonality_loss(outputs.text))
    torch.testing.assert_close(losses["loss"], losses["image_loss"] + losses["focal_loss"] + losses["dice_loss"]
                               + 0.5 * losses["kl_loss"] + 2.0 * losses["orthogonal_loss"])


def test_samples_with_unknown_masks_only_train_the_rest(model: BayesPFL, images: torch.Tensor) -> None:
    masks, labels = targets().masks, targets().labels
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = model.training_outputs(images, NAMES)
        mixed = model.training_losses(outputs, Targets(masks, labels, torch.tensor([False, True])))
        none = model.training_losses(outputs, Targets(masks, labels, torch.tensor([False, False])))
    probs = outputs.probabilities[1:]
    torch.testing.assert_close(mixed["dice_loss"], sum(batch_dice_loss(probs[:, i, 1], masks[1:]) for i in range(3)))
    torch.testing.assert_close(mixed["focal_loss"], sum(balanced_focal_loss(probs[:, i], masks[1:], 2.0)
                                                        for i in range(3)))
    assert none["focal_loss"] == 0 and none["dice_loss"] == 0


def test_one_generic_training_step_moves_every_trained_group(images: torch.Tensor) -> None:
    model = BayesPFL.build(config(), seed=0)
    train = TrainConfig(epochs=1, batch_size=2, lr=1e-3, betas=(0.5, 0.999), weight_decay=0.0, milestones=(), gamma=1.0, seed=0,
                        augment=False, num_workers=0, checkpoint_every=10, max_steps=None)
    optimizer, scheduler = build_optimizer(model, train, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    batch = {"image": images, "mask": targets().masks[:, None], "label": targets().labels,
             "has_mask": [True, True], "class_name": NAMES, "description": ["pcb", "bottle"]}
    losses = train_step(model, optimizer, scheduler, batch, torch.device("cpu"), Execution())
    assert math.isfinite(losses["loss"]) and set(losses) >= {"loss", "kl_loss", "orthogonal_loss"}
    after = model.trainable_state_dict()
    for key in ("prompts.context", "temperatures.pixel", "context_flow.u.weight", "normal_flow.state",
                "rca.query.weight", "class_mapping.weight", "state_encoder.mean.0.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert not any(p.requires_grad for p in model.clip.parameters())

