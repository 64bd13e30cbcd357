"""MLflow run logging and anomaly-map figures, against a throwaway SQLite store per module."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from moeclip.data.manifest import manifest_sha256
from moeclip.figures import anomaly_map_figure, save_figure
from moeclip.bench.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    RunLogger,
    flatten_params,
    git_commit,
    sanitize_key,
    start_run,
    tracking_uri_default,
)

EXPERIMENT = "tests"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")  # MLflow's own SQLAlchemy use


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One SQLite DB for the module (migrations take seconds); artifacts also under tmp."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    return {"uri": uri}


@pytest.fixture
def client(store: dict[str, str]) -> MlflowClient:
    return MlflowClient(store["uri"])


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A one-commit repository in tmp."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "init")
    return tmp_path


@pytest.fixture
def outside_git(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder git cannot find a repository above (in case tmp lies inside one)."""
    folder = tmp_path_factory.mktemp("outside")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(folder.parent))
    return folder


def _per_class() -> pd.DataFrame:
    return pd.DataFrame({
        "dataset": ["mvtec", "mvtec", "br35h"],
        "class_name": ["bottle", "screw+nut", "brain"],
        "n_images": [10, 12, 20], "n_anomalous": [5, 6, 10],
        "image_auroc": [0.9, 0.8, 0.7], "image_ap": [0.95, 0.85, 0.75],
        "pixel_auroc": [0.91, 0.81, math.nan], "pixel_ap": [0.5, 0.4, math.nan],
        "pixel_aupro": [0.6, 0.5, math.nan], "image_f1_max": [0.88, 0.78, 0.68],
        "pixel_f1_max": [0.45, 0.35, math.nan],
    })


def _summary(per_class: pd.DataFrame) -> pd.DataFrame:
    metrics = [c for c in per_class.columns if c not in ("dataset", "class_name", "n_images", "n_anomalous")]
    return (per_class.groupby("dataset")[metrics].mean() * 100).round(1)


def _image_and_map() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), rng.random((32, 40))


# --- pure helpers -------------------------------------------------------------------------

def test_flatten_params_nested_sequences_and_truncation() -> None:
    flat = flatten_params({"model": {"lora_rank": 8, "moe_layers": (6, 12), "fofs": True},
                           "seed": 0, "note": "x" * 10_000})
    assert flat["model.lora_rank"] == "8"
    assert flat["model.moe_layers"] == "[6, 12]"
    assert flat["model.fofs"] == "True" and flat["seed"] == "0"
    assert len(flat["note"]) == MAX_PARAM_VALUE_LENGTH and flat["note"].endswith("[truncated]")


def test_sanitize_key_keeps_allowed_characters() -> None:
    assert sanitize_key("mvtec.screw+nut.image_auroc") == "mvtec.screw_nut.image_auroc"
    assert sanitize_key("loss/total-1 a.b") == "loss/total-1 a.b"
    assert sanitize_key("visa:pcb1(é)") == "visa_pcb1___"


