"""PAA (Eq. 10) and the maps and scores of SPEC 6 (Eqs. 12, 14) on hand-built cases."""
import math

import pytest
import torch

from moeclip.config import BlurConfig
from moeclip.methods.moeclip import patch_average
from moeclip.methods.scoring import (anomaly_map, per_class_protocol_scores, image_embedding, image_score,
                                   image_similarities, similarity_logits, training_maps)
from tiny_models import paper_config

IDENTITY_BLUR = BlurConfig(kernel_size=1, sigma=1.0)


def test_patch_average_matches_hand_computed_windows():
    grid = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    tokens = torch.stack([grid.flatten(), -grid.flatten()], dim=-1).unsqueeze(0)  # (1, 16, 2)
    pooled = patch_average(tokens, 4, 3).reshape(4, 4, 2)
    assert pooled[0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 9)  # corner: zero padding, divisor 9
    assert pooled[1, 2, 0].item() == pytest.approx(sum([1, 2, 3, 5, 6, 7, 9, 10, 11]) / 9)  # centre
    assert pooled[3, 1, 0].item() == pytest.approx((8 + 9 + 10 + 12 + 13 + 14) / 9)  # bottom edge
    torch.testing.assert_close(pooled[..., 1], -pooled[..., 0])
    five = patch_average(tokens, (4, 4), 5).reshape(4, 4, 2)
    assert five[0, 0, 0].item() == pytest.approx(sum([0, 1, 2, 4, 5, 6, 8, 9, 10]) / 25)


def test_patch_average_scale_one_is_identity_and_bad_input_is_rejected():
    tokens = torch.randn(2, 12, 3)
    assert torch.equal(patch_average(tokens, (3, 4), 1), tokens)
    with pytest.raises(ValueError, match="odd"):
        patch_average(tokens, (3, 4), 2)
    with pytest.raises(ValueError, match="grid"):
        patch_average(tokens, 4, 3)


def test_similarity_logits_are_scaled_cosines():
    patches = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (B=1, M=1, L=2, D=2)
    anchors = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])  # T_N along x, T_A diagonal (normalised inside)
    logits = similarity_logits(patches, anchors)
    expected = torch.tensor([[[[100.0, 0.0], [100 / math.sqrt(2), 100 / math.sqrt(2)]]]])
    torch.testing.assert_close(logits, expected)


def test_training_maps_softmax_over_normal_and_abnormal():
    logits = torch.zeros(1, 3, 2, 4)
    logits[:, :, 1] = torch.log(torch.tensor(3.0))  # p_A = 3 / (1 + 3)
    maps = training_maps(logits, (2, 2), 8)
    assert maps.shape == (1, 3, 2, 8, 8)
    torch.testing.assert_close(maps[:, :, 1], torch.full((1, 3, 8, 8), 0.75))
    torch.testing.assert_close(maps.sum(2), torch.ones(1, 3, 8, 8))


def test_training_maps_upsample_the_logits_before_the_softmax():
    """Eq. 12: upsampled logits, then softmax (softmax first would average probabilities instead)."""
    logits = torch.zeros(1, 1, 2, 4)
    logits[0, 0, 1] = torch.tensor([0.0, 10.0, 0.0, 10.0])  # A logit 0 in the left column, 10 in the right
    maps = training_maps(logits, (2, 2), 3)
    assert maps[0, 0, 1, 0, 1].item() == pytest.approx(1 / (1 + math.exp(-5.0)), rel=1e-6)  # 0.993307, not 0.75


def test_similarity_logits_default_scale_is_100():
    patches = torch.tensor([[[[0.6, 0.8]]]])
    anchors = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(similarity_logits(patches, anchors), torch.tensor([[[[80.0], [60.0]]]]))
    assert paper_config().logit_scale == 100.0


def test_test_map_upsamples_with_aligned_corners():
    """2 -> 4 pixels: align_corners=True samples the grid at 0, 1/3, 2/3, 1 (False would at -0.25, ..., 1.25)."""
    logits = torch.zeros(1, 1, 2, 4)
    logits[0, 0, 1] = torch.tensor([-1.0, 5.0, -1.0, 5.0])  # per-map value 0 on the left, 3 on the right
    out = anomaly_map(logits, (2, 2), 4, IDENTITY_BLUR)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_test_map_combines_channels_upsamples_with_aligned_corners_and_sums_maps():
    logits = torch.zeros(1, 2, 2, 4)
    logits[0, 0, 1] = torch.tensor([1.0, 3.0, 5.0, 7.0])  # map 0: (A + 1 - N) / 2 = [1, 2, 3, 4]
    logits[0, 1, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # map 1: (0 + 1 - 1) / 2 = 0
    out = anomaly_map(logits, (2, 2), 3, IDENTITY_BLUR)
    expected = torch.tensor([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]])
    torch.testing.assert_close(out[0], expected)


