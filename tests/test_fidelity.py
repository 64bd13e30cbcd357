"""Where the paper and the authors' release differ (SPEC 5, 6, 11): each switch on known values,
and the choices the paper leaves open (initialisation, Dice smoothing, dropout masks) as the release has them."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeclip import build_model
from moeclip.checkpoint import FORMAT_VERSION, OutdatedCheckpointError, read_checkpoint, save_checkpoint
from moeclip.data.transforms import augment
from moeclip.losses import dice_loss, segmentation_loss
from moeclip.methods.moeclip.text import RELEASE_DESCRIPTIONS, prompt_descriptions
from moeclip.bench.params import load_profile
from moeclip.bench.tracking import flatten_params
from tiny_models import moe_adapter, paper_config, paper_training, randomised, tiny_config

ROOT = Path(__file__).resolve().parents[1]


# -- image score (SPEC 5, 6) --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["paper", "release"])
def test_the_model_scores_and_trains_on_the_chosen_image_similarity(kind):
    model = randomised(tiny_config(image_score=kind)).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vision = model.encode_image(images)
        patches = model.image_adapter(model.clip.visual.ln_post(model._blocks(images, None)[0][4][:, 1:]))
        anchors = model.anchors_per_sample(["bottle"] * 3)
        _, similarities, _ = model.training_outputs(images, ["bottle"] * 3)
        _, scores = model.predict(images, ["bottle"] * 3, "industrial")
    if kind == "paper":  # Eq. 13-14: mean of the raw outputs, then the cosine
        embedding = patches.mean(dim=1)
        expected = F.normalize(embedding, dim=-1) @ anchors[0].T
    else:  # release: mean of the unit outputs, plain dot product (its cross-entropy's logits too)
        embedding = F.normalize(patches, dim=-1).mean(dim=1)
        expected = embedding @ anchors[0].T
    torch.testing.assert_close(vision.image_embedding, embedding, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(similarities, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores, (expected[:, 1] + 1) / 2, atol=1e-6, rtol=1e-5)


# -- experts ------------------------------------------------------------------------------------
def test_each_expert_draws_its_own_dropout_mask():
    """With identical experts, a shared mask would give identical outputs; independent masks do not."""
    adapter = moe_adapter(16, num_experts=4, lora_rank=16, lora_dropout=0.5, expert_type="full_rank")
    with torch.no_grad():
        adapter.full.copy_(torch.eye(16).expand(4, 16, 16))
    adapter.train()
    torch.manual_seed(0)
    outputs = adapter.expert_outputs(torch.ones(200, 16))  # (tokens, K, d) = each expert's dropout(x)
    kept = outputs != 0
    assert not torch.equal(kept[:, 0], kept[:, 1]) and not torch.equal(kept[:, 2], kept[:, 3])
    assert 0.4 < kept.float().mean().item() < 0.6
    torch.testing.assert_close(outputs[kept], torch.full_like(outputs[kept], 2.0))  # 1 / (1 - p)

    lora = moe_adapter(16, num_experts=4, lora_rank=2, lora_dropout=0.5, fofs=False)
    with torch.no_grad():
        lora.lora_a.copy_(lora.lora_a[:1].expand(4, 2, 16))
        lora.lora_b.normal_()
        lora.lora_b.copy_(lora.lora_b[:1].expand(4, 16, 2))
    lora.train()
    dense = lora.expert_outputs(torch.randn(50, 16))
    assert not torch.allclose(dense[:, 0], dense[:, 1])
    lora.eval()
    same = lora.expert_outputs(torch.randn(50, 16))
    torch.testing.assert_close(same[:, 0], same[:, 1])  # no dropout at test time: identical experts agree


# -- losses and initialisation --------------------------------------------------------------------
def test_dice_paper_formula_and_release_smoothing():
    pred = torch.tensor([[0.5, 0.5]], requires_grad=True)
    empty = torch.zeros(1, 2)
    assert dice_loss(pred, empty, "paper").item() == pytest.approx(1.0)  # 1 - 0 / (1 + 1e-6)
    release = dice_loss(pred, empty, "release")
    assert release.item() == pytest.approx(1 - 1 / (1 + 1), rel=1e-6)  # 1 - (0 + 1) / (1 + 0 + 1)
    release.backward()
    assert pred.grad.abs().min().item() > 0.2  # it pushes p_A of a normal image down
    target = torch.tensor([[1.0, 0.0]])
    assert dice_loss(torch.tensor([[0.5, 0.5]]), target, "release").item() == pytest.approx(1 - 2 / 3, rel=1e-6)


def test_focal_paper_formula_and_release_smoothing():
    # One map of two anomalous pixels, predicted (normal, anomalous) = (0.3, 0.7) and (0.0, 1.0).
    maps = torch.tensor([[0.3, 0.0], [0.7, 1.0]]).reshape(1, 1, 2, 1, 2)  # (B, M, 2, H, W)
    mask = torch.ones(1, 1, 2)
    dice = (1 - 2 * 1.7 / (1.7 + 2 + 1e-6)) + 1.0  # anomaly channel vs the mask, normal channel vs an empty one

    def focal(p_true: float) -> float:
        return -(1 - p_true) ** 2 * math.log(p_true)

    paper = segmentation_loss(maps, mask, 2.0, focal="paper").item()
    assert paper == pytest.approx((focal(0.7) + focal(1.0)) / 2 + dice, rel=1e-6)
    s = 1e-5  # the one-hot target clamped to [s, 1 - s], s added to p_t
    release = segmentation_loss(maps, mask, 2.0, focal="release").item()
    assert release == pytest.approx((focal(s * 0.3 + (1 - s) * 0.7 + s) + focal((1 - s) * 1.0 + s)) / 2 + dice,
                                    rel=1e-6)
    # A confidently wrong pixel: -log p_t is 18.4 at the paper's 1e-8 floor, -log(2 s) = 10.8 smoothed.
    wrong, anomalous = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1), torch.ones(1, 1, 1)
    difference = (segmentation_loss(wrong, anomalous, 2.0, focal="paper")
                  - segmentation_loss(wrong, anomalous, 2.0, focal="release")).item()
    clamped = torch.tensor(1 - s).item()  # 1 - s in float32, as the loss computes: 1 - clamped is 1.00136e-5
    assert difference == pytest.approx(focal(1e-8) - focal((1 - clamped) + s), rel=1e-6)
    assert focal(2 * s) == pytest.approx(10.82, abs=0.01)


def test_heads_start_xavier_uniform_as_in_the_release():
    model = build_model(tiny_config(), seed=3)
    width, embed = 64, 32
    depthwise = model.image_adapter.depthwise.weight  # (d, 1, 3): fan_in 3, fan_out 3 d
    pointwise = model.image_adapter.pointwise.weight  # (D, d, 1)
    text = model.text.adapter[0].weight  # (D, text width 64)
    for weight, fan_in, fan_out in ((depthwise, 3, 3 * width), (pointwise, width, embed), (text, 64, embed)):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert weight.abs().max().item() <= bound
        assert weight.abs().max().item() > 0.9 * bound


def test_release_text_adapter_keeps_its_leaky_relu():
    model = build_model(tiny_config(), seed=0)
    head = model.text
    with torch.no_grad():
        head.adapter[0].weight.copy_(torch.eye(32, 64))
    eot = torch.zeros(1, 64)
    eot[0, :2] = torch.tensor([-1.0, 2.0])
    projected = head._project(eot)[0, :2]
    torch.testing.assert_close(projected, torch.tensor([-0.01, 2.0]))


# -- augmentation ---------------------------------------------------------------------------------
def _bar_angle(mask: torch.Tensor) -> float:
    """Orientation (degrees, in (-90, 90]) of a mask's pixels from their second moments."""
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    x, y = xs.double() - xs.double().mean(), ys.double() - ys.double().mean()
    return math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def test_rotation_reaches_thirty_degrees_and_no_further():
    mask = torch.zeros(1, 64, 64)
    mask[0, 31:33, 20:44] = 1.0  # a horizontal bar through the centre
    angles = [abs(_bar_angle(augment(torch.zeros(3, 64, 64), mask, torch.Generator().manual_seed(seed))[1]))
              for seed in range(200)]
    assert max(angles) > 25.0
    assert max(angles) < 32.0  # 30 degrees, plus the nearest-neighbour resampling of a 2-px bar


