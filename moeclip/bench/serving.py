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
"""
from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from moeclip.bench.tracking import RunLogger

CHECKPOINT_ARTIFACT = "checkpoint"
# The model runs in an environment with this package installed (`--env-manager local`, or one built from these).
REQUIREMENTS = ["moeclip", "mlflow==3.17.2"]


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
        from moeclip.inference import check_images, predict_images

        frame = model_input.reset_index(drop=True)
        domains = frame["domain"] if "domain" in frame else pd.Series("industrial", index=frame.index)
        rows: dict[int, dict[str, object]] = {}
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for index, encoded in frame["image"].items():
                paths.append(Path(folder) / f"{index}")
                paths[-1].write_bytes(base64.b64decode(encoded))
            check_images(paths)
            for (class_name, domain), group in frame.groupby([frame["class_name"], domains], sort=False):
                chosen = [paths[index] for index in group.index]
                for index, prediction in zip(group.index, predict_images(self.model, self.calibration, chosen,
                                                                         class_name, domain, 8, self.device)):
                    rows[index] = {**prediction.statistics(self.calibration.pixel_threshold),
                                   "map_png": _png_base64(prediction.calibrated_map.numpy())}
        return pd.DataFrame([rows[index] for index in frame.index])


def log_served_model(run: RunLogger, checkpoint: Path) -> str:
    """The checkpoint as a pyfunc model in `run`; returns its `runs:/` URI."""
    return run.log_python_model(MoECLIPService(), {CHECKPOINT_ARTIFACT: checkpoint}, REQUIREMENTS)
