"""Equations of the MoE adapter (SPEC 2): FOFS, routing, experts, norm matching, residual, sparse = dense."""
import math

import pytest
import torch

from moeclip.methods.moeclip import MoEAdapter, Router, fofs_matrices
from moeclip.config import MoESettings
from moeclip.methods.moeclip.moe import fofs_chunk_sizes
from tiny_models import moe_adapter, paper_config


def test_fofs_chunk_sizes_put_the_remainder_first():
    assert fofs_chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert fofs_chunk_sizes(1024, 4) == [256] * 4


@pytest.mark.parametrize("d,k,r", [(1024, 4, 8), (70, 3, 5), (16, 1, 8)])
def test_fofs_blocks_are_mutually_orthogonal_and_orthonormal(d, k, r):
    a = fofs_matrices(d, k, r, generator=torch.Generator().manual_seed(0)).double()
    assert a.shape == (k, r, d)
    gram = torch.einsum("nrd,msd->nmrs", a, a)
    for n in range(k):
        for m in range(k):
            expected = torch.eye(r, dtype=torch.float64) if n == m else torch.zeros(r, r, dtype=torch.float64)
            torch.testing.assert_close(gram[n, m], expected, atol=1e-6, rtol=0)


def test_fofs_block_n_is_zero_outside_its_chunk():
    sizes = fofs_chunk_sizes(10, 4)
    a = fofs_matrices(10, 4, 2, generator=torch.Generator().manual_seed(1))
    start = 0
    for n, size in enumerate(sizes):
        outside = torch.cat([a[n, :, :start], a[n, :, start + size:]], dim=1)
        assert torch.count_nonzero(outside) == 0
        assert torch.count_nonzero(a[n, :, start:start + size]) == a.shape[1] * size
        start += size


def test_fofs_is_repeatable_with_a_generator_and_rejects_small_chunks():
    one = fofs_matrices(64, 4, 8, generator=torch.Generator().manual_seed(3))
    two = fofs_matrices(d=64, K=4, r=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, two)
    with pytest.raises(ValueError, match="rank=8"):
        fofs_matrices(24, 4, 8)


def test_fofs_a_is_frozen_and_plain_lora_a_is_trainable():
    assert not moe_adapter(32, num_experts=4, top_k=2, lora_rank=4, fofs=True).lora_a.requires_grad
    plain = moe_adapter(32, num_experts=4, top_k=2, lora_rank=4, fofs=False)
    assert plain.lora_a.requires_grad
    assert plain.lora_a.abs().max() <= 1 / math.sqrt(32)


def test_router_topk_weights_renormalise_and_zero_the_rest():
    router = Router(d=3, num_experts=4, top_k=2)
    with torch.no_grad():
        router.net.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]]))
    x = torch.tensor([[2.0, 1.0, 0.0]])
    routing = router(x)
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0])
    probs = logits.exp() / logits.exp().sum()
    torch.testing.assert_close(routing.probs[0], probs)
    expected = torch.zeros(4)
    expected[:2] = probs[:2] / probs[:2].sum()
    weights = routing.dense_weights()
    torch.testing.assert_close(weights[0], expected)
    assert weights.sum().item() == pytest.approx(1.0)


def test_router_starts_uniform_and_softmax_is_float32():
    router = Router(d=8, num_experts=4, top_k=2).to(torch.bfloat16)
    routing = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert routing.probs.dtype == torch.float32
    torch.testing.assert_close(routing.probs, torch.full((5, 4), 0.25))
    torch.testing.assert_close(routing.topk_weight, torch.full((5, 2), 0.5))


def test_router_noise_only_perturbs_inference():
    torch.manual_seed(0)
    router = Router(d=8, num_experts=4, top_k=2, noise=1.0)
    torch.nn.init.normal_(router.net.weight)
    x = torch.randn(200, 8)
    clean = router.net(x).float().softmax(-1)
    torch.testing.assert_close(router.train()(x).probs, clean)
    assert not torch.allclose(router.eval()(x).probs, clean)
    assert torch.equal(Router(8, 4, 2, noise=0.0).eval()(x).probs, torch.full((200, 4), 0.25))


