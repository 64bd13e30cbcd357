"""WMoE-CLIP (approximation, moeclip/methods/wmoe_clip.py): its equations on known inputs, on the tiny random ViT."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from moeclip.config import TrainConfig
from moeclip.losses import clamped_focal_loss, dice_loss
from moeclip.methods.targets import Targets
from moeclip.methods.wmoe_clip import (
    CTDS,
    CTDSOutput,
    SemanticMoE,
    StatePrompts,
    WaveletCrossAttention,
    WMoECLIP,
    WMoECLIPConfig,
    WMoEOutputs,
    encode_prompts,
    frequency_enhanced,
    gaussian_kl,
    haar_dwt,
    prompt_tokens,
)

DEMO = {"backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": False, "precision": "fp32",
        "feature_layers": (1, 2, 3, 4), "prompt_length": 4, "prompt_object": "object", "latent_dim": 16,
        "vae_hidden": 32, "ctds_injection": "projected", "experts": 4, "expert_hidden": 8, "attention_heads": 4,
        "temperature": 0.07, "beta_kl": 0.01, "beta_rec": 1.0, "lambda_seg": 1.0, "focal_gamma": 2.0, "sigma": 0.5}
PAPER = dict(DEMO, backbone="ViT-L-14-336", image_size=518, weights="openai", quick_gelu=True,
             feature_layers=(6, 12, 18, 24), prompt_length=12, latent_dim=768, vae_hidden=768,
             ctds_injection="direct", expert_hidden=192, sigma=4.0)
TRAIN = TrainConfig(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), weight_decay=0.0, milestones=(), gamma=1.0, seed=111,
                    augment=False, num_workers=0, checkpoint_every=1000, max_steps=None)


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every trainable tensor drawn from N(0, std^2), so zero- or one-initialised pieces contribute too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def _tiny(seed: int = 0, **overrides: object) -> WMoECLIP:
    return _randomise(WMoECLIP.build(WMoECLIPConfig(**{**DEMO, **overrides}), seed=seed), seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's small ops run ~50x faster on one thread than on two contending cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny() -> WMoECLIP:
    return _tiny()


# -- Haar DWT and F_p -----------------------------------------------------------------------------------------
def test_haar_subbands_of_one_block_follow_the_sign_convention():
    ll, lh, hl, hh = haar_dwt(torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]]))
    assert [ll.item(), lh.item(), hl.item(), hh.item()] == [5.5, -1.5, -2.5, 0.5]


def test_haar_is_orthonormal_and_invertible():
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    bands = haar_dwt(x)
    torch.testing.assert_close(sum(b.pow(2).sum() for b in bands), x.pow(2).sum())
    ll, lh, hl, hh = bands
    torch.testing.assert_close((ll + lh + hl + hh) / 2, x[..., 0::2, 0::2])  # p
    torch.testing.assert_close((ll - lh - hl + hh) / 2, x[..., 1::2, 1::2])  # s


def test_odd_grid_replicates_the_last_row_and_column():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    ll, lh, hl, hh = haar_dwt(x)
    assert ll.shape == (1, 1, 2, 2)
    # bottom-right block is [8 8; 8 8]; top-right block is [2 2; 5 5]
    assert [ll[0, 0, 1, 1].item(), lh[0, 0, 1, 1].item(), hl[0, 0, 1, 1].item(), hh[0, 0, 1, 1].item()] == [16, 0, 0, 0]
    assert [ll[0, 0, 0, 1].item(), lh[0, 0, 0, 1].item(), hl[0, 0, 0, 1].item(), hh[0, 0, 0, 1].item()] == [7, 0, -3, 0]


def test_frequency_enhanced_is_signed_high_sum_times_wh_plus_low():
    # channel 0: LL 5.5, LH -1.5, HL -2.5, HH 0.5 -> F_H = -3.5; channel 1: the negated block
    block = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    grid = torch.stack([block, -block]).unsqueeze(0)
    enhanced = frequency_enhanced(grid, torch.tensor([2.0, -3.0]))
    assert enhanced.flatten().tolist() == [2 * -3.5 + 5.5, -3 * 3.5 - 5.5]


# -- CTDS --------------------------------------------------------------------------------------------------
def test_kl_is_the_closed_form_against_the_standard_normal():
    mean, log_var = torch.tensor([[1.0, 0.0], [0.5, -1.0]]), torch.tensor([[0.0, math.log(2.0)], [0.3, 0.0]])
    posterior = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    prior = torch.distributions.Normal(torch.zeros(2, 2), torch.ones(2, 2))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(-1).mean()
    torch.testing.assert_close(gaussian_kl(mean, log_var), expected)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0


def test_ctds_samples_in_training_and_uses_the_posterior_mean_in_eval():
    ctds = _randomise(CTDS(8, 16, 4), std=0.5)
    g = F.normalize(torch.randn(3, 8), dim=-1)
    ctds.eval()
    first, second = ctds(g), ctds(g)
    torch.testing.assert_close(first.bias, ctds.decoder(first.mean))
    torch.testing.assert_close(first.bias, second.bias)
    ctds.train()
    torch.manual_seed(0)
    sampled = ctds(g)
    torch.manual_seed(0)
    eps = torch.randn_like(sampled.mean)
    torch.testing.assert_close(sampled.bias, ctds.decoder(sampled.mean + (0.5 * sampled.log_var).exp() * eps))
    assert not torch.allclose(sampled.bias, first.bias)


def test_ctds_bias_shifts_every_context_vector_of_both_states():
    prompts = _randomise(StatePrompts(3, 6, 4, "projected"))
    bias = torch.randn(2, 4)
    context = prompts(bias)
    assert context.shape == (2, 2, 3, 6)
    shift = bias @ prompts.injection.weight.T
    torch.testing.assert_close(context, prompts.context.expand(2, -1, -1, -1) + shift[:, None, None])


def test_direct_injection_needs_equal_text_and_embedding_widths():
    with pytest.raises(ValueError, match="projected"):
        WMoECLIP.build(WMoECLIPConfig(**{**DEMO, "ctds_injection": "direct"}), seed=0)


def test_prompt_encoding_matches_clips_text_encoder_with_the_placeholder_embeddings(tiny):
    """Context = the placeholder's own token embedding: the per-image prompt path must be CLIP's encode_text."""
    clip = tiny.clip
    tokens = prompt_tokens(tiny.tokenizer, ["object", "metal nut"], 4)
    assert tokens.shape[:2] == (2, 2)
    placeholder = clip.token_embedding(tokens[0, 0, 1]).expand(2, 2, 4, -1)
    with torch.no_grad():
        ours = encode_prompts(clip, tokens, placeholder)
        full = tiny.tokenizer([f"X X X X {t}." for name in ("object", "metal nut") for t in (name, f"damaged {name}")])
        expected = F.normalize(clip.encode_text(full), dim=-1).view(2, 2, -1)
    torch.testing.assert_close(ours, expected)


# -- WCMA and SA-MoE ---------------------------------------------------------------------------------------
def test_wcma_is_a_residual_cross_attention_on_the_wavelet_tokens():
    dim, heads = 8, 2
    wcma = _randomise(WaveletCrossAttention(dim, heads), std=0.5)
    generator = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(2, 2, dim, generator=generator), dim=-1)
    patches = F.normalize(torch.randn(2, 16, dim, generator=generator), dim=-1)
    tokens = wcma.wavelet_tokens(patches, (4, 4))
    grid = patches.transpose(1, 2).reshape(2, dim, 4, 4)
    expected_tokens = F.normalize(frequency_enhanced(grid, wcma.high_weight).flatten(2).transpose(1, 2), dim=-1)
    torch.testing.assert_close(tokens, expected_tokens)
    assert tokens.shape == (2, 4, dim)
    query = text @ wcma.query.weight.T + wcma.query.bias
    heads_out = []
    for h in range(heads):
        part = slice(h * dim // heads, (h + 1) * dim // heads)
        weights = (query[..., part] @ tokens[..., part].transpose(1, 2) / math.sqrt(dim)).softmax(dim=-1)
        heads_out.append(weights @ tokens[..., part])
    expected = F.normalize(text + torch.cat(heads_out, dim=-1), dim=-1)
    torch.testing.assert_close(wcma(text, patches, (4, 4)), expected)


def test_sa_moe_gate_is_a_softmax_over_experts_and_mixes_attention_pooled_experts():
    dim, experts = 8, 3
    moe = _randomise(SemanticMoE(dim, experts, 4), std=0.5)
    generator = torch.Generator().manual_seed(2)
    context = F.normalize(torch.randn(2, 10, dim, generator=generator), dim=-1)
    g = F.normalize(torch.randn(2, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(2, 2, dim, generator=generator), dim=-1)
    embedding, gate = moe(context, g, text)
    logits = torch.cat([g, text[:, 0], text[:, 1]], dim=-1) @ moe.gate.weight.T + moe.gate.bias
    expected_gate = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    torch.testing.assert_close(gate, expected_gate)
    mixed = torch.zeros(2, dim)
    for k, expert in enumerate(moe.experts):
        pooled = ((context @ moe.queries[k]) / math.sqrt(dim)).softmax(dim=-1).unsqueeze(1) @ context
        mixed = mixed + gate[:, k:k + 1] * expert(pooled[:, 0])
    torch.testing.assert_close(embedding, F.normalize(g + mixed, dim=-1))


# -- the assembled method ----------------------------------------------------------------------------------
def test_prediction_is_deterministic_and_the_blurred_layer_mean(tiny):
    tiny.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maps, scores = tiny.predict(images, ["object", "object"], "industrial")
        again = tiny.predict(images, ["object", "object"], "medical")
        outputs = tiny.forward_outputs(images, ["object", "object"])
    torch.testing.assert_close(maps, again[0], rtol=0, atol=0)
    torch.testing.assert_close(scores, again[1], rtol=0, atol=0)
    upsampled = F.interpolate(outputs.pixel_logits.flatten(0, 1), size=(64, 64), mode="bilinear", align_corners=True)
    anomalous = upsampled.softmax(dim=1)[:, 1].view(2, 4, 64, 64).mean(dim=1, keepdim=True)
    torch.testing.assert_close(maps, gaussian_blur(anomalous, [5, 5], [0.5, 0.5])[:, 0])
    torch.testing.assert_close(scores, outputs.image_logits.softmax(dim=-1)[:, 1])
    assert outputs.pixel_logits.shape == (2, 4, 2, 8, 8)
    assert outputs.pixel_logits.abs().max() <= 1 / 0.07 + 1e-4  # cosines over the temperature


def test_training_forward_samples_the_posterior(tiny):
    tiny.train()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first, second = (tiny.forward_outputs(images, ["object"]) for _ in range(2))
    assert not torch.allclose(first.image_logits, second.image_logits)
    torch.testing.assert_close(first.ctds.mean, second.ctds.mean)


def _outputs(generator: torch.Generator) -> WMoEOutputs:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return WMoEOutputs(pixel_logits=rand(2, 3, 2, 4, 4) * 3, image_logits=rand(2, 2) * 3,
                       global_feature=F.normalize(rand(2, 8), dim=-1),
                       ctds=CTDSOutput(bias=rand(2, 8), mean=rand(2, 5), log_var=rand(2, 5) * 0.5), image_size=(16, 16))


def test_losses_are_the_weighted_sum_of_all_four_terms():
    model = _tiny(lambda_seg=2.0, beta_kl=0.5, beta_rec=0.25, focal_gamma=3.0)
    generator = torch.Generator().manual_seed(4)
    outputs = _outputs(generator)
    masks = (torch.rand(2, 16, 16, generator=generator) > 0.7).float()
    targets = Targets(masks=masks, labels=torch.tensor([1, 0]), known=torch.tensor([True, True]))
    losses = model.training_losses(outputs, targets)
    maps = F.interpolate(outputs.pixel_logits.flatten(0, 1), size=(16, 16), mode="bilinear",
                         align_corners=True).softmax(dim=1).view(2, 3, 2, 16, 16)
    seg = sum(clamped_focal_loss(maps[:, layer], masks, 3.0) + dice_loss(maps[:, layer, 1], masks, "release")
              + dice_loss(maps[:, layer, 0], 1 - masks, "release") for layer in range(3))
    image = F.cross_entropy(outputs.image_logits, targets.labels)
    kl = gaussian_kl(outputs.ctds.mean, outputs.ctds.log_var)
    rec = ((outputs.ctds.bias - outputs.global_feature) ** 2).sum(dim=1).mean()
    for name, value in {"segmentation_loss": seg, "image_loss": image, "kl_loss": kl,
                        "reconstruction_loss": rec}.items():
        torch.testing.assert_close(losses[name], value)
        assert value > 0
    torch.testing.assert_close(losses["loss"], image + 2.0 * seg + 0.5 * kl + 0.25 * rec)


def test_segmentation_loss_ignores_samples_without_a_known_mask(tiny):
    generator = torch.Generator().manual_seed(5)
    outputs = _outputs(generator)
    masks = (torch.rand(2, 16, 16, generator=generator) > 0.7).float()
    half = Targets(masks=masks, labels=torch.tensor([1, 0]), known=torch.tensor([True, False]))
    first = WMoEOutputs(outputs.pixel_logits[:1], outputs.image_logits[:1], outputs.global_feature[:1],
                        outputs.ctds, outputs.image_size)
    alone = Targets(masks=masks[:1], labels=torch.tensor([1]), known=torch.tensor([True]))
    torch.testing.assert_close(tiny.training_losses(outputs, half)["segmentation_loss"],
                               tiny.training_losses(first, alone)["segmentation_loss"])


def test_a_few_steps_reduce_the_loss_and_the_frozen_clip_gets_no_gradient():
    torch.manual_seed(0)
    model = WMoECLIP.build(WMoECLIPConfig(**DEMO), seed=6)
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    masks = torch.zeros(4, 64, 64)
    masks[:2, 16:40, 20:44] = 1
    targets = Targets(masks=masks, labels=torch.tensor([1, 1, 0, 0]), known=torch.ones(4, dtype=torch.bool))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=TRAIN.lr, betas=TRAIN.betas)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.training_losses(model.training_outputs(images, ["object"] * 4), targets)["loss"].item()

    before = eval_loss()
    for _ in range(6):
        model.train()
        loss = model.training_losses(model.training_outputs(images, ["object"] * 4), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.clip.parameters())
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
    assert eval_loss() < before


def test_paper_size_has_about_ten_million_trainable_parameters():
    counts = WMoECLIP.count_parameters(WMoECLIPConfig(**PAPER))
    d, dv, layers = 768, 1024, 4
    expected = (layers * dv * d                                       # P_l
                + 2 * 12 * d                                          # context vectors
                + (d * d + d) + 2 * (d * d + d) + 2 * (d * d + d)     # CTDS encoder, mu/log var, decoder
                + layers * (d + d * d + d)                            # W_h and W_q per layer
                + 4 * d + 4 * (d * 192 + 192 + 192 * d + d) + 3 * d * 4 + 4)  # SA-MoE queries, experts, gate
    print(f"WMoE-CLIP paper-size parameters: {counts}")
    assert counts["trainable"] == counts["added"] == expected == 9_678_340
    assert counts["backbone"] > 400_000_000


def test_config_has_no_defaults_and_forbids_unknown_fields():
    with pytest.raises(ValueError):
        WMoECLIPConfig(**{k: v for k, v in DEMO.items() if k != "sigma"})
    with pytest.raises(ValueError):
        WMoECLIPConfig(**DEMO, moe_layers=(1,))
    for layers in [(0, 1), (2, 1), ()]:
        with pytest.raises(ValueError):
            WMoECLIPConfig(**{**DEMO, "feature_layers": layers})
    with pytest.raises(ValueError, match="4 blocks"):
        WMoECLIP.build(WMoECLIPConfig(**{**DEMO, "feature_layers": (4, 5)}), seed=0)
