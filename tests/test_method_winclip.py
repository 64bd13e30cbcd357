"""WinCLIP (moeclip/methods/winclip.py) against straightforward reference computations of ../shared/BASELINES.md 1.

The references below are written independently of the method: the prompt lists spelled out, the windows found
by loops over the grid, each window's sequence run through the model's own open_clip modules one at a time,
the harmonic means by loops, and the bilinear upsampling as explicit interpolation matrices.
"""
from __future__ import annotations

import open_clip
import pydantic
import pytest
import torch
import torch.nn.functional as F

from moeclip.backbone import load_clip, tokenizer_for
from moeclip.methods.winclip import (
    WinCLIP,
    WinCLIPConfig,
    winclip_prompts,
    window_index,
)

TAU = 0.07
STATES_NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
STATES_ANOMALOUS = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = [
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
]
TEXTS = ["bottle", "metal_nut"]


def tiny_config(**overrides: object) -> WinCLIPConfig:
    """The demo network: the tiny random-weight ViT (64 px, 8 px patches: an 8x8 grid, 4 blocks)."""
    values = {"backbone": "MoECLIP-Tiny-ViT", "image_size": 64, "weights": None, "quick_gelu": False,
              "precision": "fp32", "class_text": "folder", "window_sizes": (2, 3), "include_image_scale": True,
              "temperature": TAU}
    return WinCLIPConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def model() -> WinCLIP:
    return WinCLIP.build(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


# -- reference computations ---------------------------------------------------------------------
def reference_prompts(name: str, states: list[str]) -> list[str]:
    return [template.format(state.format(name)) for state in states for template in TEMPLATES]


def reference_anchors(clip: torch.nn.Module, name: str) -> torch.Tensor:
    """[t_n, t_a]: the mean of the raw encode_text outputs of each prompt list."""
    return torch.stack([clip.encode_text(open_clip.tokenize(reference_prompts(name, states))).mean(0)
                        for states in (STATES_NORMAL, STATES_ANOMALOUS)])


def reference_tokens(clip: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Z (the input of ln_pre, caught by a hook during the ordinary forward) and the global embedding f."""
    caught = {}

    def catch(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        caught["z"] = args[0]  # returns None: the forward continues unchanged

    handle = clip.visual.ln_pre.register_forward_hook(catch)
    f = clip.encode_image(images)
    handle.remove()
    return caught["z"], f


def reference_windows(rows: int, cols: int, k: int) -> list[tuple[int, int, list[int]]]:
    """(top, left, flat patch indices) of every k x k window at stride 1, row-major."""
    return [(r, c, [(r + i) * cols + c + j for i in range(k) for j in range(k)])
            for r in range(rows - k + 1) for c in range(cols - k + 1)]


def reference_window_embedding(clip: torch.nn.Module, z: torch.Tensor, patches: list[int]) -> torch.Tensor:
    """One image's window alone: [Z_cls, Z of its patches] through ln_pre, blocks, ln_post, CLS, proj."""
    visual = clip.visual
    x = visual.transformer(visual.ln_pre(z[None, [0] + [p + 1 for p in patches]]))
    return (visual.ln_post(x[:, 0]) @ visual.proj)[0]


def reference_probability(v: torch.Tensor, anchors: torch.Tensor) -> float:
    cosines = torch.stack([F.cosine_similarity(v, anchors[0], dim=0), F.cosine_similarity(v, anchors[1], dim=0)])
    return float(torch.softmax(cosines / TAU, dim=0)[1])


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) weights of 1-D linear interpolation with half-pixel centres (align_corners False)."""
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    for o in range(size_out):
        x = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = min(int(x), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        weights[o, i0] += 1 - (x - i0)
        weights[o, i1] += x - i0
    return weights


def reference_predict(model: WinCLIP, images: torch.Tensor, texts: list[str], sizes: tuple[int, ...],
                      image_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores of BASELINES.md 1b, one image, one window, one patch at a time."""
    clip, size = model.clip, images.shape[-1]
    rows, cols = clip.visual.grid_size
    up_rows, up_cols = bilinear_matrix(rows, size), bilinear_matrix(cols, size)
    zs, fs = reference_tokens(clip, images)
    maps, scores = [], []
    for z, f, text in zip(zs, fs, texts):
        anchors = reference_anchors(clip, text)
        score = reference_probability(f, anchors)
        reciprocal = torch.full((rows, cols), 1 / score if image_scale else 0.0, dtype=torch.float64)
        for k in sizes:
            windows = reference_windows(rows, cols, k)
            s = [reference_probability(reference_window_embedding(clip, z, patches), anchors)
                 for _, _, patches in windows]
            for i in range(rows):
                for j in range(cols):
                    covering = [s[w] for w, (r, c, _) in enumerate(windows) if r <= i < r + k and c <= j < c + k]
                    reciprocal[i, j] += sum(1 / v for v in covering) / len(covering)
        grid_map = (len(sizes) + image_scale) / reciprocal
        maps.append(up_rows @ grid_map @ up_cols.T)
        scores.append(score)
    return torch.stack(maps).float(), torch.tensor(scores)


@pytest.fixture(scope="module")
def reference(model: WinCLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return reference_predict(model, images, TEXTS, (2, 3), image_scale=True)


# -- prompts and text ---------------------------------------------------------------------------
def test_prompt_ensemble_is_states_times_templates() -> None:
    normal, anomalous = winclip_prompts("bottle")
    assert (len(normal), len(anomalous)) == (7 * 21, 4 * 21) == (147, 84)
    assert sorted(normal) == sorted(reference_prompts("bottle", STATES_NORMAL))
    assert sorted(anomalous) == sorted(reference_prompts("bottle", STATES_ANOMALOUS))
    assert normal.count("a jpeg corrupted photo of the bottle.") == 2  # anomalib's duplicate template, kept
    assert "a photo of the flawless bottle for anomaly detection." in normal
    assert "a close-up photo of a bottle without damage." in normal
    assert "a cropped photo of the damaged bottle." in anomalous
    assert "a photo of a small bottle with flaw." in anomalous
    assert "a bright photo of a metal_nut with defect." in winclip_prompts("metal_nut")[1]


def test_text_anchors_average_unnormalised_embeddings(model: WinCLIP) -> None:
    with torch.no_grad():
        expected = reference_anchors(model.clip, "bottle")
    torch.testing.assert_close(model.text_anchors("bottle"), expected, rtol=1e-5, atol=1e-6)
    assert model.text_anchors("bottle") is model.text_anchors("bottle")  # cached per class text


def test_prompt_texts_follow_class_text(model: WinCLIP) -> None:
    batch = {"class_name": ["metal_nut"], "description": ["metal nut"]}
    assert model.prompt_texts(batch) == ["metal_nut"]
    assert WinCLIP(tiny_config(class_text="description"), model.clip, model.tokenizer).prompt_texts(batch) == [
        "metal nut"]


# -- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("grid", "k", "count"), [((8, 8), 2, 49), ((8, 8), 3, 36), ((3, 4), 2, 6),
                                                  ((15, 15), 2, 196), ((15, 15), 3, 169)])