def test_test_map_blurs_on_the_grid_with_the_domain_kernel():
    logits = torch.zeros(1, 1, 2, 25)
    logits[0, 0, 1, 12] = 2.0  # delta of height (2 + 1 - 0)/2 - 0.5 = 1 above a flat 0.5 floor
    out = anomaly_map(logits, (5, 5), 5, BlurConfig(kernel_size=3, sigma=1.0))
    w = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)])
    w = w / w.sum()
    assert out[0, 2, 2].item() == pytest.approx(0.5 + w[1].item() ** 2, rel=1e-5)
    assert out[0, 1, 2].item() == pytest.approx(0.5 + (w[0] * w[1]).item(), rel=1e-5)
    assert out[0, 0, 0].item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("domain, kernel, sigma", [("industrial", 7, 1.0), ("medical", 9, 1.5)])
def test_each_domain_blurs_with_the_papers_kernel(domain, kernel, sigma):
    """A delta on a 11x11 grid: the centre keeps w0^2 of it, w the normalised 1-D Gaussian of SPEC 6."""
    logits = torch.zeros(1, 1, 2, 121)
    logits[0, 0, 1, 60] = 2.0
    blur = paper_config().blur_for(domain)
    out = anomaly_map(logits, (11, 11), 11, blur)
    offsets = torch.arange(kernel) - kernel // 2
    weights = torch.exp(-offsets.double() ** 2 / (2 * sigma ** 2))
    weights = weights / weights.sum()
    assert out[0, 5, 5].item() == pytest.approx(0.5 + weights[kernel // 2].item() ** 2, rel=1e-5)
    assert out[0, 5, 5 + kernel // 2].item() == pytest.approx(0.5 + (weights[0] * weights[kernel // 2]).item(),
                                                              rel=1e-4)


def test_image_score_formulas_on_two_patches_of_different_norms():
    """Eq. 13-14 (paper) and the release's formula give different, hand-computed S_A."""
    outputs = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])  # (B=1, L=2, D=2): norms 3 and 1
    anchors = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # T_N = y, T_A = x (unit)
    paper = image_score(image_similarities(image_embedding(outputs, "paper"), anchors, "paper"))
    release = image_score(image_similarities(image_embedding(outputs, "release"), anchors, "release"))
    # paper: V = (1.5, 0.5), cos(V, T_A) = 1.5 / sqrt(2.5); release: V = (0.5, 0.5), V . T_A = 0.5
    assert paper.item() == pytest.approx((1.5 / math.sqrt(2.5) + 1) / 2, abs=1e-6)  # 0.974342
    assert release.item() == pytest.approx(0.75, abs=1e-6)


def test_image_similarities_are_cosines_or_plain_dot_products():
    anchors = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]).expand(3, 2, 2)
    embeddings = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 0.5]])
    torch.testing.assert_close(image_similarities(embeddings, anchors, "paper"),
                               torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]]))
    torch.testing.assert_close(image_similarities(embeddings, anchors, "release"),
                               torch.tensor([[0.0, 2.0], [0.0, -1.0], [0.5, 0.0]]))
    torch.testing.assert_close(image_score(torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])),
                               torch.tensor([1.0, 0.0, 0.5]))


def test_finalize_normalises_only_what_leaves_the_unit_interval_and_mixes_by_domain():
    maps = torch.tensor([[[0.0, 2.0]], [[4.0, 1.0]], [[3.0, 3.0]]])  # (N=3, 1, 2): leaves [0, 1], min 0, max 4
    scores = torch.tensor([0.2, 0.6, 0.4])  # inside [0, 1]: kept as they are (the release's rule)
    norm_maps, industrial = per_class_protocol_scores(maps, scores, "industrial")
    torch.testing.assert_close(norm_maps, maps / 4)
    torch.testing.assert_close(industrial, 0.5 * torch.tensor([0.5, 1.0, 0.75]) + 0.5 * scores)
    _, medical = per_class_protocol_scores(maps, scores, "medical")
    torch.testing.assert_close(medical, torch.tensor([0.5, 1.0, 0.75]))
    inside = torch.tensor([[[0.1, 0.3]], [[0.2, 0.9]]])
    kept, final = per_class_protocol_scores(inside, torch.tensor([-0.5, 0.5]), "industrial")
    torch.testing.assert_close(kept, inside)  # maps inside [0, 1] are not stretched
    torch.testing.assert_close(final, 0.5 * torch.tensor([0.3, 0.9]) + 0.5 * torch.tensor([0.0, 1.0]))


def test_per_class_protocol_scores_handles_constant_inputs():
    maps, scores = per_class_protocol_scores(torch.full((2, 3, 3), 7.0), torch.ones(2), "industrial")
    assert torch.count_nonzero(maps) == 0  # outside [0, 1] and constant: zeros
    torch.testing.assert_close(scores, torch.full((2,), 0.5))  # S_A of 1 kept: 0.5 * 0 + 0.5 * 1
