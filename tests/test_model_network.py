"""The assembled MoECLIP network on the tiny random-weight backbone."""
import pytest
import torch
import torch.nn.functional as F

from moeclip import ModelConfig, build_model
from moeclip.losses import balance_loss, etf_loss
from moeclip.methods.moeclip import count_parameters, patch_average
from moeclip.methods.moeclip.text import prompt_ensemble
from tiny_models import tiny_config


@pytest.fixture(scope="module")
def tiny():
    return build_model(tiny_config(), seed=0)


def _randomise_trainables(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_outputs_have_one_map_per_layer_and_scale(tiny):
    images = torch.randn(2, 3, 64, 64)
    tiny.train()
    maps, cosines, vision = tiny.training_outputs(images, ["bottle", "cable"])
    assert maps.shape == (2, 4 * 3, 2, 64, 64)
    assert cosines.shape == (2, 2)
    assert vision.patch_features.shape == (2, 12, 64, 32)
    torch.testing.assert_close(vision.patch_features.norm(dim=-1), torch.ones(2, 12, 64))
    assert set(vision.moe) == {1, 2, 3, 4}
    assert vision.moe[2].expert_outputs.shape == (2, 65, 4, 64)  # CLS + 8x8 patches, K experts


def test_prediction_is_sparse_and_equals_the_dense_forward():
    model = build_model(tiny_config(), seed=1)
    _randomise_trainables(model)
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        sparse = model.encode_image(images)
        dense = model.encode_image(images, dense=True)
        maps, scores = model.predict(images, ["wood", "wood"], "industrial")
    assert all(aux.expert_outputs is None for aux in sparse.moe.values())
    torch.testing.assert_close(sparse.patch_features, dense.patch_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.image_embedding, dense.image_embedding, rtol=1e-4, atol=1e-5)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_frozen_parameters_get_no_gradient_and_trained_ones_do():
    model = build_model(tiny_config(), seed=2)
    _randomise_trainables(model, seed=2)
    model.train()
    maps, cosines, vision = model.training_outputs(torch.randn(2, 3, 64, 64), ["screw", "pill"])
    loss = maps[:, :, 1].mean() + cosines.sum()
    loss = loss + sum(etf_loss(a.expert_outputs) + balance_loss(a.routing.probs) for a in vision.moe.values())
    loss.backward()
    for name, param in model.clip.named_parameters():
        assert param.grad is None, name
    for name, param in model.named_parameters():
        if name.endswith("lora_a"):
            assert param.grad is None, name
        elif param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("overrides", [
    dict(), dict(projection_activation=True, paa_scales=(3, 5), image_adapter=False)])
def test_batched_heads_equal_paa_ln_post_and_each_layers_projection(overrides):
    model = build_model(tiny_config(moe_layers=(1, 3), **overrides), seed=6).eval()
    _randomise_trainables(model, seed=6)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vision = model.encode_image(images)
        tokens = model._blocks(images, dense=False)[0]
        def project(layer: int, scale: int) -> torch.Tensor:
            pooled = model.clip.visual.ln_post(patch_average(tokens[layer][:, 1:], 8, scale))
            projected = model.projections[str(layer)].linear(pooled)
            if model.config.projection_activation:
                projected = F.leaky_relu(projected)
            return F.normalize(projected, dim=-1)

        expected = [project(layer, scale) for layer in (1, 3) for scale in model.config.paa_scales]
        last_s1 = project(3, 1)
    torch.testing.assert_close(vision.patch_features, torch.stack(expected, dim=1))
    if not model.config.image_adapter:
        torch.testing.assert_close(vision.image_embedding, last_s1.mean(dim=1))
    assert sorted(model.trainable_state_dict()) == sorted(  # the checkpoint keys of per-layer modules
        [k for k in model.trainable_state_dict() if not k.startswith("projections.")]
        + ["projections.1.linear.weight", "projections.3.linear.weight"])


def test_prompt_ensemble_is_every_template_times_every_state():
    normal, abnormal = prompt_ensemble("bottle")
    assert normal == ["bottle.", "a bottle.", "the bottle.", "a photo of bottle.", "a photo of a bottle.",
                      "a photo of the bottle."]
    assert len(abnormal) == 10 and "a photo of a bottle with defect." in abnormal
    assert "a damaged bottle." in abnormal


@pytest.mark.parametrize("head", ["release_adapter", "frozen_projection"])
def test_text_anchors_average_normalised_prompt_embeddings(head):
    model = build_model(tiny_config(text_head=head), seed=3)
    anchors = model.text_anchors(["bottle", "cable"])
    assert anchors.shape == (2, 2, 32)
    torch.testing.assert_close(anchors.norm(dim=-1), torch.ones(2, 2))
    tokens = model.text.tokenizer(prompt_ensemble("cable")[1])
    with torch.no_grad():
        eot = model.text._encode(tokens)
        projected = model.text.adapter(eot) if head == "release_adapter" else eot @ model.clip.text_projection
    expected = F.normalize(F.normalize(projected, dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(anchors[1, 1], expected)
    per_sample = model.anchors_per_sample(["cable", "bottle", "cable"])
    torch.testing.assert_close(per_sample, anchors[[1, 0, 1]])


def test_frozen_projection_equals_clips_own_text_encoder():
    model = build_model(tiny_config(text_head="frozen_projection"), seed=4)
    tokens = model.text.tokenizer(["a photo of a bottle."])
    with torch.no_grad():
        torch.testing.assert_close(model.text._encode(tokens) @ model.clip.text_projection, model.clip.encode_text(tokens))


def test_learnable_prompts_train_their_context_vectors():
    model = build_model(tiny_config(learnable_prompts=True), seed=5)
    anchors = model.text_anchors(["bottle"])
    anchors[0, 1].sum().backward()
    assert model.text.context_abnormal.grad.abs().sum() > 0
    with torch.no_grad():  # a random step (a constant shift would vanish in the LayerNorms)
        model.text.context_abnormal.add_(torch.randn(model.text.context_abnormal.shape,
                                                     generator=torch.Generator().manual_seed(0)))
        changed = model.text_anchors(["bottle"])
    assert (changed[0, 1] - anchors[0, 1]).abs().max() > 1e-3
    torch.testing.assert_close(changed[0, 0], anchors[0, 0])  # the normal context is untouched


def test_parameter_counts_split_backbone_and_added_modules(tiny):
    counts = tiny.parameter_counts()
    assert counts["total"] == counts["backbone"] + counts["added"]
    frozen_a = 4 * 4 * 8 * 64  # 4 layers x K x r x d
    assert counts["trainable"] == counts["added"] - frozen_a
    assert all(not k.startswith("clip.") for k in tiny.trainable_state_dict())


@pytest.mark.parametrize("changes", [{}, {"num_experts": 8, "lora_rank": 4}, {"expert_type": "full_rank"},
                                     {"router_type": "mlp", "learnable_prompts": True}, {"image_adapter": False},
                                     {"vanilla": True, "moe_layers": [], "output_layers": [2, 4], "text_head": "frozen_projection"}])
def test_counting_without_weights_matches_the_built_model(changes):
    """The smoke run's per-variant counts come from the meta device: they must be the built model's."""
    config = ModelConfig.model_validate({**tiny_config().model_dump(), **changes})
    assert count_parameters(config) == build_model(config, seed=0).parameter_counts()


def test_the_same_seed_builds_the_same_model_backbone_included():
    one, two = build_model(tiny_config(), seed=7), build_model(tiny_config(), seed=7)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_model(tiny_config(), seed=8)
    assert not torch.equal(other.clip.visual.conv1.weight, one.clip.visual.conv1.weight)


@pytest.mark.parametrize("overrides", [
    dict(output_layers=(3,)),
    dict(paa_scales=(3,), image_adapter=False),
    dict(num_experts=1, top_k=1),
    dict(expert_type="full_rank", router_type="mlp", router_noise=0.5),
    dict(moe_layers=(2,), output_layers=(2, 4), fofs=False, lora_rank=4),
    dict(vanilla=True, moe_layers=(), output_layers=(2, 4), text_head="frozen_projection"),
])
def test_ablation_variants_build_and_run(overrides):
    model = build_model(tiny_config(**overrides), seed=0).eval()
    layers = len(model.config.feature_layers) * len(model.config.paa_scales)
    with torch.no_grad():
        maps, scores = model.predict(torch.randn(1, 3, 64, 64), ["tile"], "medical")
        vision = model.encode_image(torch.randn(1, 3, 64, 64))
    assert vision.patch_features.shape[1] == layers
    assert maps.shape == (1, 64, 64) and torch.isfinite(scores).all()


def test_vanilla_clip_has_nothing_to_train():
    model = build_model(tiny_config(vanilla=True, moe_layers=(), output_layers=(4,),
                                         text_head="frozen_projection"))
    assert model.parameter_counts()["trainable"] == 0


@pytest.mark.parametrize("overrides,message", [
    (dict(top_k=5), "top_k"),
    (dict(paa_scales=(1, 2)), "odd"),
    (dict(vanilla=True), "vanilla"),
    (dict(moe_layers=(0,)), "1-indexed"),
])
def test_inconsistent_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_layers_beyond_the_backbone_depth_are_rejected():
    with pytest.raises(ValueError, match="4 blocks"):
        build_model(tiny_config(moe_layers=(6,)))


def test_backbone_attention_uses_fused_scaled_dot_product_attention(tiny, monkeypatch):
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    tiny.train()
    # an input that needs gradients (as for Grad-CAM) keeps every block on the autograd path
    tiny.training_outputs(torch.randn(1, 3, 64, 64, requires_grad=True), ["bottle"])
    assert calls.count(65) == 4  # each of the 4 ViT blocks, over CLS + 8x8 patches


def test_blocks_before_the_first_moe_layer_record_no_autograd_graph():
    model = build_model(tiny_config(moe_layers=(3, 4)), seed=0).train()
    recorded = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: recorded.append(out.requires_grad))
             for block in model.clip.visual.transformer.resblocks]
    model.training_outputs(torch.randn(1, 3, 64, 64), ["bottle"])
    for hook in hooks:
        hook.remove()
    assert recorded == [False, False, False, True]  # block 3 feeds the first MoE; block 4 follows it


@pytest.mark.parametrize("size", [48, 64])
def test_the_network_builds_its_own_inputs_at_its_size(tmp_path, size):
    """Every caller (training, evaluation, analysis, prediction) gets images from `model.inputs`."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    path = tmp_path / "part.png"
    Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8)).save(path)
    frame = pd.DataFrame({"image_path": [str(path)], "mask_path": [None], "label": [0], "class_name": ["part"],
                          "description": ["part"], "dataset": ["own"], "domain": ["industrial"]})
    item = build_model(tiny_config(image_size=size), seed=0).inputs(frame)[0]
    assert item["image"].shape == (3, size, size) and item["mask"].shape == (1, size, size)
    # CLIP normalisation: a flat grey of 200/255 becomes (0.784 - mean) / std per channel.
    torch.testing.assert_close(item["image"][:, 0, 0], torch.tensor([(200 / 255 - 0.48145466) / 0.26862954,
                                                                      (200 / 255 - 0.4578275) / 0.26130258,
                                                                      (200 / 255 - 0.40821073) / 0.27577711]))
