"""ETF (Eqs. 3, 7, 8) and balance (Eq. 9, B.1) losses on inputs with known values."""
import pytest
import torch

from moeclip.losses import balance_loss, etf_loss, etf_target


def _simplex_etf(num_experts: int, dim: int) -> torch.Tensor:
    """K unit vectors with pairwise cosine -1/(K-1), embedded in `dim` dims and randomly rotated."""
    centred = torch.eye(num_experts) - 1.0 / num_experts
    vectors = torch.nn.functional.normalize(centred, dim=-1)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    padded = torch.zeros(num_experts, dim, dtype=torch.float64)
    padded[:, :num_experts] = vectors.double()
    return (padded @ rotation.T).float()


def test_etf_target_is_the_ideal_gram_matrix():
    torch.testing.assert_close(etf_target(3), torch.tensor([[1, -0.5, -0.5], [-0.5, 1, -0.5], [-0.5, -0.5, 1]]))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_etf_loss_is_zero_at_an_exact_simplex_etf_whatever_the_norms(k):
    torch.manual_seed(k)
    tokens = torch.stack([_simplex_etf(k, 32) for _ in range(5)])  # (5, K, 32)
    scaled = tokens * torch.rand(5, k, 1) * 7  # L2 normalisation makes norms irrelevant
    assert etf_loss(scaled).item() == pytest.approx(0.0, abs=1e-10)


def test_etf_loss_of_identical_experts_has_the_known_value():
    """All K outputs equal: G = 1 everywhere; K(K-1) entries miss by 1 + 1/(K-1)."""
    outputs = torch.randn(6, 1, 16).expand(6, 4, 16)
    expected = (4 * 3) * (1 + 1 / 3) ** 2 / 16
    assert etf_loss(outputs).item() == pytest.approx(expected, rel=1e-6)


def test_etf_loss_averages_over_tokens_and_flattens_leading_dims():
    etf = _simplex_etf(4, 16)
    same = torch.randn(1, 16).expand(4, 16)
    outputs = torch.stack([etf, same])  # one perfect token, one collapsed token
    assert etf_loss(outputs).item() == pytest.approx((0 + 4 / 3) / 2, rel=1e-6)
    assert etf_loss(outputs.reshape(1, 2, 4, 16)).item() == pytest.approx((0 + 4 / 3) / 2, rel=1e-6)


def test_etf_loss_is_zero_for_a_single_expert():
    assert etf_loss(torch.randn(10, 1, 8)).item() == 0.0


def test_balance_loss_known_values():
    one_sided = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # load (2, 0): mean 1, population var 1
    assert balance_loss(one_sided).item() == pytest.approx(1 / (1 + 1e-6))
    assert balance_loss(one_sided, unbiased=True).item() == pytest.approx(2 / (1 + 1e-6))
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.4, 0.2, 0.4]])  # load (1.2, 0.6, 1.2)
    load = probs.sum(0)
    assert balance_loss(probs).item() == pytest.approx(load.var(unbiased=False).item() / (1 + 1e-6))


def test_balance_loss_is_zero_for_an_even_load_and_flattens_batches():
    assert balance_loss(torch.full((2, 9, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-12)
    probs = torch.rand(2, 5, 3).softmax(-1)
    assert balance_loss(probs).item() == pytest.approx(balance_loss(probs.reshape(10, 3)).item())
