"""The fast path equals the reference computation (fp32, every expert, materialised attention).

Tolerances:
- float32 fast path (sparse top-k dispatch, fused attention, batched heads): the same
  arithmetic reordered, so raw maps agree to 1e-5 relative / 1e-4 absolute (maps span ~70).
- bf16 fast path: bf16 keeps 8 significant bits (rounding <= 2^-9 = 0.2 % per matmul output);
  accumulated over the blocks this moves the class-normalised maps (range [0, 1]) by at
  most 0.03 and 0.002 on average, and the final image scores by at most 0.01.
- Demo metrics (the float32 fast path, the CPU's): every per-dataset metric within 0.1 point.
"""
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.profiler import profile

from moeclip import build_model
from moeclip.data.manifest import read_manifest
from moeclip.data.prepare import prepare_dataset
from moeclip.data.synthetic import generate_demo_datasets
from moeclip.evaluation import METRICS, evaluate_frame
from moeclip.methods.moeclip import MoECLIP, Router
from moeclip.methods.execution import REFERENCE, Execution, compile_backbone, executing, fast_execution
from moeclip.methods.scoring import per_class_protocol_scores
from tiny_models import tiny_config

BF16 = Execution(bf16=True)


def _randomised(seed: int) -> MoECLIP:
    """A tiny model whose zero-initialised trainables are random too, so every expert and head matters."""
    model = build_model(tiny_config(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _predict(model: MoECLIP, how: Execution, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(), executing(model, how, "cpu"):
        return model.predict(images, ["wood"] * len(images), "industrial")


@pytest.fixture(scope="module")
def outputs() -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Raw maps and scores of 3 model seeds x 3 executions on 8 random images."""
    results = {}
    for seed in range(3):
        model = _randomised(seed)
        images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        for name, how in (("reference", REFERENCE), ("fp32", Execution()), ("bf16", BF16)):
            results[seed, name] = _predict(model, how, images)
    return results


@pytest.mark.parametrize("seed", range(3))
def test_float32_fast_path_equals_the_reference(outputs, seed):
    fast, reference = outputs[seed, "fp32"], outputs[seed, "reference"]
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_bf16_fast_path_differs_from_the_reference_by_rounding_only(outputs, seed):
    fast = per_class_protocol_scores(*outputs[seed, "bf16"], "industrial")
    reference = per_class_protocol_scores(*outputs[seed, "reference"], "industrial")
    map_error = (fast[0] - reference[0]).abs()
    assert map_error.max() <= 0.03 and map_error.mean() <= 0.002
    assert (fast[1] - reference[1]).abs().max() <= 0.01
    assert map_error.max() > 1e-4  # bf16 really ran: float32 reordering alone stays far below this


def test_fast_path_is_bf16_only_on_cuda():
    assert fast_execution("cuda") == Execution(bf16=True, sparse_experts=True, fused_attention=True)
    assert fast_execution("cpu") == Execution(bf16=False, sparse_experts=True, fused_attention=True)
    assert REFERENCE == Execution(bf16=False, sparse_experts=False, fused_attention=False)


def _attention_ops_and_expert_outputs(model: MoECLIP, how: Execution) -> tuple[set[str], list[bool]]:
    """Names of the attention kernels run by `predict`, and per MoE layer whether all K outputs were formed."""
    images = torch.randn(1, 3, 64, 64)
    _predict(model, how, images)  # caches the text features: only the image tower's attention is profiled
    dense: list[bool] = []
    hooks = [moe.register_forward_hook(lambda _m, _i, out: dense.append(out[1].expert_outputs is not None))
             for moe in model.moe.values()]
    with profile() as trace:
        _predict(model, how, images)
    for hook in hooks:
        hook.remove()
    return {event.key for event in trace.key_averages() if "attention" in event.key}, dense


def test_reference_mode_evaluates_every_expert_with_materialised_attention():
    model = _randomised(0)
    fast_ops, fast_dense = _attention_ops_and_expert_outputs(model, Execution())
    reference_ops, reference_dense = _attention_ops_and_expert_outputs(model, REFERENCE)
    assert fast_dense == [False] * 4 and reference_dense == [True] * 4
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in fast_ops
    assert not any("flash" in op or "efficient" in op for op in reference_ops)
    assert not model.dense_inference and torch.backends.mha.get_fastpath_enabled()  # restored on exit


def test_executing_restores_the_model_even_after_an_error():
    model = _randomised(0)
    with pytest.raises(RuntimeError, match="boom"), executing(model, REFERENCE, "cpu"):
        assert model.dense_inference and not torch.is_autocast_enabled("cpu")
        raise RuntimeError("boom")
    assert not model.dense_inference
    with executing(model, BF16, "cpu"):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_router_computes_in_float32_under_bf16_autocast():
    router = Router(d=4, num_experts=3, top_k=2)
    with torch.no_grad():  # logits 1 + 2^-10 and 1 round to the same bf16 value
        router.net.weight.copy_(torch.tensor([[1 + 2**-10, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    assert routing.probs.dtype == torch.float32
    assert routing.topk_index.tolist() == [[0, 1]]
    assert routing.probs[0, 0] > routing.probs[0, 1]


def test_compiled_backbone_gives_the_same_maps():
    model = _randomised(1)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = _predict(model, Execution(), images)
    compile_backbone(model, backend="eager")  # dynamo capture without a compiler: seconds, not minutes
    compiled = _predict(model, Execution(), images)
    torch.testing.assert_close(compiled[0], expected[0], rtol=1e-5, atol=1e-4)
    assert all(block._compiled_call_impl is not None for block in model.clip.visual.transformer.resblocks)
    assert all(not name.startswith("_orig_mod") for name in model.state_dict())


@pytest.fixture(scope="module")
def demo_frame(tmp_path_factory) -> pd.DataFrame:
    """The synthetic demo's MVTec-, Brain-MRI- and ColonDB-like test sets, 2 normal + 2 anomalous per class."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_datasets(root / "raw", seed=0, per_class=2)
    frames = []
    for name in ("mvtec", "brainmri", "colondb"):
        prepare_dataset(name, root / "raw" / name, root / f"{name}.parquet")
        frames.append(read_manifest(Path(root / f"{name}.parquet")))
    return pd.concat(frames, ignore_index=True)


def test_fast_path_gives_the_demo_metrics_of_the_reference(demo_frame):
    model = _randomised(2)
    points = {}
    for name, how in (("reference", REFERENCE), ("fast", fast_execution("cpu"))):
        per_class = evaluate_frame(model, demo_frame, batch_size=8, execution=how).per_class
        points[name] = per_class.groupby("dataset")[list(METRICS)].mean() * 100
    assert set(points["fast"].index) == {"mvtec", "brainmri", "colondb"}
    difference = (points["fast"] - points["reference"]).abs()
    assert difference.notna().sum().sum() == points["reference"].notna().sum().sum()
    assert difference.max().max() <= 0.1
