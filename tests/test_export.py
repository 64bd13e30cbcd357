"""The ONNX export of the inference path gives what PyTorch gives, on the same images."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from PIL import Image

from moeclip.checkpoint import load_model, read_calibration, save_checkpoint, store_calibration
from moeclip.calibration import Calibration
from moeclip.export import export_onnx
from tiny_models import randomised, tiny_config

CALIBRATION = Calibration(map_low=-1.0, map_high=3.0, score_low=0.4, score_high=0.6, image_threshold=0.5,
                          pixel_threshold=0.6, images=10)


def test_onnx_runtime_gives_the_pytorch_maps_and_scores_for_any_batch_size(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, randomised(tiny_config()), 0)
    store_calibration(checkpoint, CALIBRATION)
    exported = export_onnx(checkpoint, "candle", "industrial", tmp_path / "candle.onnx")
    metadata = {prop.key: prop.value for prop in onnx.load(exported).metadata_props}
    assert metadata["moeclip.class"] == "candle" and metadata["moeclip.image_threshold"] == "0.5"

    model, payload = load_model(checkpoint)
    assert read_calibration(checkpoint, payload) == CALIBRATION
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    frame = pd.DataFrame({"image_path": [str(p) for p in paths], "mask_path": None, "label": 0, "class_name": "candle",
                          "description": "candle", "dataset": "own", "domain": "industrial", "split": "test"})
    images = torch.stack([model.inputs(frame)[i]["image"] for i in range(3)])
    session = onnxruntime.InferenceSession(str(exported))
    assert [output.name for output in session.get_outputs()] == ["maps", "scores", "raw_maps", "raw_scores"]
    with torch.inference_mode():
        raw_maps, raw_scores = model.predict(images, ["candle"] * 3, "industrial")
    expected = (CALIBRATION.maps(raw_maps), CALIBRATION.scores(raw_maps, raw_scores, "industrial"), raw_maps,
                raw_scores)
    for batch in (images[:1], images):
        got = session.run(None, {"images": batch.numpy()})
        for name, value, reference in zip(("maps", "scores", "raw_maps", "raw_scores"), got, expected):
            assert value == pytest.approx(reference[:len(batch)].numpy(), abs=1e-4), name
