"""Training losses on known values (SPEC 7, Eqs. 15-16, B.3, B.4), and a killed run resuming exactly."""
import math
from pathlib import Path

import pytest
import torch

from moeclip.checkpoint import CheckpointError, load_model, read_checkpoint
from moeclip.data.manifest import read_manifest
from moeclip.data.prepare import prepare_dataset
from moeclip.data.synthetic import generate_demo_datasets
from moeclip.losses import (
    balance_loss,
    classification_loss,
    dice_loss,
    etf_loss,
    expert_contrastive_loss,
    expert_cosine_loss,
    focal_loss,
    segmentation_loss,
)
from moeclip.bench.layout import CHECKPOINT
from moeclip.training import Trainer, compute_losses, train
from tiny_models import paper_training, tiny_config


def test_focal_loss_uses_the_true_class_probability():
    probs = torch.tensor([[[[0.2, 0.5]], [[0.8, 0.5]]]])  # (B=1, 2, H=1, W=2): [normal, anomalous]
    mask = torch.tensor([[[1.0, 0.0]]])
    expected = (-(0.2 ** 2) * math.log(0.8) - (0.5 ** 2) * math.log(0.5)) / 2
    assert focal_loss(probs, mask, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_known_values():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.zeros(1, 4), target).item() == pytest.approx(1.0)
    pred = torch.tensor([[0.5, 1.0, 0.5, 0.0]])  # overlap 1.5, sums 2 + 2
    assert dice_loss(pred, target).item() == pytest.approx(1 - 3 / 4, rel=1e-6)
    assert dice_loss(torch.stack([pred[0], target[0]]), torch.cat([target, target])).item() == pytest.approx(0.125, rel=1e-5)


def test_segmentation_loss_sums_focal_and_both_dice_terms_over_maps():
    probs_a = torch.rand(2, 1, 4, 4)
    one_map = torch.cat([1 - probs_a, probs_a], dim=1)  # (B, 2, H, W)
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    single = focal_loss(one_map, mask) + dice_loss(one_map[:, 1], mask) + dice_loss(one_map[:, 0], 1 - mask)
    maps = torch.stack([one_map] * 3, dim=1)
    assert segmentation_loss(maps, mask).item() == pytest.approx(3 * single.item(), rel=1e-6)


