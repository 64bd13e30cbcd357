"""The CLI's commands on the offline demo profile: demo, train (with resume), evaluate (predict: test_inference.py)."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import moeclip.checkpoint
import moeclip.training
from moeclip.bench.cli import app
from moeclip.bench.params import ParamsError, load_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def quick_params(tmp_path, monkeypatch) -> Path:
    """The repository's demo profile with 1 epoch, run inside tmp_path."""
    document = yaml.safe_load((ROOT / "params.yaml").read_text())
    document["profiles"]["demo"]["train"].update(epochs=1, checkpoint_every=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document))
    monkeypatch.chdir(tmp_path)
    return path


def test_demo_runs_prepare_train_and_evaluate_with_mlflow(quick_params, tmp_path):
    result = CliRunner().invoke(app, ["demo", "--config", str(quick_params)])
    assert result.exit_code == 0, result.output
    targets = set(yaml.safe_load(quick_params.read_text())["main"]["targets"]["visa"])
    for stage in ("eval-untrained", "eval-trained"):
        summary = json.loads((tmp_path / "runs/demo/before-after" / stage / "summary.json").read_text())
        assert set(summary) == targets
        assert 0 <= summary["mvtec"]["pixel_auroc"] <= 100
    assert (tmp_path / "runs/demo/before-after/train/checkpoint.pt").is_file()
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("zsad-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["calibrate", "evaluate", "evaluate", "train"]
    evaluation = next(r for r in runs if r.info.run_name == "eval-trained")
    written_ms = (tmp_path / "runs/demo/before-after/eval-trained/summary.json").stat().st_mtime * 1000
    assert evaluation.info.start_time <= written_ms <= evaluation.info.end_time  # the run spans the evaluation
    assert "mvtec.pixel_auroc" in evaluation.data.metrics and "model.backbone" in evaluation.data.params
    assert "manifest.mvtec.sha256" in evaluation.data.params
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"per_class.csv", "summary.json", "figures"} <= artifacts
    # `tracking.figures_per_dataset` (1 in the demo profile): one example map per dataset, though every class of a
    # dataset has an example (some datasets have none to show)
    figures = [Path(a.path).name.split("-")[0] for a in client.list_artifacts(evaluation.info.run_id, "figures")]
    assert len(figures) == len(set(figures)) and {"mvtec", "btad"} <= set(figures) <= targets


def test_train_stops_and_resumes_from_its_checkpoint(quick_params, tmp_path, monkeypatch):
    profile = load_profile(quick_params, "demo")
    CliRunner().invoke(app, ["data", "demo", "--out", str(profile.layout.data / "raw")])
    CliRunner().invoke(app, ["data", "prepare", "visa", "--root", str(profile.layout.raw("visa")),
                             "--out", str(profile.layout.manifest("visa"))])
    first = CliRunner().invoke(app, ["train", "--config", str(quick_params), "--max-steps", "3"])
    assert first.exit_code == 0, first.output
    checkpoint = Path(first.stdout.strip().splitlines()[-1])
    partial = torch.load(checkpoint, weights_only=False)
    assert partial["progress"]["global_step"] == 3 and "calibration" not in partial  # calibrated once finished
    builds = []

    def counted(build):
        def build_and_count(*args, **kwargs):
            builds.append(args)
            return build(*args, **kwargs)
        return build_and_count

    for module in (moeclip.training, moeclip.checkpoint):  # where the trainer and load_model build a network
        monkeypatch.setattr(module, "build_method", counted(module.build_method))
    second = CliRunner().invoke(app, ["train", "--config", str(quick_params)])
    assert second.exit_code == 0, second.output
    finished = torch.load(checkpoint, weights_only=False)
    assert finished["progress"]["complete"] and "calibration" in finished
    assert len(builds) == 1  # trained and calibrated with one network: calibration uses the model in memory


def test_evaluate_logs_where_the_profile_says_unless_told_otherwise(quick_params, tmp_path):
    from moeclip.bench.workflows import untrained_checkpoint

    profile = load_profile(quick_params, "demo")
    CliRunner().invoke(app, ["data", "demo", "--out", str(profile.layout.data / "raw")])
    CliRunner().invoke(app, ["data", "prepare", "mvtec", "--root", str(profile.layout.raw("mvtec")),
                             "--out", str(profile.layout.manifest("mvtec"))])
    checkpoint = untrained_checkpoint(profile.model, 0, tmp_path / "model.pt")
    common = ["evaluate", "--checkpoint", str(checkpoint), "--manifest", str(profile.layout.manifest("mvtec")),
              "--config", str(quick_params)]
    first = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "first")])
    second = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "second"), "--experiment", "mine",
                                      "--batch-size", "3"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    client = MlflowClient(tracking_uri=profile.tracking.uri)  # the profile's store
    ours = f"params.checkpoint = '{checkpoint}'"  # MLflow keeps one store per URI in a process: count ours only
    assert [len(client.search_runs([client.get_experiment_by_name(name).experiment_id], ours))
            for name in (profile.tracking.experiment, "mine")] == [1, 1]
    for out in ("first", "second"):  # the batch size changes memory and speed, not the numbers
        assert json.loads((tmp_path / out / "summary.json").read_text()) == \
            json.loads((tmp_path / "first" / "summary.json").read_text())


def test_unknown_profile_and_missing_manifests_are_clear_errors(quick_params):
    with pytest.raises(ParamsError, match="no profile 'nope'"):
        load_profile(quick_params, "nope")
    result = CliRunner().invoke(app, ["train", "--config", str(quick_params)])
    assert result.exit_code != 0
    assert "moeclip data prepare" in str(result.exception)
