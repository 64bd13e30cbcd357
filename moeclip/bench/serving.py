"""A calibrated checkpoint as an MLflow model (pyfunc), so `mlflow models serve -m runs:/<run id>/model` scores
images sent to it.

Request (`POST /invocations`, JSON `dataframe_split` or `dataframe_records`), one row per image:
  image       the image file's bytes (PNG, JPEG, ...) in base64
  class_name  what it shows, used in the prompts (e.g. "metal nut")
  domain      optional, industrial (default) or medical
Response, one row per image: the columns of `moeclip predict`'s results (score and label on the checkpoint's
calibrated scale, moeclip/calibration.py; image_score_raw, map_max_raw, map_mean_raw, map_max,
anomalous_area), and map_png: the calibrated anomaly map at the model's input size as a base64 8-bit grey
PNG (0 = 0.0, 255 = 1.0).

Every row is checked before any is scored. A request with a bad row is refused whole (HTTP 400, nothing
scored), with one message naming every bad row by its 0-based position and its problem: the image is
missing, not base64, not an image, truncated or larger than Pillow's decompression-bomb limit; class_name
is missing or empty; domain is not industrial or medical. Refusing the whole request keeps answers
one-to-one with the rows sent, so a client never has to match partial answers to its rows.
"""
from __future__ import annotations

import base64
import binascii
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from PIL import Image, UnidentifiedImageError

from moeclip.bench.tracking import RunLogger
from moeclip.config import Domain

CHECKPOINT_ARTIFACT = "checkpoint"
# The model runs in an environment with this package installed (`--env-manager local`, or one built from these).
REQUIREMENTS = ["moeclip", "mlflow==3.17.2"]
DOMAINS: tuple[str, ...] = get_args(Domain)
# Pillow's own decompression-bomb threshold (about 89.5 megapixels): a larger image is refused before decoding.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class RequestRow:
    """One checked row of a request: the decoded image file and what to score it as."""

    image: bytes
    class_name: str
    domain: Domain


class BadRequest(ValueError):
    """A request with bad rows; the message names each one."""


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _image_problem(value: object) -> tuple[bytes | None, str | None]:
    """The decoded image file, or why the value is not one."""
    if _missing(value):
        return None, "image is missing"
    if not isinstance(value, str):
        return None, f"image must be a base64 string, not {type(value).__name__}"
    try:  # line breaks, as the `base64` command writes them, are fine
        data = base64.b64decode("".join(value.split()), validate=True)
    except binascii.Error as err:
        return None, f"image is not base64 ({err})"
    try:  # Pillow warns of an image over the limit on opening; it is refused below
        with (warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning),
              Image.open(io.BytesIO(data)) as image):
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return None, (f"image is too large to decode ({width}x{height} = {width * height} pixels; "
                              f"the limit is {MAX_IMAGE_PIXELS})")
            image.load()
    except UnidentifiedImageError:
        return None, "image is not an image file (its decoded bytes are in no format Pillow reads)"
    except Image.DecompressionBombError as err:
        return None, f"image is too large to decode ({err})"
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's plugins raise all three for damaged files
        return None, f"image is truncated or corrupt ({err})"
    return data, None


def _class_name_problem(value: object) -> str | None:
    if _missing(value):
        return "class_name is missing"
    if not isinstance(value, str):
        return f"class_name must be text, not {type(value).__name__}"
    return "class_name is empty" if not value.strip() else None


def _domain_problem(value: object) -> str | None:
    if value in DOMAINS:
        return None
    return f"domain {value!r} is unknown (allowed: {', '.join(DOMAINS)})"


def read_request(frame: pd.DataFrame) -> list[RequestRow]:
    """The request's rows, checked and decoded; `BadRequest` names every bad row and its problems."""
    if not frame.shape[0]:
        raise BadRequest("the request has no rows; send one row per image (columns image, class_name, domain)")
    rows: list[RequestRow] = []
    problems: list[str] = []
    for position, record in enumerate(frame.to_dict("records")):
        image, image_problem = _image_problem(record.get("image"))
        class_name, domain = record.get("class_name"), record.get("domain")
        domain = "industrial" if _missing(domain) else domain
        found = [p for p in (image_problem, _class_name_problem(class_name), _domain_problem(domain)) if p]
        if found:
            problems.append(f"row {position}: {', '.join(found)}")
        else:
            rows.append(RequestRow(image, class_name, domain))
    if problems:
        raise BadRequest(f"{len(problems)} of {frame.shape[0]} rows are invalid, so nothing was scored: "
                         + "; ".join(problems))
    return rows


def _png_base64(values: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class MoECLIPService(mlflow.pyfunc.PythonModel):
    """Scores every image of a request alone, on the checkpoint's calibrated scale."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from moeclip.checkpoint import load_model, read_calibration
        from moeclip.runtime import resolve_device

        path = Path(context.artifacts[CHECKPOINT_ARTIFACT])
        self.device = resolve_device("auto")
        self.model, payload = load_model(path, self.device)
        self.calibration = read_calibration(path, payload)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        from moeclip.inference import predict_images

        try:
            rows = read_request(model_input)
        except BadRequest as err:  # MLflow answers an MlflowException with its code and message
            raise MlflowException(str(err), error_code=BAD_REQUEST) from None
        answers: dict[int, dict[str, object]] = {}
        with tempfile.TemporaryDirectory() as folder:
            paths = [Path(folder) / f"{position}" for position in range(len(rows))]
            for path, row in zip(paths, rows):
                path.write_bytes(row.image)
            groups: dict[tuple[str, Domain], list[int]] = {}
            for position, row in enumerate(rows):
                groups.setdefault((row.class_name, row.domain), []).append(position)
            for (class_name, domain), positions in groups.items():
                chosen = [paths[position] for position in positions]
                for position, prediction in zip(positions, predict_images(self.model, self.calibration, chosen,
                                                                          class_name, domain, 8, self.device)):
                    answers[position] = {**prediction.statistics(self.calibration.pixel_threshold),
                                         "map_png": _png_base64(prediction.calibrated_map.numpy())}
        return pd.DataFrame([answers[position] for position in range(len(rows))])


def log_served_model(run: RunLogger, checkpoint: Path) -> str:
    """The checkpoint as a pyfunc model in `run`; returns its `runs:/` URI."""
    return run.log_python_model(MoECLIPService(), {CHECKPOINT_ARTIFACT: checkpoint}, REQUIREMENTS)