# -- the release's descriptions, the release profile, and what is recorded -------------------
def test_release_description_set_is_verbatim_and_only_differs_where_the_release_does():
    batch = {"dataset": ["mvtec", "btad", "mvtec", "visa"], "class_name": ["capsule", "01", "bottle", "pcb1"],
             "description": ["black and orange capsule", "product", "dark bottle",
                             "dual ultrasonic distance sensor pcb module"]}
    release = prompt_descriptions(batch, tiny_config(description_set="release"))
    assert release[0] == "black asd orange capsule"
    assert release[1] == RELEASE_DESCRIPTIONS[("btad", "01")] and release[1].startswith("Bright concentric rings")
    assert release[2:] == batch["description"][2:]
    assert prompt_descriptions(batch, tiny_config()) == batch["description"]
    assert prompt_descriptions(batch, tiny_config(use_class_descriptions=False)) == batch["class_name"]


def test_the_release_profile_switches_every_documented_difference():
    paper, release = load_profile(ROOT / "params.yaml", "paper"), load_profile(ROOT / "params.yaml", "release")
    assert (paper.model.image_score, release.model.image_score) == ("paper", "release")
    assert (paper.model.quick_gelu, release.model.quick_gelu) == (True, False)
    assert (paper.model.description_set, release.model.description_set) == ("datasets", "release")
    assert (paper.model.classification_loss, release.model.classification_loss) == ("bce", "cross_entropy")
    assert (paper.model.release_compat, release.model.release_compat) == (False, True)
    assert (paper.model.dice, release.model.dice) == ("paper", "release")
    assert (paper.model.focal, release.model.focal) == ("paper", "release")
    assert (paper.model.balance_unbiased, release.model.balance_unbiased) == (False, True)
    assert (paper.train.lr, release.train.lr) == (5e-4, 5e-5)
    assert paper.model.precision == release.model.precision == "fp32"
    same = {"backbone", "image_size", "moe_layers", "num_experts", "top_k", "lora_rank", "paa_scales", "text_head"}
    assert {k: getattr(paper.model, k) for k in same} == {k: getattr(release.model, k) for k in same}


def test_every_switch_is_recorded_in_the_run_params():
    params = flatten_params({"model": paper_config().model_dump(mode="json"),
                             "train": paper_training().model_dump(mode="json")})
    for key, value in {"model.image_score": "paper", "model.description_set": "datasets", "model.precision": "fp32",
                       "model.quick_gelu": "True", "model.dice": "paper",
                       "model.classification_loss": "bce", "train.lr": "0.0005"}.items():
        assert params[key] == value


def test_a_checkpoint_of_the_old_format_is_refused_with_the_reason(tmp_path):
    model = build_model(tiny_config(), seed=0)
    path = tmp_path / "old.pt"
    save_checkpoint(path, model, 0)
    payload = torch.load(path, weights_only=False)
    for old, why in ((1, "a formula that is neither"), (2, "its model config lacks the loss settings")):
        torch.save({**payload, "format": old}, path)
        with pytest.raises(OutdatedCheckpointError, match=rf"has format {old}, .* reads format {FORMAT_VERSION} "
                                                          rf"\(.*{why}.*\): retrain it$"):
            read_checkpoint(path)