def test_git_commit_in_and_outside_repo(git_repo: Path, outside_git: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=git_repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(git_repo) == head
    (git_repo / "b.txt").write_text("new\n")
    assert git_commit(git_repo) == f"{head}-dirty"
    empty = outside_git / "not_a_repo"
    empty.mkdir()
    assert git_commit(empty) is None
    assert git_commit(outside_git / "missing") is None


def test_tracking_uri_default_is_local_sqlite() -> None:
    assert tracking_uri_default() == "sqlite:///mlflow.db"


# --- runs -----------------------------------------------------------------------------------

def test_run_round_trip(store: dict[str, str], client: MlflowClient, git_repo: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(git_repo)
    manifest = git_repo / "test.parquet"
    manifest.write_bytes(b"not really parquet, only hashed")
    per_class = _per_class()
    with start_run(EXPERIMENT, "round-trip", store["uri"], {"model": {"lora_rank": 8}, "seed": 3},
                   tags={"profile": "demo"}) as logger:
        logger.log_manifest_hashes({"mvtec": manifest})
        logger.log_metrics_table(per_class, _summary(per_class))
        logger.log_losses(0, {"loss/total": 2.0, "loss/fofs": 1.0})
        logger.log_losses(1, {"loss/total": 1.5, "loss/fofs": math.nan})
        logger.log_artifact(manifest, "data")
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "round-trip"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["model.lora_rank"] == "8" and params["seed"] == "3"
    assert params["manifest.mvtec.sha256"] == manifest_sha256(manifest)
    assert tags["profile"] == "demo"
    assert tags["git_commit"] == git_commit(git_repo)
    assert metrics["mvtec.bottle.image_auroc"] == pytest.approx(0.9)
    assert metrics["mvtec.screw_nut.pixel_aupro"] == pytest.approx(0.5)
    assert metrics["mvtec.image_auroc"] == pytest.approx(85.0)
    assert metrics["br35h.image_ap"] == pytest.approx(75.0)
    assert "br35h.brain.pixel_auroc" not in metrics and "br35h.pixel_auroc" not in metrics
    assert not any(key.endswith(("n_images", "n_anomalous")) for key in metrics)
    assert [m.value for m in client.get_metric_history(logger.run_id, "loss/total")] == [2.0, 1.5]
    assert len(client.get_metric_history(logger.run_id, "loss/fofs")) == 1
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"per_class.csv", "per_class.parquet", "summary.csv", "summary.json", "data"} <= artifacts
    local = Path(client.download_artifacts(logger.run_id, "per_class.parquet", str(git_repo)))
    pd.testing.assert_frame_equal(pd.read_parquet(local), per_class)


def test_run_without_uri_uses_env_and_outside_git_has_no_commit_tag(
        store: dict[str, str], client: MlflowClient, outside_git: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(outside_git)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    with start_run(EXPERIMENT, "no-git", None, {}) as logger:
        logger.log_metrics_table(_per_class(), None, step=2)
    run = client.get_run(logger.run_id)
    assert "git_commit" not in run.data.tags
    assert {a.path for a in client.list_artifacts(logger.run_id)} == {"per_class.csv", "per_class.parquet"}


def test_failing_body_marks_run_failed(store: dict[str, str], client: MlflowClient) -> None:
    holder: list[RunLogger] = []
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(EXPERIMENT, "fails", store["uri"], {"a": 1}) as logger:
            holder.append(logger)
            raise RuntimeError("boom")
    assert client.get_run(holder[0].run_id).info.status == "FAILED"


def test_losses_are_batched_yet_every_step_arrives(store: dict[str, str], client: MlflowClient,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    with start_run(EXPERIMENT, "losses", store["uri"], {}) as logger:
        monkeypatch.setattr(MlflowClient, "log_batch", counting)
        for step in range(150):  # 3 values a step: 450 values, fewer than one batch
            logger.log_losses(step, {"loss": 1.0 / (step + 1), "seg": 0.5, "ac": 0.25})
        assert calls == []  # nothing sent yet
        for step in range(150, 250):  # 750 values: one batch of 600 goes out
            logger.log_losses(step, {"loss": 1.0 / (step + 1), "seg": 0.5, "ac": 0.25})
        assert calls == [600]
    assert calls == [600, 150]  # the rest when the run ends
    history = client.get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(250))
    assert min(history, key=lambda m: m.step).value == pytest.approx(1.0)


def test_new_experiment_gets_given_artifact_location(tmp_path: Path, store: dict[str, str],
                                                     client: MlflowClient) -> None:
    location = (tmp_path / "elsewhere").as_uri()
    with start_run("created-here", "r", store["uri"], {}, artifact_location=location):
        pass
    assert client.get_experiment_by_name("created-here").artifact_location == location


def test_log_figure_lands_under_figures(store: dict[str, str], client: MlflowClient, tmp_path: Path) -> None:
    image, amap = _image_and_map()
    with start_run(EXPERIMENT, "figure", store["uri"], {}) as logger:
        logger.log_figure(anomaly_map_figure(image, None, amap, "bottle"), "bottle_000")
    assert [a.path for a in client.list_artifacts(logger.run_id, "figures")] == ["figures/bottle_000.png"]
    local = Path(client.download_artifacts(logger.run_id, "figures/bottle_000.png", str(tmp_path)))
    assert local.read_bytes().startswith(b"\x89PNG")


# --- figures --------------------------------------------------------------------------------

def test_anomaly_map_figure_has_three_panels_and_colourbar() -> None:
    image, amap = _image_and_map()
    fig = anomaly_map_figure(image.astype(np.float32) / 255, amap > 0.5, amap, "t")
    assert len(fig.axes) == 4  # image, ground truth, overlay, colourbar
    assert fig.get_suptitle() == "t"


def test_anomaly_map_figure_rejects_mismatched_map() -> None:
    image, amap = _image_and_map()
    with pytest.raises(ValueError, match="does not match"):
        anomaly_map_figure(image, None, amap[:10], "t")


def test_save_figure_writes_png_atomically(tmp_path: Path) -> None:
    image, amap = _image_and_map()
    path = save_figure(anomaly_map_figure(image, amap > 0.5, amap, "t"), tmp_path / "sub" / "f.png")
    assert path.stat().st_size > 0 and path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temp file left behind