def _randomised_adapter(**kwargs) -> MoEAdapter:
    torch.manual_seed(0)
    adapter = moe_adapter(16, num_experts=4, top_k=2, lora_rank=3, lora_alpha=6.0, **kwargs)
    with torch.no_grad():
        for param in adapter.parameters():
            if param.requires_grad:
                param.normal_()
    return adapter


def _reference_forward(adapter: MoEAdapter, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 1, 2, 4, 5 written out token by token, expert by expert."""
    out = torch.empty_like(x)
    for t, token in enumerate(x):
        logits = adapter.router.net(token)
        probs = logits.softmax(-1)
        chosen = probs.topk(adapter.router.top_k).indices
        mixture = torch.zeros_like(token)
        for n in chosen.tolist():
            weight = probs[n] / probs[chosen].sum()
            if adapter.expert_type == "lora":
                expert = adapter.lora_b[n] @ (adapter.lora_a[n] @ token) * (adapter.scale)
            else:
                expert = adapter.full[n] @ token
            mixture = mixture + weight * expert
        normed = mixture * token.norm() / (mixture.norm() + adapter.eps)
        out[t] = adapter.lambda_moe * normed + (1 - adapter.lambda_moe) * token
    return out


@pytest.mark.parametrize("kwargs", [{}, {"fofs": False}, {"expert_type": "full_rank"}, {"router_type": "mlp"}])
@pytest.mark.parametrize("dense", [True, False])
def test_adapter_matches_the_written_out_equations(kwargs, dense):
    adapter = _randomised_adapter(**kwargs).eval()
    x = torch.randn(7, 16)
    with torch.no_grad():
        out, aux = adapter(x, dense=dense)
        torch.testing.assert_close(out, _reference_forward(adapter, x), rtol=1e-5, atol=1e-5)
    assert (aux.expert_outputs is not None) == dense


def test_sparse_inference_equals_dense_computation_on_batched_tokens():
    adapter = _randomised_adapter().eval()
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        sparse, _ = adapter(x)
        dense, aux = adapter(x, dense=True)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    assert aux.expert_outputs.shape == (2, 10, 4, 16)


def test_training_mode_is_dense_and_inference_is_sparse_by_default():
    adapter = _randomised_adapter()
    x = torch.randn(3, 16)
    assert adapter.train()(x)[1].expert_outputs is not None
    assert adapter.eval()(x)[1].expert_outputs is None


def test_norm_matching_preserves_each_token_norm():
    adapter = _randomised_adapter().eval()
    x = torch.randn(50, 16) * torch.rand(50, 1) * 10
    with torch.no_grad():
        out, _ = adapter(x)
    lam = adapter.lambda_moe
    f_norm = (out - (1 - lam) * x) / lam
    torch.testing.assert_close(f_norm.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=1e-4)


def test_zero_initialised_b_and_router_add_nothing_at_start():
    """With B = 0 the experts output 0, so Eq. 5 leaves (1 - lambda_moe) * x: no adaptation yet."""
    adapter = moe_adapter(16, num_experts=4, top_k=2, lora_rank=3).train()
    x = torch.randn(4, 16)
    out, aux = adapter(x)
    assert torch.count_nonzero(aux.expert_outputs) == 0
    torch.testing.assert_close(out, (1 - adapter.lambda_moe) * x)
    torch.testing.assert_close(aux.routing.probs, torch.full((4, 4), 0.25))


def test_each_moe_setting_comes_from_its_own_model_field():
    config = paper_config(num_experts=6, top_k=3, lora_rank=5, lora_alpha=7.0, lora_dropout=0.2, lambda_moe=0.3,
                         norm_eps=1e-4, fofs=False, expert_type="full_rank", router_type="mlp", router_hidden=9,
                         router_noise=0.4)
    assert config.moe == MoESettings(num_experts=6, top_k=3, rank=5, alpha=7.0, dropout=0.2, lambda_moe=0.3, eps=1e-4,
                                     fofs=False, expert_type="full_rank", router_type="mlp", router_hidden=9,
                                     router_noise=0.4)
    adapter = moe_adapter(60, num_experts=6, top_k=3, lora_rank=5, lora_alpha=7.0, lora_dropout=0.2)
    assert (adapter.num_experts, adapter.router.top_k, adapter.rank, adapter.scale, adapter.dropout.p) == (6, 3, 5, 1.4, 0.2)
