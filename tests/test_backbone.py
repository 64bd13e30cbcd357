"""Backbone loading: any open_clip ViT, any input size, weights from a file, clear errors offline."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from moeclip import build_model
from moeclip.backbone import TINY_BACKBONE, WeightsUnavailableError, default_moe_layers, load_clip
from moeclip.bench.cli import app
from tiny_models import paper_config


def test_positional_embedding_grid_is_resized_and_cls_kept(tmp_path):
    source = load_clip(TINY_BACKBONE, 64, weights=None, quick_gelu=False)  # 8x8 grid
    checkpoint = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), checkpoint)
    resized = load_clip(TINY_BACKBONE, 96, weights=str(checkpoint), quick_gelu=False)  # 12x12 grid
    old = source.visual.positional_embedding.detach()
    new = resized.visual.positional_embedding.detach()
    assert new.shape == (1 + 12 * 12, old.shape[1])
    torch.testing.assert_close(new[0], old[0])
    grid = old[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(new[1:], expected.permute(0, 2, 3, 1).reshape(144, -1))
    torch.testing.assert_close(resized.visual.conv1.weight, source.visual.conv1.weight)
    assert not any(p.requires_grad for p in resized.parameters())


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(WeightsUnavailableError, match=str(missing)):
        load_clip(TINY_BACKBONE, 64, weights=str(missing))


def test_corrupt_checkpoint_names_the_file(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="broken.pt"):
        load_clip(TINY_BACKBONE, 64, weights=str(broken))


def test_offline_openai_weights_say_what_to_download(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="openaipublic|huggingface.co") as info:
        load_clip("ViT-B-32", 224, weights="openai")
    assert "model.weights" in str(info.value)


def test_any_open_clip_vit_and_input_size_works():
    config = paper_config(backbone="ViT-B-32", image_size=448, weights=None, moe_layers=default_moe_layers("ViT-B-32"))
    model = build_model(config, seed=0).eval()
    assert config.moe_layers == (3, 6, 9, 12)
    assert model.grid == (14, 14)
    with torch.no_grad():
        maps, scores = model.predict(torch.randn(1, 3, 448, 448), ["bottle"], "industrial")
    assert maps.shape == (1, 448, 448) and scores.shape == (1,)


def test_params_cli_reports_the_paper_model_size():
    result = CliRunner().invoke(app, ["params", "--backbone", "ViT-L-14-336", "--image-size", "518", "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert math.isclose(counts["total"], 433.6e6, rel_tol=1e-3)
    assert counts["total"] == counts["backbone"] + counts["added"] == 433_561_857
    assert counts["trainable"] == 4_674_560
    assert counts["backbone"] == 428_756_225