def test_windows_are_row_major_stride_one(grid: tuple[int, int], k: int, count: int) -> None:
    expected = [patches for _, _, patches in reference_windows(*grid, k)]
    assert window_index(grid, k).tolist() == expected
    assert len(expected) == count


def test_window_larger_than_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        window_index((8, 8), 9)


def test_window_and_global_embeddings_match_one_window_at_a_time(model: WinCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        image_embedding, windows = model.encode_image(images)
        z, f = reference_tokens(model.clip, images)
        torch.testing.assert_close(image_embedding, f, rtol=1e-5, atol=1e-5)
        for k, embeddings in windows.items():
            expected = torch.stack([torch.stack([reference_window_embedding(model.clip, zb, patches)
                                                 for _, _, patches in reference_windows(8, 8, k)]) for zb in z])
            torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


# -- scores and maps ----------------------------------------------------------------------------
def test_predict_matches_reference(model: WinCLIP, images: torch.Tensor,
                                   reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        maps, scores = model.predict(images, TEXTS, "industrial")
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)
    torch.testing.assert_close(scores, reference[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, reference[0], rtol=0, atol=1e-6)


def test_image_scale_can_leave_the_fusion(model: WinCLIP, images: torch.Tensor) -> None:
    method = WinCLIP(tiny_config(include_image_scale=False, window_sizes=(3, 2)), model.clip, model.tokenizer)
    with torch.no_grad():
        maps, scores = method.predict(images, TEXTS, "industrial")
        expected = reference_predict(model, images, TEXTS, (2, 3), image_scale=False)
    torch.testing.assert_close(scores, expected[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, expected[0], rtol=0, atol=1e-6)


def test_batch_predicts_each_image_as_alone(model: WinCLIP, images: torch.Tensor) -> None:
    """Images of one batch never interact: their windows run in one batch, each as its own sequence."""
    with torch.no_grad():
        maps, scores = model.predict(images, TEXTS, "industrial")
        for b in range(2):
            single_maps, single_scores = model.predict(images[b:b + 1], TEXTS[b:b + 1], "industrial")
            torch.testing.assert_close(single_maps[0], maps[b], rtol=0, atol=1e-6)
            torch.testing.assert_close(single_scores[0], scores[b], rtol=0, atol=1e-6)


# -- parameters, checkpoint, configuration -------------------------------------------------------
def test_nothing_is_trained_or_saved(model: WinCLIP) -> None:
    assert not WinCLIP.needs_training and WinCLIP.name == "winclip"
    assert model.parameter_counts()["trainable"] == 0 and model.parameter_counts()["added"] == 0
    assert model.trainable_state_dict() == {}
    assert not any(key.startswith("window") for key in model.state_dict())


def test_real_architecture_on_the_meta_device() -> None:
    config = tiny_config(backbone="ViT-B-16-plus-240", image_size=240)
    counts = WinCLIP.count_parameters(config)
    assert counts["trainable"] == 0 and counts["added"] == 0 and counts["total"] > 200_000_000
    with torch.device("meta"):
        method = WinCLIP(config, load_clip(config.backbone, 240, None, False, device="meta"),
                         tokenizer_for(config.backbone))
    assert method.grid == (15, 15)
    assert method.window_index_2.shape == (196, 4) and method.window_index_3.shape == (169, 9)


def test_config_has_no_defaults_and_checks_scales() -> None:
    values = tiny_config().model_dump()
    with pytest.raises(pydantic.ValidationError):
        WinCLIPConfig(**{key: value for key, value in values.items() if key != "temperature"})
    with pytest.raises(pydantic.ValidationError):
        WinCLIPConfig(**values, extra_field=1)
    for bad in ({"window_sizes": (2, 2)}, {"window_sizes": (0,)}, {"window_sizes": (), "include_image_scale": False},
                {"temperature": 0.0}):
        with pytest.raises(pydantic.ValidationError):
            WinCLIPConfig(**{**values, **bad})