def test_segmentation_loss_ignores_samples_without_known_masks():
    generator = torch.Generator().manual_seed(0)
    anomalous = torch.rand(3, 4, 1, 5, 5, generator=generator)
    maps = torch.cat([1 - anomalous, anomalous], dim=2)  # (B=3, M=4, 2, H, W)
    mask = (torch.rand(3, 5, 5, generator=generator) > 0.5).float()
    known = torch.tensor([True, False, True])
    expected = segmentation_loss(maps[[0, 2]], mask[[0, 2]])
    assert segmentation_loss(maps, mask, known=known).item() == pytest.approx(expected.item(), rel=1e-6)
    assert segmentation_loss(maps, mask, known=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_classification_loss_variants():
    cosines = torch.tensor([[0.1, 0.6], [0.4, -0.2]])
    labels = torch.tensor([1, 0])
    bce = -(math.log(0.8) + math.log(1 - 0.4)) / 2  # S_A = (cos_A + 1) / 2 = 0.8 and 0.4
    assert classification_loss(cosines, labels, "bce").item() == pytest.approx(bce, rel=1e-6)
    ce = torch.nn.functional.cross_entropy(cosines, labels).item()
    assert classification_loss(cosines, labels, "cross_entropy").item() == pytest.approx(ce)
    with pytest.raises(ValueError, match="unknown"):
        classification_loss(cosines, labels, "hinge")


def test_alternative_expert_constraints():
    same = torch.randn(5, 1, 8).expand(5, 4, 8)
    assert expert_cosine_loss(same).item() == pytest.approx(1.0, rel=1e-6)
    orthogonal = torch.eye(4).expand(5, 4, 4)
    assert expert_cosine_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    consistent = torch.eye(4).expand(6, 4, 4) * 3  # each expert its own direction, on every token
    assert expert_contrastive_loss(consistent).item() < expert_contrastive_loss(same).item()
    assert expert_contrastive_loss(torch.randn(3, 1, 8)).item() == 0.0


@pytest.fixture(scope="module")
def visa_frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo_datasets(root / "raw", seed=0, per_class=2)
    prepare_dataset("visa", root / "raw" / "visa", root / "visa.parquet")
    return read_manifest(root / "visa.parquet").head(8)


TINY = tiny_config(moe_layers=(2, 4))


def test_release_compat_trains_without_etf_and_balance(visa_frame, tmp_path):
    release = TINY.model_copy(update={"release_compat": True})
    trainer = Trainer(release, paper_training(batch_size=4), visa_frame, tmp_path / CHECKPOINT)
    batch = next(iter(trainer._loader([[0, 1, 2, 3]])))
    trainer.model.eval()
    losses = compute_losses(trainer.model, batch, trainer.device)
    assert losses["expert_constraint_loss"].item() == 0.0 and losses["balance_loss"].item() == 0.0
    trainer.model.config = TINY  # the same weights under the paper's objective
    trainer.model.train()
    paper = compute_losses(trainer.model, batch, trainer.device)
    assert paper["expert_constraint_loss"].item() > 0 and paper["segmentation_loss"].item() > 0


def test_the_method_says_whether_its_training_runs_in_train_mode(visa_frame, tmp_path):
    """The release trains in eval mode; the trainer asks the method, so the generic settings hold no such switch."""
    for config, mode in ((TINY, True), (TINY.model_copy(update={"release_compat": True}), False)):
        trainer = Trainer(config, paper_training(batch_size=4), visa_frame, tmp_path / str(mode) / CHECKPOINT)
        assert trainer.model.trains_in_train_mode() is mode
        trainer.model.train(not mode)
        trainer._step(next(iter(trainer._loader([[0, 1, 2, 3]]))))
        assert trainer.model.training is mode and not trainer.model.clip.training


def test_the_learning_rate_steps_per_iteration_and_adam_uses_the_papers_betas(visa_frame, tmp_path):
    config = paper_training(batch_size=1, lr=1e-3, milestones=(3,), gamma=0.5, epochs=1)  # 8 steps in the epoch
    trainer = Trainer(TINY, config, visa_frame, tmp_path / CHECKPOINT)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.5, 0.999) == paper_training().betas
    trainer.run(max_steps=4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # halved after iteration 3


def test_total_loss_adds_the_weighted_constraint_summed_over_layers_and_the_balance(visa_frame, tmp_path):
    model_config = TINY.model_copy(update={"lora_dropout": 0.0, "lambda_etf": 0.3, "lambda_bal": 0.7})
    trainer = Trainer(model_config, paper_training(batch_size=4), visa_frame, tmp_path / CHECKPOINT)
    with torch.no_grad():
        for adapter in trainer.model.moe.values():
            adapter.router.net.weight.normal_(std=0.5)  # uneven routing: a non-zero balance loss
            adapter.lora_b.normal_(std=0.1)
    trainer.model.train()
    batch = next(iter(trainer._loader([[0, 1, 2, 3]])))
    losses = compute_losses(trainer.model, batch, trainer.device)
    with torch.no_grad():
        vision = trainer.model.encode_image(batch["image"])
    per_layer = [etf_loss(aux.expert_outputs).item() for aux in vision.moe.values()]
    balances = [balance_loss(aux.routing.probs).item() for aux in vision.moe.values()]
    assert len(per_layer) == 2 and min(balances) > 1e-4
    assert losses["expert_constraint_loss"].item() == pytest.approx(sum(per_layer), rel=1e-5)  # summed, not averaged
    assert losses["balance_loss"].item() == pytest.approx(sum(balances), rel=1e-5)
    expected = losses["segmentation_loss"] + losses["classification_loss"] + 0.3 * losses["expert_constraint_loss"] + 0.7 * losses["balance_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_killed_run_resumes_to_the_same_weights(visa_frame, tmp_path):
    config = paper_training(epochs=2, batch_size=3, lr=1e-3, checkpoint_every=2)
    whole = train(TINY, config, visa_frame, tmp_path / "whole" / CHECKPOINT)
    assert whole.steps == 6
    interrupted = train(TINY, config, visa_frame, tmp_path / "killed" / CHECKPOINT, max_steps=4)
    assert interrupted.steps == 4 and not read_checkpoint(interrupted.checkpoint)["progress"]["complete"]
    resumed = train(TINY, config, visa_frame, tmp_path / "killed" / CHECKPOINT)
    assert resumed.steps == 6
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    a = read_checkpoint(whole.checkpoint)["weights"]
    b = read_checkpoint(resumed.checkpoint)["weights"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["checkpoint.pt"]  # no temporary files


def test_a_step_budget_ends_the_training_complete_and_equal_to_its_first_steps(visa_frame, tmp_path):
    """`max_steps` (the smoke run's bound) is a finished training, unlike a paused one."""
    bounded = train(TINY, paper_training(epochs=3, batch_size=3, max_steps=4), visa_frame, tmp_path / "bounded" / CHECKPOINT)
    assert bounded.steps == 4 and read_checkpoint(bounded.checkpoint)["progress"]["complete"]
    assert train(TINY, paper_training(epochs=3, batch_size=3, max_steps=4), visa_frame, tmp_path / "bounded" / CHECKPOINT).steps == 4
    whole = train(TINY, paper_training(epochs=3, batch_size=3), visa_frame, tmp_path / "whole" / CHECKPOINT)
    assert whole.steps == 9
    assert [h["loss"] for h in bounded.history] == [h["loss"] for h in whole.history[:4]]


def test_resume_refuses_a_checkpoint_of_another_configuration(visa_frame, tmp_path):
    train(TINY, paper_training(epochs=1, batch_size=4), visa_frame, tmp_path / CHECKPOINT, max_steps=1)
    with pytest.raises(CheckpointError, match="another configuration"):
        train(TINY, paper_training(epochs=1, batch_size=4, lr=1e-2), visa_frame, tmp_path / CHECKPOINT)


def test_trained_checkpoint_loads_for_inference(visa_frame, tmp_path):
    result = train(TINY, paper_training(epochs=1, batch_size=4), visa_frame, tmp_path / CHECKPOINT)
    model, payload = load_model(result.checkpoint)
    assert payload["progress"]["complete"] and not model.training
    trained = read_checkpoint(result.checkpoint)["weights"]
    assert any(k.endswith("lora_b") and v.abs().sum() > 0 for k, v in trained.items())
    assert all(not k.startswith("clip.") for k in trained)


def test_bad_checkpoints_name_the_file(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_model(broken)
