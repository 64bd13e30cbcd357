"""The calibrated model logged to MLflow answers requests from `mlflow models serve`, as `moeclip predict` scores."""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moeclip.bench.serving import log_served_model
from moeclip.bench.tracking import start_run
from moeclip.calibration import Calibration
from moeclip.checkpoint import save_checkpoint, store_calibration
from moeclip.inference import run_prediction
from server_processes import free_port, start_group, stop_group
from tiny_models import randomised, tiny_config

CALIBRATION = Calibration(map_low=-1.0, map_high=3.0, score_low=0.4, score_high=0.6, image_threshold=0.5,
                          pixel_threshold=0.6, images=10)


def _post(url: str, body: dict) -> dict | None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.timeout(900)
def test_the_served_model_scores_a_posted_image_as_predict_does(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, randomised(tiny_config()), 0)
    store_calibration(checkpoint, CALIBRATION)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("serving", "model/test", uri, params={}) as run:
        model_uri = log_served_model(run, checkpoint)
    assert model_uri == f"runs:/{run.run_id}/model"

    image = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    expected = run_prediction([image], checkpoint, "candle", "industrial", tmp_path / "out", device="cpu")

    port = free_port()
    # As the README says to run it: the environment's bin folder on PATH (MLflow starts `uvicorn` from there).
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    mlflow = str(Path(sys.executable).parent / "mlflow")
    server = start_group([mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                          "-p", str(port)], tmp_path, env, tmp_path / "serve.log")
    body = {"dataframe_split": {"columns": ["image", "class_name"],
                                "data": [[base64.b64encode(image.read_bytes()).decode(), "candle"]]}}
    try:
        deadline, answer = time.monotonic() + 600, None
        while answer is None:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
            answer = _post(f"http://127.0.0.1:{port}/invocations", body)
    finally:
        stop_group(server, 30)
    [row] = answer["predictions"]
    assert row["score"] == pytest.approx(expected["score"][0], abs=1e-6)
    assert row["label"] == expected["label"][0] and row["map_max"] == pytest.approx(expected["map_max"][0], abs=1e-6)
    with Image.open(io.BytesIO(base64.b64decode(row["map_png"]))) as served_map:
        assert served_map.size == (64, 64) and served_map.mode == "L"
