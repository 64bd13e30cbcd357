"""MoECLIP's `predict` against an independent, written-out forward on the tiny random-weight model.

The reference below shares no code with moeclip.methods.moeclip beyond the frozen open_clip blocks and the
trained tensors: the MoE runs token by token (router, top-k, each expert, norm matching, Eq. 5),
PAA sums explicit windows, LayerNorm, projections, cosines, the Gaussian blur (reflect borders,
as torchvision and kornia) and the align_corners=True upsampling are spelled out with NumPy. A
wrong read point (heads before the MoE), kernel (depth-wise k=1), blur (sigma 2) or scale is
caught by meaning, not by accident.
"""
import math

import numpy as np
import pytest
import torch

from tiny_models import randomised, tiny_config

MAP_RTOL = 1e-4
SCORE_ATOL = 1e-5


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def _layer_norm(x: np.ndarray, norm: torch.nn.LayerNorm) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.eps) * _np(norm.weight) + _np(norm.bias)


def _moe_token(adapter, x: np.ndarray) -> np.ndarray:
    """Eqs. 1, 2, 4, 5 for one token."""
    logits = _np(adapter.router.net.weight) @ x
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs, kind="stable")[:adapter.router.top_k]
    weights = probs[chosen] / probs[chosen].sum()
    a, b = _np(adapter.lora_a), _np(adapter.lora_b)
    mixed = sum(w * (b[n] @ (a[n] @ x)) * adapter.scale for w, n in zip(weights, chosen))
    normed = mixed * np.linalg.norm(x) / (np.linalg.norm(mixed) + adapter.eps)
    return adapter.lambda_moe * normed + (1 - adapter.lambda_moe) * x


def _window_mean(grid: np.ndarray, scale: int) -> np.ndarray:
    """(h, w, C) -> mean over each scale x scale window, zero padding, divisor scale^2."""
    h, w, _ = grid.shape
    out = np.zeros_like(grid)
    r = scale // 2
    for i in range(h):
        for j in range(w):
            window = grid[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            out[i, j] = window.sum(axis=(0, 1)) / scale ** 2
    return out


def _gaussian_blur(grid: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """2-D Gaussian (separable, normalised weights) with reflected borders."""
    offsets = np.arange(kernel) - kernel // 2
    weights = np.exp(-(offsets ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    h, w = grid.shape

    def reflect(index: int, size: int) -> int:
        return -index if index < 0 else (2 * (size - 1) - index if index >= size else index)

    out = np.zeros_like(grid)
    for i in range(h):
        for j in range(w):
            out[i, j] = sum(weights[u] * weights[v] * grid[reflect(i + du, h), reflect(j + dv, w)]
                            for u, du in enumerate(offsets) for v, dv in enumerate(offsets))
    return out


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, align_corners=True: output pixel y samples the grid at y * (h - 1) / (size - 1)."""
    h, w = grid.shape

    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.arange(size) * (n - 1) / (size - 1)
        low = np.minimum(np.floor(position).astype(int), n - 2)
        return low, low + 1, position - low

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def _depthwise_adapter(adapter, tokens: np.ndarray) -> np.ndarray:
    """LN -> depth-wise conv over tokens l-1, l, l+1 (zeros past the ends) -> exact GELU -> pointwise: (L, D)."""
    hidden = _layer_norm(tokens, adapter.norm)  # (L, d)
    kernel = _np(adapter.depthwise.weight)[:, 0]  # (d, 3) in the paper's adapter
    padded = np.pad(hidden, ((1, 1), (0, 0)))
    conv = np.stack([padded[l] * kernel[:, 0] + padded[l + 1] * kernel[:, 1] + padded[l + 2] * kernel[:, 2]
                     for l in range(tokens.shape[0])])
    gelu = 0.5 * conv * (1 + np.vectorize(math.erf)(conv / math.sqrt(2)))
    return gelu @ _np(adapter.pointwise.weight)[:, :, 0].T


def reference_predict(model, image: torch.Tensor, description: str, domain: str) -> tuple[np.ndarray, float]:
    """Anomaly map (H, W) and S_A of one image, written out (paper image score)."""
    config, visual = model.config, model.clip.visual
    with torch.no_grad():
        x = visual._embeds(image[None])  # the frozen backbone's own patch embedding
        features = {}
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if str(index) in model.moe:
                tokens = _np(x[0])
                x = torch.from_numpy(np.stack([_moe_token(model.moe[str(index)], t) for t in tokens]))[None].float()
            features[index] = _np(x[0, 1:])  # patches after the block and its MoE
        anchors = _np(model.text_anchors([description])[0])  # [T_N, T_A], unit
    h, w = model.grid
    total = np.zeros((config.image_size, config.image_size))
    blur = config.blur_for(domain)
    for layer in config.feature_layers:
        weight = _np(model.projections[str(layer)].linear.weight)
        for scale in config.paa_scales:
            pooled = _window_mean(features[layer].reshape(h, w, -1), scale).reshape(h * w, -1)
            projected = _layer_norm(pooled, visual.ln_post) @ weight.T
            unit = projected / np.linalg.norm(projected, axis=-1, keepdims=True)
            logits = 100.0 * unit @ anchors.T  # (L, 2)
            per_map = ((logits[:, 1] + 1 - logits[:, 0]) / 2).reshape(h, w)
            total += _upsample(_gaussian_blur(per_map, blur.kernel_size, blur.sigma), config.image_size)
    last = config.feature_layers[-1]
    outputs = _depthwise_adapter(model.image_adapter, _layer_norm(features[last], visual.ln_post))
    embedding = outputs.mean(axis=0)
    cosine = embedding @ anchors[1] / np.linalg.norm(embedding)
    return total, (cosine + 1) / 2


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_predict_equals_the_written_out_forward(domain):
    model = randomised(tiny_config()).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        maps, scores = model.predict(images, ["bottle", "bottle"], domain)
    for i in range(2):
        expected_map, expected_score = reference_predict(model, images[i], "bottle", domain)
        np.testing.assert_allclose(_np(maps[i]), expected_map, rtol=MAP_RTOL,
                                   atol=MAP_RTOL * np.abs(expected_map).max())
        assert abs(float(scores[i]) - expected_score) < SCORE_ATOL


def test_the_reference_tells_the_domains_blur_apart():
    """The two domains' blurs give different maps, so the test above pins each to its own kernel."""
    model = randomised(tiny_config()).eval()
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(6))
    industrial, _ = reference_predict(model, image, "bottle", "industrial")
    medical, _ = reference_predict(model, image, "bottle", "medical")
    assert np.abs(industrial - medical).max() > 100 * MAP_RTOL * np.abs(industrial).max()
