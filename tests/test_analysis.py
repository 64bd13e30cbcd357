"""Expert analyses (Figs. 5/9/10, Table 14) against answers known by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from moeclip import build_model
from moeclip.analysis import (
    assignment_counts,
    expert_utilisation,
    grey_levels,
    histogram_entropy,
    image_expert_similarity,
    inter_expert_similarity,
    patch_statistics,
    routed_patch_statistics,
    sobel_magnitude,
)
from moeclip.data.transforms import normalize
from moeclip.methods.moeclip.network import MoECLIP
from tiny_models import tiny_config

K = 4


class ConstantLogits(nn.Module):
    """A router net whose logits ignore the token, so every token makes the same choice."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape[:-1], -1)


def _model(**overrides: object) -> MoECLIP:
    return build_model(tiny_config(**overrides), seed=0)


def _loader(batches: int = 2, size: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.stack([normalize(torch.rand(3, size, size, generator=generator)) for _ in range(2)])}
            for _ in range(batches)]


def _route_all(model: MoECLIP, logits: list[float]) -> None:
    for moe in model.moe.values():
        moe.router.net = ConstantLogits(logits)


def _randomise(model: MoECLIP, same_experts: bool, seed: int = 1) -> None:
    """Random routers and LoRA B (shared by all experts, with A too, when `same_experts`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in model.moe.values():
            moe.router.net.weight.copy_(torch.randn(moe.router.net.weight.shape, generator=generator))
            b = torch.randn(moe.lora_b.shape, generator=generator)
            if same_experts:
                b[:] = b[0]
                moe.lora_a[:] = moe.lora_a[0].clone()
            moe.lora_b.copy_(b)


# -- utilisation ---------------------------------------------------------------------------------
def test_every_patch_choosing_experts_1_and_3_gives_half_shares() -> None:
    model = _model()
    _route_all(model, [3.0, 0.0, 2.0, -1.0])
    shares = expert_utilisation(model, _loader())
    assert list(shares.columns) == ["layer", "expert", "share"]
    assert sorted(shares["layer"].unique()) == [1, 2, 3, 4]
    for _, layer in shares.groupby("layer"):
        np.testing.assert_allclose(layer.sort_values("expert")["share"], [50, 0, 50, 0])
    top1 = expert_utilisation(model, _loader(batches=1), layers=[2], top1=True)
    np.testing.assert_allclose(top1["share"], [100, 0, 0, 0])


def test_assignment_counts_skip_cls() -> None:
    topk = torch.tensor([[[3, 2], [0, 1], [0, 2]]])  # CLS picks 3 and 2; patches pick 0,1 and 0,2
    np.testing.assert_array_equal(assignment_counts(topk, K), [2, 1, 1, 0])
    np.testing.assert_array_equal(assignment_counts(topk, K, top1=True), [2, 0, 0, 0])


def test_mode_is_restored_and_unrouted_layers_are_refused() -> None:
    model = _model(output_layers=(2,))  # MoE layers 3 and 4 never run
    model.train()
    with pytest.raises(KeyError, match="not routed"):
        expert_utilisation(model, _loader(batches=1))
    assert model.training
    assert len(expert_utilisation(model, _loader(batches=1), layers=[1, 2])) == 2 * K


# -- inter-expert similarity ---------------------------------------------------------------------
def test_identical_experts_are_fully_similar() -> None:
    """Identical A and B (FOFS off) and top-k = K, so every expert averages the same patches.

    With top-k < K identical experts still average different patch sets and need not reach 1.
    """
    model = _model(fofs=False, top_k=K)
    _randomise(model, same_experts=True)
    similarity = inter_expert_similarity(model, _loader(), layer=2)
    np.testing.assert_allclose(similarity, np.ones((K, K)), atol=1e-5)


def test_zero_lora_b_has_no_direction() -> None:
    """FOFS with B at its zero init: every expert output is 0, so no similarity is defined."""
    similarity = inter_expert_similarity(_model(), _loader(batches=1), layer=3)
    assert similarity.shape == (K, K) and np.isnan(similarity).all()


def test_random_experts_give_a_symmetric_cosine_matrix() -> None:
    model = _model()
    _randomise(model, same_experts=False)
    similarity = inter_expert_similarity(model, _loader(), layer=1)
    assert not np.isnan(similarity).any()
    np.testing.assert_allclose(similarity, similarity.T, atol=1e-6)
    np.testing.assert_array_equal(np.diag(similarity), np.ones(K))
    assert (np.abs(similarity) <= 1).all() and (np.abs(similarity - 1) > 1e-3).any()


def test_image_similarity_by_hand() -> None:
    """Expert features are the means over selecting patches; absent experts are invalid pairs."""
    outputs = torch.zeros(1, 2, 3, 2)  # one image, 2 patches, 3 experts, d = 2
    outputs[0, 0, 0] = torch.tensor([1.0, 0.0])
    outputs[0, 1, 0] = torch.tensor([3.0, 0.0])
    outputs[0, :, 1] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    outputs[0, :, 2] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # never selected
    selected = torch.tensor([[[True, True, False], [True, False, False]]])
    gram, valid = image_expert_similarity(outputs, selected)
    assert gram[0, 0, 1].item() == pytest.approx(2 ** -0.5)
    assert valid[0].tolist() == [[True, True, False], [True, True, False], [False, False, False]]


# -- patch statistics ----------------------------------------------------------------------------
def test_sobel_matches_scipy() -> None:
    image = np.random.default_rng(0).integers(0, 256, (9, 11)).astype(np.float64)
    expected = np.hypot(ndimage.sobel(image, axis=0), ndimage.sobel(image, axis=1))
    got = sobel_magnitude(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_constant_and_half_split_patches() -> None:
    grey = torch.zeros(1, 8, 16, dtype=torch.float64)
    grey[0, :, :8] = 77.0  # patch 1: constant
    grey[0, :, 12:] = 255.0  # patch 2: left half black, right half white
    stats = patch_statistics(grey, patch=8)[0]
    np.testing.assert_allclose(stats[0, 1:].numpy(), [0.0, 0.0], atol=1e-12)
    assert stats[1, 1].item() == pytest.approx(127.5) and stats[1, 2].item() == pytest.approx(1.0)
    assert stats[1, 0].item() > 0
    blank = patch_statistics(torch.full((1, 8, 8), 200.0), patch=4)[0]
    np.testing.assert_array_equal(blank.numpy(), np.zeros((4, 3)))


def test_entropy_of_uniform_levels_is_eight_bits() -> None:
    assert histogram_entropy(torch.arange(256.0)).item() == pytest.approx(8.0)


def test_grey_levels_undo_clip_normalisation() -> None:
    grey = torch.randint(0, 256, (5, 7)).float()
    images = normalize(grey.expand(3, -1, -1) / 255)[None]
    np.testing.assert_array_equal(grey_levels(images)[0].numpy(), grey.numpy())


def test_routed_statistics_of_a_constant_image_go_to_the_top1_expert() -> None:
    model = _model()
    _route_all(model, [0.0, 1.0, 3.0, 2.0])  # top-1 is expert 3, top-2 adds expert 4
    loader = [{"image": normalize(torch.full((3, 64, 64), 0.5))[None].repeat(2, 1, 1, 1)}]
    top1 = routed_patch_statistics(model, loader, layer=4).set_index("expert")
    assert top1["n_patches"].tolist() == [0, 0, 128, 0]
    np.testing.assert_array_equal(top1.loc[3, ["gradient", "contrast", "entropy"]].to_numpy(float), [0, 0, 0])
    assert top1.loc[[1, 2, 4], "gradient"].isna().all()
    topk = routed_patch_statistics(model, loader, layer=4, top1=False).set_index("expert")
    assert topk["n_patches"].tolist() == [0, 0, 128, 128]


def test_routed_statistics_average_per_expert() -> None:
    """Random images: every patch goes to expert 1, whose means equal the mean over all patches."""
    model = _model()
    _route_all(model, [5.0, 0.0, 0.0, 0.0])
    loader = _loader()
    table = routed_patch_statistics(model, loader, layer=1).set_index("expert")
    every_patch = torch.cat([patch_statistics(grey_levels(b["image"]), 8).flatten(0, 1) for b in loader])
    np.testing.assert_allclose(table.loc[1, ["gradient", "contrast", "entropy"]].to_numpy(float),
                               every_patch.double().mean(dim=0).numpy(), rtol=1e-5)
    assert table.loc[1, "n_patches"] == 4 * 64
