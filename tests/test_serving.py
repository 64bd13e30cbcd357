"""The calibrated model logged to MLflow answers requests from `mlflow models serve`, as `moeclip predict` scores,
and refuses a request with bad rows, naming each one (moeclip/bench/serving.py)."""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from moeclip.bench.serving import MAX_IMAGE_PIXELS, BadRequest, read_request
from moeclip.bench.serving import log_served_model
from moeclip.bench.tracking import start_run
from moeclip.calibration import Calibration
from moeclip.checkpoint import save_checkpoint, store_calibration
from moeclip.inference import run_prediction
from server_processes import free_port, start_group, stop_group
from tiny_models import randomised, tiny_config

CALIBRATION = Calibration(map_low=-1.0, map_high=3.0, score_low=0.4, score_high=0.6, image_threshold=0.5,
                          pixel_threshold=0.6, images=10)
SERVER_START_S = 600


def _png(size: tuple[int, int] = (50, 40), mode: str = "RGB", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels) if mode == "RGB" else Image.new(mode, size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Each bad row of a request, and the problem its refusal must name.
GOOD = _base64(_png())
BAD_ROWS = (
    ({"image": "not base64!", "class_name": "candle"}, "image is not base64"),
    ({"image": _base64(b"just some text, no image"), "class_name": "candle"}, "image is not an image file"),
    ({"image": _base64(_png()[:300]), "class_name": "candle"}, "image is truncated or corrupt"),
    ({"image": GOOD, "class_name": None}, "class_name is missing"),
    ({"image": GOOD, "class_name": "  "}, "class_name is empty"),
    ({"image": GOOD, "class_name": "candle", "domain": "space"},
     "domain 'space' is unknown (allowed: industrial, medical)"),
    ({"image": None, "class_name": "candle"}, "image is missing"),
)


def _post(url: str, body: dict) -> tuple[int, dict] | None:
    """(HTTP status, JSON answer), or None while the server does not answer yet."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS)
def test_each_bad_row_is_named_with_its_problem(row: dict, problem: str) -> None:
    frame = pd.DataFrame([{"image": GOOD, "class_name": "candle", "domain": "medical"}, row])
    with pytest.raises(BadRequest) as refused:
        read_request(frame)
    message = str(refused.value)
    assert message.startswith("1 of 2 rows are invalid, so nothing was scored: row 1: ")
    assert problem in message and "row 0" not in message


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded() -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1  # a blank PNG compresses to a few kB, however many pixels it has
    with pytest.raises(BadRequest, match=rf"row 0: image is too large to decode \({side}x{side} = {side * side} "
                                         rf"pixels; the limit is {MAX_IMAGE_PIXELS}\)"):
        read_request(pd.DataFrame([{"image": _base64(_png((side, side), "1")), "class_name": "candle"}]))


def test_good_rows_are_decoded_with_the_default_domain() -> None:
    wrapped = "\n".join(GOOD[i:i + 76] for i in range(0, len(GOOD), 76))  # as the `base64` command writes it
    frame = pd.DataFrame([{"image": wrapped, "class_name": "candle"},
                          {"image": GOOD, "class_name": "brain", "domain": "medical"}])
    rows = read_request(frame)
    assert [(row.image, row.class_name, row.domain) for row in rows] == [
        (_png(), "candle", "industrial"), (_png(), "brain", "medical")]
    with pytest.raises(BadRequest, match="the request has no rows"):
        read_request(frame.iloc[:0])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The calibrated tiny model, logged to MLflow and served by `mlflow models serve` on a loopback port;
    yields the /invocations URL and the checkpoint."""
    folder = tmp_path_factory.mktemp("serving")
    checkpoint = folder / "checkpoint.pt"
    save_checkpoint(checkpoint, randomised(tiny_config()), 0)
    store_calibration(checkpoint, CALIBRATION)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with start_run("serving", "model/test", uri, params={}) as run:
        model_uri = log_served_model(run, checkpoint)
    assert model_uri == f"runs:/{run.run_id}/model"
    port = free_port()
    # As docs/own-images.md says to run it: the environment's bin folder on PATH (MLflow starts `uvicorn` from there).
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    mlflow = str(Path(sys.executable).parent / "mlflow")
    log = folder / "serve.log"
    server = start_group([mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                          "-p", str(port)], folder, env, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _answers(f"http://127.0.0.1:{port}/ping"):
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/invocations", checkpoint
    finally:
        stop_group(server, 30)


@pytest.mark.timeout(900)
def test_the_served_model_scores_a_posted_image_as_predict_does(served: tuple[str, Path], tmp_path: Path) -> None:
    url, checkpoint = served
    image = tmp_path / "part.png"
    image.write_bytes(_png())
    expected = run_prediction([image], checkpoint, "candle", "industrial", tmp_path / "out", device="cpu")
    status, answer = _post(url, {"dataframe_split": {"columns": ["image", "class_name"],
                                                     "data": [[_base64(image.read_bytes()), "candle"]]}})
    assert status == 200, answer
    [row] = answer["predictions"]
    assert row["score"] == pytest.approx(expected["score"][0], abs=1e-6)
    assert row["label"] == expected["label"][0] and row["map_max"] == pytest.approx(expected["map_max"][0], abs=1e-6)
    with Image.open(io.BytesIO(base64.b64decode(row["map_png"]))) as served_map:
        assert served_map.size == (64, 64) and served_map.mode == "L"


@pytest.mark.timeout(900)
def test_the_server_refuses_a_request_with_bad_rows_naming_each(served: tuple[str, Path]) -> None:
    url, _ = served
    records = [{"image": GOOD, "class_name": "candle"}] + [row for row, _ in BAD_ROWS]
    status, answer = _post(url, {"dataframe_records": records})
    assert status == 400, answer
    message = answer["message"].partition("\nError: ")[2]  # after MLflow's "Failed to predict data '...'."
    assert message.startswith(f"{len(BAD_ROWS)} of {len(records)} rows are invalid, so nothing was scored: ")
    for position, (_, problem) in enumerate(BAD_ROWS, start=1):
        assert f"row {position}: {problem}" in message
    assert "row 0" not in message

    status, answer = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[GOOD]]}})
    assert status == 400 and "row 0: class_name is missing" in answer["message"], answer
