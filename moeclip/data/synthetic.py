"""Deterministic synthetic demo datasets written in the real on-disk layouts.

Why: the offline demo and the tests need data that goes through the very same layout parsers
as the real benchmarks (DATASETS.md), and whose defects share one appearance across all
classes and datasets, so that a model trained on the VisA-style set can learn "defect versus
normal" and transfer to the unseen MVTec-style, medical and colonoscopy-style sets, as in the
ZSAD protocol. Each defect keeps its own kind's look (scratch, stain, lesion, polyp...) and
is overlaid with one fixed fine checker (`_signature`): with the demo's random-weight
backbone, only such a pixel-identical cue can be learnt on one dataset and recognised on
another. Every image is drawn from its own numpy Generator keyed by (seed, dataset, class,
split, index), so the same seed gives byte-identical files whatever else changes.

What is drawn for a dataset (generator, scene per class folder, paths, real size) is its declaration
in moeclip/data/registry.py; this module holds the scenes and one generator per family of layouts.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from moeclip.data.registry import DATASETS, DemoGenerator, DemoPlan

MASK_THRESHOLD = 0.3  # defect opacity above which a pixel counts as anomalous in the mask
CENTRE_JITTER = 0.06  # object position jitter, as a fraction of the image side
MAX_PLACEMENT_TRIES = 20
SIGNATURE_CELL = 2  # side of the squares of the checker that marks every defect, in pixels
SIGNATURE_OPACITY = 0.7  # how strongly that checker covers each defect's own fill (the rest shows its kind)

Colour = tuple[float, ...]


@dataclass(frozen=True)
class Scene:
    """A clean normal rendering plus what defect placement needs to know about it."""

    image: np.ndarray  # (S, S, C) float32 in [0, 1]; C = 3 (colour) or 1 (grayscale scan)
    foreground: np.ndarray  # (S, S) float32 in [0, 1]: where the inspected object is
    background: np.ndarray  # (S, S, C): what a missing part of the object reveals


@dataclass(frozen=True)
class Defect:
    """A defect = a shape (opacity map around a centre) and what is painted under that shape."""

    shape: Callable[[np.random.Generator, int, np.ndarray], np.ndarray]
    fill: Callable[[np.random.Generator, Scene, np.ndarray], np.ndarray]


Renderer = Callable[[np.random.Generator, int], Scene]


# --------------------------------------------------------------------------- drawing helpers
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates (u to the right, v down), both in [0, 1]."""
    v, u = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    return u, v


def _edge(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage (about one pixel wide) of a region given its signed distance."""
    return np.clip(0.5 + signed_distance * size, 0.0, 1.0).astype(np.float32)


def _paint(base: np.ndarray, alpha: np.ndarray, top: np.ndarray | Colour) -> np.ndarray:
    """Alpha-blend `top` (an image or a colour) over `base`."""
    a = alpha[..., None]
    return (base * (1.0 - a) + np.asarray(top, dtype=np.float32) * a).astype(np.float32)


def _flat(size: int, colour: Colour) -> np.ndarray:
    """An image filled with one colour."""
    return np.broadcast_to(np.asarray(colour, np.float32), (size, size, len(colour))).copy()


def _vary(rng: np.random.Generator, colour: Colour, amount: float = 0.05) -> np.ndarray:
    """A colour jittered mostly in brightness and slightly in hue, so normal images of a class differ a little."""
    shift = rng.uniform(-amount, amount) + rng.uniform(-amount / 3, amount / 3, len(colour))
    return np.clip(np.asarray(colour, np.float32) + shift, 0, 1).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _centre(rng: np.random.Generator, jitter: float = CENTRE_JITTER) -> np.ndarray:
    """An object centre near the middle of the image."""
    return 0.5 + rng.uniform(-jitter, jitter, 2)


def _rotated(u: np.ndarray, v: np.ndarray, centre: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame centred on `centre` and turned by `angle` (radians)."""
    du, dv = u - centre[0], v - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    return du * c + dv * s, -du * s + dv * c


def _ellipse_sd(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (positive inside)."""
    return (1.0 - np.hypot(x / a, y / b)) * min(a, b)


def _stadium_sd(x: np.ndarray, y: np.ndarray, half_length: float, radius: float) -> np.ndarray:
    """Signed distance to a capsule along the x axis (positive inside)."""
    return radius - np.hypot(np.maximum(np.abs(x) - half_length, 0.0), y)


def _box_sd(x: np.ndarray, y: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned box (positive inside)."""
    return np.minimum(half_w - np.abs(x), half_h - np.abs(y))


def _stroke_alpha(size: int, polylines: list[np.ndarray], width_px: float) -> np.ndarray:
    """Anti-aliased coverage of pixel-coordinate polylines, drawn 4x supersampled."""
    ss = 4
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for points in polylines:
        vertices = [tuple(p) for p in (points * ss).tolist()]
        draw.line(vertices, fill=255, width=max(1, round(width_px * ss)), joint="curve")
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0


def _walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float, wiggle: float
) -> np.ndarray:
    """A random walk with persistent direction: the skeleton of scratches and cracks."""
    turns = heading + rng.normal(0.0, wiggle, steps).cumsum()
    deltas = step * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    return np.vstack([start, start + deltas.cumsum(axis=0)])


# --------------------------------------------------------------------------- defect shapes
def _blob_shape(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, blur: float) -> np.ndarray:
    """An irregular smooth blob: a circle whose radius is modulated by a few random harmonics."""
    u, v = _coords(size)
    dx, dy = u * size - centre[0], v * size - centre[1]
    theta = np.arctan2(dy, dx)
    k = np.arange(2, 6)[:, None, None]
    harmonics = rng.uniform(0.0, 0.2, (4, 1, 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (4, 1, 1)))
    boundary = radius * (1.0 + harmonics.sum(axis=0))
    alpha = np.clip(boundary - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
    return ndimage.gaussian_filter(alpha, blur).astype(np.float32)


def _scratch(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A thin, nearly straight polyline."""
    path = _walk(rng, centre, rng.uniform(0, 2 * np.pi), int(rng.integers(2, 5)), size * rng.uniform(0.07, 0.12), 0.2)
    return _stroke_alpha(size, [path], rng.uniform(0.8, 1.4))


def _crack(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A wiggly random-walk line with a few shorter side branches."""
    step = size * 0.035
    trunk = _walk(rng, centre, rng.uniform(0, 2 * np.pi), int(rng.integers(8, 14)), step, 0.55)
    branches = [
        _walk(rng, trunk[rng.integers(1, len(trunk))], rng.uniform(0, 2 * np.pi), int(rng.integers(3, 6)), step, 0.55)
        for _ in range(int(rng.integers(1, 4)))
    ]
    return _stroke_alpha(size, [trunk, *branches], rng.uniform(0.7, 1.1))


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A compact irregular spot (contamination, dent, lesion)."""
    return _blob_shape(rng, size, centre, size * rng.uniform(0.05, 0.1), 0.6)


def _stain(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A larger soft-edged patch."""
    return _blob_shape(rng, size, centre, size * rng.uniform(0.08, 0.14), size * 0.03)


def _hole(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A sharp-edged region where material is missing."""
    return _blob_shape(rng, size, centre, size * rng.uniform(0.07, 0.12), 0.4)


def _polyp(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A rounded raised polyp outline."""
    return _blob_shape(rng, size, centre, size * rng.uniform(0.09, 0.17), 0.8)


# --------------------------------------------------------------------------- defect fills
def _local_mean(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Mean colour of an image under a defect shape."""
    weights = alpha[..., None]
    return (image * weights).sum(axis=(0, 1)) / (weights.sum() + 1e-8)


def _luminance(colours: np.ndarray) -> np.ndarray:
    """Perceived brightness of RGB or gray colours (last axis = channels)."""
    if colours.shape[-1] == 1:
        return colours[..., 0]
    return colours @ np.array([0.299, 0.587, 0.114], np.float32)


def _contrast_fill(rng: np.random.Generator, scene: Scene, alpha: np.ndarray) -> np.ndarray:
    """The local colour made darker than the darkest, or brighter than the brightest, pixels
    under the defect, whichever stands out more (so it shows on stripes and meshes too)."""
    under = scene.image[alpha > MASK_THRESHOLD]
    low, high = np.percentile(_luminance(under), [10, 90])
    dark, bright = low * rng.uniform(0.2, 0.5), high + (1.0 - high) * rng.uniform(0.55, 0.85)
    local = under.mean(axis=0)
    level = float(_luminance(local))
    if low - dark > bright - high:
        colour = local * dark / (level + 1e-6)
    else:
        colour = local + (1.0 - local) * (bright - level) / (1.0 - level + 1e-6)
    return _flat(alpha.shape[0], tuple(np.clip(colour, 0.0, 1.0)))


def _stain_fill(rng: np.random.Generator, scene: Scene, alpha: np.ndarray) -> np.ndarray:
    """A translucent foreign colour over the surface (the texture stays visible)."""
    local = _local_mean(scene.image, alpha)
    colour = rng.uniform(0.0, 1.0, local.size).astype(np.float32)
    if np.abs(colour - local).max() < 0.5:
        colour = np.where(local > 0.5, local - 0.5, local + 0.5).astype(np.float32)
    return _paint(scene.image, np.full(alpha.shape, rng.uniform(0.6, 0.85), np.float32), colour)


def _hole_fill(rng: np.random.Generator, scene: Scene, alpha: np.ndarray) -> np.ndarray:
    """The background through the missing part, or a contrasting cavity if they look alike."""
    if np.abs(_local_mean(scene.image, alpha) - _local_mean(scene.background, alpha)).max() < 0.2:
        return _contrast_fill(rng, scene, alpha)
    return scene.background


def _lesion_fill(rng: np.random.Generator, scene: Scene, alpha: np.ndarray) -> np.ndarray:
    """A bright (e.g. tumour, oedema) or dark (e.g. necrosis) lesion with the tissue texture kept."""
    if rng.random() < 0.5:
        return np.clip(scene.image + rng.uniform(0.3, 0.45), 0, 1)
    return scene.image * rng.uniform(0.25, 0.45)


def _polyp_fill(rng: np.random.Generator, scene: Scene, alpha: np.ndarray) -> np.ndarray:
    """A redder, dome-shaded bump: bright in the middle, shadowed at the rim."""
    dome = ndimage.gaussian_filter(alpha, alpha.shape[0] * 0.04)
    colour = _vary(rng, (0.82, 0.3, 0.32), 0.06)
    return (colour * (0.55 + 0.7 * dome[..., None])).astype(np.float32)


INDUSTRIAL_DEFECTS: Mapping[str, Defect] = {
    "scratch": Defect(_scratch, _contrast_fill),
    "blob": Defect(_blob, _contrast_fill),
    "crack": Defect(_crack, _contrast_fill),
    "stain": Defect(_stain, _stain_fill),
    "hole": Defect(_hole, _hole_fill),
}


# --------------------------------------------------------------------------- MVTec-style classes
def _render_metal_nut(rng: np.random.Generator, size: int) -> Scene:
    """A shaded metal disc with a central hole and four notches, on a dark table."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), rng.uniform(0, 2 * np.pi))
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    outer = 0.34 - 0.06 * (np.cos(4 * theta) > 0.85)
    body = _edge(outer - r, size) * _edge(r - 0.11, size)
    background = _flat(size, tuple(_vary(rng, (0.1, 0.1, 0.12), 0.03)))
    shading = (0.75 + 0.6 * (0.5 - (u + v) / 2))[..., None]
    return Scene(_paint(background, body, _vary(rng, (0.6, 0.62, 0.66)) * shading), body, background)


def _render_bottle(rng: np.random.Generator, size: int) -> Scene:
    """Top view of a dark bottle: a ring with a lit rim and a deep opening, on a light table."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), 0.0)
    r = np.hypot(x, y)
    background = _flat(size, tuple(_vary(rng, (0.82, 0.82, 0.8), 0.03)))
    outer = _edge(0.38 - r, size)
    image = _paint(background, outer, _vary(rng, (0.1, 0.09, 0.08), 0.03))
    image = _paint(image, _edge(0.33 - r, size) * _edge(r - 0.27, size), _vary(rng, (0.35, 0.33, 0.3), 0.04))
    glint = 0.3 * np.exp(-((x + 0.07) ** 2 + (y + 0.07) ** 2) / 0.004)
    opening = _edge(0.25 - r, size)
    image = _paint(image, opening, (0.04, 0.04, 0.04)) + (glint * opening)[..., None]
    return Scene(np.clip(image, 0, 1).astype(np.float32), outer, background)


def _render_hazelnut(rng: np.random.Generator, size: int) -> Scene:
    """A brown streaked nut (rotated ellipse with a pointed tip) on black."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), rng.uniform(0, 2 * np.pi))
    body = _edge(_ellipse_sd(x, y, 0.3 + rng.uniform(-0.02, 0.02), 0.24), size)
    streaks = 0.1 * np.sin(2 * np.pi * y / 0.06 + 2.0 * _smooth_noise(rng, size, size / 10))
    shading = (0.85 + streaks - 0.5 * np.hypot(x, y))[..., None]
    background = _flat(size, (0.03, 0.03, 0.03))
    image = _paint(background, body, _vary(rng, (0.6, 0.38, 0.18)) * shading)
    tip = _edge(0.05 - np.hypot(x - 0.27, y), size) * body
    return Scene(_paint(image, tip, (0.25, 0.15, 0.08)), body, background)


def _render_carpet(rng: np.random.Generator, size: int) -> Scene:
    """A woven gray carpet: a fine weave plus fibre noise."""
    u, v = _coords(size)
    freq, phase = rng.uniform(10, 13), rng.uniform(0, 2 * np.pi, 2)
    weave = 0.07 * np.sin(2 * np.pi * freq * u + phase[0]) * np.sin(2 * np.pi * freq * v + phase[1])
    fibres = 0.05 * _smooth_noise(rng, size, 0.7)
    image = _vary(rng, (0.52, 0.5, 0.47)) * (1.0 + weave + fibres)[..., None]
    return _texture_scene(image, (0.05, 0.05, 0.05))


def _render_grid(rng: np.random.Generator, size: int) -> Scene:
    """A metal mesh: two families of bright wires on a dark backdrop, slightly rotated."""
    u, v = _coords(size)
    x, y = _rotated(u, v, np.array([0.5, 0.5]), rng.uniform(-0.03, 0.03))
    period, phase = rng.uniform(0.12, 0.13), rng.uniform(-0.15, 0.15, 2)

    def wires(t: np.ndarray, offset: float) -> np.ndarray:
        return _edge(0.018 - np.abs((t / period + offset) % 1.0 - 0.5) * period, size)

    mesh = np.maximum(wires(x, phase[0]), wires(y, phase[1]))
    image = _paint(_flat(size, tuple(_vary(rng, (0.18, 0.18, 0.18), 0.03))), mesh, _vary(rng, (0.68, 0.68, 0.72)))
    return _texture_scene(image, (0.02, 0.02, 0.02))


def _render_wood(rng: np.random.Generator, size: int) -> Scene:
    """Wood grain: warped horizontal bands plus fibre streaks stretched along the grain."""
    u, v = _coords(size)
    warp = 0.05 * _smooth_noise(rng, size, size / 6)
    grain = np.sin(2 * np.pi * rng.uniform(6, 9) * (v + warp + rng.uniform(-0.1, 0.1) * u))
    fibres = _smooth_noise(rng, size, (0.5, size / 8))
    mix = np.clip(0.5 + 0.3 * grain + 0.12 * fibres, 0, 1)
    image = _paint(_flat(size, tuple(_vary(rng, (0.42, 0.26, 0.13)))), mix, _vary(rng, (0.75, 0.55, 0.33)))
    return _texture_scene(image, (0.06, 0.04, 0.03))


def _render_tile(rng: np.random.Generator, size: int) -> Scene:
    """A speckled light tile surface."""
    speckle_dark = ndimage.gaussian_filter((rng.random((size, size)) < 0.05).astype(np.float32), 0.5) * 2.5
    speckle_light = ndimage.gaussian_filter((rng.random((size, size)) < 0.02).astype(np.float32), 0.5) * 2.5
    base = _vary(rng, (0.72, 0.72, 0.7)) * (1.0 + 0.03 * _smooth_noise(rng, size, 2.0))[..., None]
    image = _paint(base, np.clip(speckle_dark, 0, 1), (0.3, 0.3, 0.32))
    image = _paint(image, np.clip(speckle_light, 0, 1), (0.95, 0.95, 0.93))
    return _texture_scene(image, (0.05, 0.05, 0.05))


def _texture_scene(image: np.ndarray, hole_colour: Colour) -> Scene:
    """Textures are inspected everywhere; a hole shows a dark cavity."""
    size = image.shape[0]
    return Scene(np.clip(image, 0, 1).astype(np.float32), np.ones((size, size), np.float32), _flat(size, hole_colour))


# --------------------------------------------------------------------------- VisA-style classes
def _render_candle(rng: np.random.Generator, size: int) -> Scene:
    """Top view of a cream candle with a wax pool and a black wick, on a dark-blue cloth."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), 0.0)
    r = np.hypot(x, y)
    background = _flat(size, tuple(_vary(rng, (0.12, 0.16, 0.24), 0.03)))
    body = _edge(0.33 - r, size)
    image = _paint(background, body, _vary(rng, (0.92, 0.88, 0.78), 0.03))
    image = _paint(image, _edge(0.2 - r, size), _vary(rng, (0.84, 0.79, 0.66), 0.03))
    return Scene(_paint(image, _edge(0.03 - r, size), (0.08, 0.07, 0.06)), body, background)


def _render_capsules(rng: np.random.Generator, size: int) -> Scene:
    """A few glossy green capsules scattered on a white tray."""
    u, v = _coords(size)
    background = _flat(size, tuple(_vary(rng, (0.9, 0.9, 0.88), 0.03)))
    image, union = background, np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 6))):
        x, y = _rotated(u, v, rng.uniform(0.2, 0.8, 2), rng.uniform(0, np.pi))
        body = _edge(_stadium_sd(x, y, 0.08, 0.055), size)
        gloss = (0.8 + 0.5 * np.exp(-((y + 0.02) ** 2) / 0.0008))[..., None]
        image, union = _paint(image, body, _vary(rng, (0.25, 0.58, 0.3)) * gloss), np.maximum(union, body)
    return Scene(np.clip(image, 0, 1), union, background)


def _render_cashew(rng: np.random.Generator, size: int) -> Scene:
    """A pale kidney-shaped cashew (ellipse with a bite taken out) on a dark surface."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), rng.uniform(0, 2 * np.pi))
    body = _edge(np.minimum(_ellipse_sd(x, y, 0.3, 0.17), np.hypot(x, y - 0.2) - 0.12), size)
    background = _flat(size, tuple(_vary(rng, (0.14, 0.13, 0.12), 0.03)))
    shading = (0.9 + 0.06 * _smooth_noise(rng, size, size / 16) - 0.4 * np.abs(y))[..., None]
    return Scene(_paint(background, body, _vary(rng, (0.86, 0.72, 0.5)) * shading), body, background)


def _render_chewinggum(rng: np.random.Generator, size: int) -> Scene:
    """A white pitted rounded-rectangle gum on a brown surface."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), rng.uniform(-0.15, 0.15))
    body = _edge(_stadium_sd(x, y, 0.16, 0.2), size)
    background = _flat(size, tuple(_vary(rng, (0.36, 0.23, 0.15), 0.03)))
    pits = (1.0 + 0.04 * _smooth_noise(rng, size, 0.8))[..., None]
    return Scene(_paint(background, body, _vary(rng, (0.9, 0.9, 0.87), 0.03) * pits), body, background)


def _render_pcb1(rng: np.random.Generator, size: int) -> Scene:
    """A green circuit board with copper traces, two black chips and white pads."""
    u, v = _coords(size)
    shift = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)
    image = _flat(size, tuple(_vary(rng, (0.1, 0.42, 0.2), 0.04)))
    for row in (0.15, 0.45, 0.85):
        image = _paint(image, _edge(0.012 - np.abs(v - row - shift[1]), size), (0.75, 0.64, 0.3))
    x, y = u - shift[0], v - shift[1]
    for cx in (0.3, 0.7):
        image = _paint(image, _edge(_box_sd(x - cx, y - 0.3, 0.12, 0.1), size), (0.06, 0.06, 0.07))
    for px in np.arange(0.2, 0.85, 0.15):
        image = _paint(image, _edge(_box_sd(x - px, y - 0.68, 0.025, 0.025), size), (0.9, 0.9, 0.88))
    return _texture_scene(image, (0.03, 0.03, 0.03))


def _render_macaroni1(rng: np.random.Generator, size: int) -> Scene:
    """Four short orange macaroni tubes in a 2x2 arrangement on a beige tray."""
    u, v = _coords(size)
    background = _flat(size, tuple(_vary(rng, (0.86, 0.8, 0.64), 0.03)))
    image, union = background, np.zeros((size, size), np.float32)
    for cx in (0.3, 0.7):
        for cy in (0.3, 0.7):
            x, y = _rotated(u, v, np.array([cx, cy]) + rng.uniform(-0.04, 0.04, 2), rng.uniform(0, np.pi))
            body = _edge(_stadium_sd(x, y, 0.07, 0.07), size)
            image = _paint(image, body, _vary(rng, (0.95, 0.6, 0.16), 0.03))
            image = _paint(image, _edge(_stadium_sd(x, y, 0.06, 0.02), size), (0.7, 0.38, 0.08))
            union = np.maximum(union, body)
    return Scene(image, union, background)


def _render_fryum(rng: np.random.Generator, size: int) -> Scene:
    """A wheel-shaped snack (rim, hub, six spokes) on a green plate."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng), rng.uniform(0, 2 * np.pi))
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    spokes = _edge(0.02 - r * np.abs(np.sin(3 * theta)), size) * _edge(0.24 - r, size)
    body = np.maximum.reduce([_edge(0.33 - r, size) * _edge(r - 0.22, size), _edge(0.08 - r, size), spokes])
    background = _flat(size, tuple(_vary(rng, (0.3, 0.52, 0.36), 0.03)))
    return Scene(_paint(background, body, _vary(rng, (0.93, 0.76, 0.42), 0.04)), body, background)


# --------------------------------------------------------------------------- medical scenes
def _render_brain(rng: np.random.Generator, size: int) -> Scene:
    """An axial grayscale brain slice: skull ring, folded tissue, midline and two ventricles."""
    u, v = _coords(size)
    x, y = _rotated(u, v, _centre(rng, 0.03), rng.uniform(-0.1, 0.1))
    head = _ellipse_sd(x, y, 0.34, 0.42)
    brain = _edge(head - 0.045, size)
    tissue = 0.45 + 0.07 * _smooth_noise(rng, size, size / 24) + rng.uniform(-0.04, 0.04)
    image = _paint(np.zeros((size, size, 1), np.float32), _edge(head, size), (0.85,))
    image = _paint(image, brain, tissue[..., None])
    image = _paint(image, brain * _edge(0.006 - np.abs(x), size), (0.2,))
    for side in (-1.0, 1.0):
        image = _paint(image, _edge(_ellipse_sd(x - side * 0.05, y + 0.02, 0.03, 0.08), size), (0.12,))
    return Scene(image, brain, np.zeros_like(image))


def _render_colon(rng: np.random.Generator, size: int) -> Scene:
    """A pink colon wall: dark lumen, concentric folds, vignetting and specular glints."""
    u, v = _coords(size)
    lumen = rng.uniform(0.3, 0.7, 2)
    dist = np.hypot(u - lumen[0], v - lumen[1])
    folds = 0.1 * np.sin(2 * np.pi * (dist * rng.uniform(5, 7) + 0.05 * _smooth_noise(rng, size, size / 8)))
    light = np.clip(0.25 + 1.3 * dist, 0, 1) * (1.0 + folds) * (1.0 - 0.45 * np.hypot(u - 0.5, v - 0.5) ** 2)
    image = _vary(rng, (0.92, 0.52, 0.5), 0.04) * light[..., None]
    for _ in range(int(rng.integers(3, 7))):
        spot = np.exp(-((u - rng.uniform()) ** 2 + (v - rng.uniform()) ** 2) / rng.uniform(2e-4, 6e-4))
        image = _paint(image, spot.astype(np.float32), (1.0, 0.97, 0.95))
    wall = (np.clip(0.25 + 1.3 * dist, 0, 1) > 0.5).astype(np.float32)
    return Scene(np.clip(image, 0, 1).astype(np.float32), wall, image)


# The scenes a dataset's DemoPlan can give its class folders (moeclip/data/registry.py).
SCENES: Mapping[str, Renderer] = {
    "metal_nut": _render_metal_nut,
    "bottle": _render_bottle,
    "hazelnut": _render_hazelnut,
    "carpet": _render_carpet,
    "grid": _render_grid,
    "wood": _render_wood,
    "tile": _render_tile,
    "candle": _render_candle,
    "capsules": _render_capsules,
    "cashew": _render_cashew,
    "chewinggum": _render_chewinggum,
    "pcb1": _render_pcb1,
    "macaroni1": _render_macaroni1,
    "fryum": _render_fryum,
}


# --------------------------------------------------------------------------- samples
def _sample_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent stream per image, so files do not depend on generation order or counts."""
    words = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *words])


def _signature(size: int, channels: int) -> np.ndarray:
    """The black-and-white checker that every defect carries, anchored to the image grid.

    Why: the demo backbone has random weights, so what a model trained on the VisA-style set
    can recognise in the unseen sets is only an appearance that is pixel-for-pixel the same
    in every class and dataset; defects drawn relative to each class's own colours are not.
    A fine achromatic checker looks the same in colour and in grayscale images, and its fixed
    phase gives every defective patch the same pattern.
    """
    rows, cols = np.indices((size, size)) // SIGNATURE_CELL
    checker = 0.05 + 0.9 * ((rows + cols) % 2).astype(np.float32)
    return np.repeat(checker[..., None], channels, axis=-1)


def place_defect(rng: np.random.Generator, scene: Scene, defect: Defect) -> tuple[np.ndarray, np.ndarray]:
    """Paint a random instance of `defect`, marked with the shared checker, on the object; retry
    until it covers enough object pixels.

    Returns the defective image and its boolean mask.
    """
    size = scene.image.shape[0]
    candidates = np.argwhere(scene.foreground > 0.5)
    min_area = max(4, size * size // 500)
    for _ in range(MAX_PLACEMENT_TRIES):
        row, col = candidates[rng.integers(len(candidates))]
        alpha = defect.shape(rng, size, np.array([col + 0.5, row + 0.5])) * scene.foreground
        mask = alpha > MASK_THRESHOLD
        if mask.sum() >= min_area:
            opacity = np.full(alpha.shape, SIGNATURE_OPACITY, np.float32)
            fill = _paint(defect.fill(rng, scene, alpha), opacity, _signature(size, scene.image.shape[-1]))
            return _paint(scene.image, alpha, fill), mask
    raise RuntimeError("could not place a defect on the object")


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Uneven lighting and sensor noise, then quantise to 8 bits."""
    u, v = _coords(image.shape[0])
    tilt = rng.uniform(-0.1, 0.1, 2)
    gain = rng.uniform(0.92, 1.08) * (1.0 + tilt[0] * (u - 0.5) + tilt[1] * (v - 0.5))
    noisy = image * gain[..., None] + rng.normal(0.0, rng.uniform(0.008, 0.02), image.shape)
    return np.round(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_sample(
    render: Renderer, rng: np.random.Generator, size: int, defect: Defect | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """A finished uint8 (S, S, C) image, normal or with `defect`, and its mask (None when normal)."""
    scene = render(rng, size)
    if defect is None:
        return _finish(rng, scene.image), None
    image, mask = place_defect(rng, scene, defect)
    return _finish(rng, image), mask


# --------------------------------------------------------------------------- dataset plans
@dataclass(frozen=True)
class Item:
    """One image to write: its relative path, how to draw it, and where its mask goes if anomalous."""

    image: str
    class_name: str
    render: Renderer
    key: tuple[str | int, ...]  # identifies the image's random stream
    defect: Defect | None = None
    mask: str | None = None
    split: str = "test"


def _normals(
    render: Renderer, class_name: str, key: tuple[str, ...], paths: list[str], split: str = "test"
) -> list[Item]:
    """Normal images of one class at the given relative paths."""
    return [Item(path, class_name, render, (*key, i), split=split) for i, path in enumerate(paths)]


def _pick_defect(seed: int, key: tuple[str | int, ...]) -> str:
    """Which industrial defect an anomalous image gets (decided up front: it names the folder)."""
    names = sorted(INDUSTRIAL_DEFECTS)
    return names[int(_sample_rng(seed, *key, "defect").integers(len(names)))]


def _scenes(plan: DemoPlan) -> list[tuple[str, Renderer]]:
    """(class folder, renderer) of each class the plan draws."""
    unknown = sorted(set(plan.scenes.values()) - set(SCENES))
    if unknown:
        raise ValueError(f"unknown demo scene(s) {', '.join(unknown)}; there are: {', '.join(SCENES)}")
    return [(name, SCENES[scene]) for name, scene in plan.scenes.items()]


def _path(pattern: str | None, **fields: str | int) -> str | None:
    return None if pattern is None else pattern.format(**fields)


def _plan_mvtec(dataset: str, plan: DemoPlan, seed: int, per_class: int) -> list[Item]:
    """`<class>/{train,test}/good/*.png`, `<class>/test/<defect>/*.png`,
    masks `<class>/ground_truth/<defect>/<name>_mask.png`."""
    items: list[Item] = []
    for name, render in _scenes(plan):
        for split in ("train", "test"):
            paths = [f"{name}/{split}/good/{i:03d}.png" for i in range(per_class)]
            items += _normals(render, name, (dataset, name, split), paths, split)
        per_defect: dict[str, int] = {}
        for i in range(per_class):
            key = (dataset, name, "anomaly", i)
            defect = _pick_defect(seed, key)
            index = per_defect[defect] = per_defect.get(defect, -1) + 1
            image, mask = f"{name}/test/{defect}/{index:03d}.png", f"{name}/ground_truth/{defect}/{index:03d}_mask.png"
            items.append(Item(image, name, render, key, INDUSTRIAL_DEFECTS[defect], mask))
    return items


def _plan_visa(dataset: str, plan: DemoPlan, seed: int, per_class: int) -> list[Item]:
    """`<class>/Data/Images/{Normal,Anomaly}/*.JPG` with masks `<class>/Data/Masks/Anomaly/*.png`.

    The first `per_class` normal images form the train split, the next `per_class` the test
    split; all anomalies are test images, as in the official 1cls split.
    """
    items: list[Item] = []
    for name, render in _scenes(plan):
        for split, indices in (("train", range(per_class)), ("test", range(per_class, 2 * per_class))):
            paths = [f"{name}/Data/Images/Normal/{i:04d}.JPG" for i in indices]
            items += _normals(render, name, (dataset, name, split), paths, split)
        for i in range(per_class):
            key = (dataset, name, "anomaly", i)
            defect = INDUSTRIAL_DEFECTS[_pick_defect(seed, key)]
            mask = f"{name}/Data/Masks/Anomaly/{i:03d}.png"
            items.append(Item(f"{name}/Data/Images/Anomaly/{i:03d}.JPG", name, render, key, defect, mask))
    return items


def _plan_class_folders(dataset: str, plan: DemoPlan, seed: int, per_class: int) -> list[Item]:
    """The one-folder-per-class industrial layouts (BTAD, RSDD, DTD-Synthetic): the plan's paths per class."""
    items: list[Item] = []
    for name, render in _scenes(plan):
        paths = [plan.normal.format(c=name, i=i) for i in range(per_class)]
        items += _normals(render, name, (dataset, name, "normal"), paths)
        for i in range(per_class):
            key = (dataset, name, "anomaly", i)
            defect = INDUSTRIAL_DEFECTS[_pick_defect(seed, key)]
            items.append(Item(plan.anomalous.format(c=name, i=i), name, render, key, defect,
                              _path(plan.mask, c=name, i=i)))
    return items


def _plan_scans(dataset: str, plan: DemoPlan, seed: int, per_class: int) -> list[Item]:
    """The medical scan layouts, one class: BMAD (with masks) and Head CT (labels only)."""
    lesion = Defect(_blob, _lesion_fill)
    normals = [plan.normal.format(i=i) for i in range(per_class)]
    anomalies = [Item(plan.anomalous.format(i=i), dataset, _render_brain, (dataset, "anomaly", i), lesion,
                      _path(plan.mask, i=i)) for i in range(per_class)]
    return _normals(_render_brain, dataset, (dataset, "normal"), normals) + anomalies


def _plan_endoscopy(dataset: str, plan: DemoPlan, seed: int, per_class: int) -> list[Item]:
    """The polyp layouts, anomalies only: ColonDB, ClinicDB, CVC-300, Kvasir, Endo."""
    polyp = Defect(_polyp, _polyp_fill)
    return [Item(plan.anomalous.format(i=i), dataset, _render_colon, (dataset, "anomaly", i), polyp,
                 _path(plan.mask, i=i)) for i in range(per_class)]


def _write_visa_split(root: Path, items: list[Item]) -> None:
    """The official-style `split_csv/1cls.csv` (object, split, label, image, mask)."""
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("object", "split", "label", "image", "mask"))
        for item in items:
            label = "anomaly" if item.mask else "normal"
            writer.writerow((item.class_name, item.split, label, item.image, item.mask or ""))


def _no_index(root: Path, items: list[Item]) -> None:
    """Layouts whose folder structure alone says everything."""


@dataclass(frozen=True)
class Generator:
    """A family of layouts' generator: plans a dataset's images from its DemoPlan, then writes the index files
    its layout needs besides the images."""

    plan: Callable[[str, DemoPlan, int, int], list[Item]]
    index: Callable[[Path, list[Item]], None] = _no_index


GENERATORS: Mapping[DemoGenerator, Generator] = {
    "mvtec": Generator(_plan_mvtec),
    "visa": Generator(_plan_visa, _write_visa_split),
    "class_folders": Generator(_plan_class_folders),
    "scans": Generator(_plan_scans),
    "endoscopy": Generator(_plan_endoscopy),
}


# --------------------------------------------------------------------------- writing
def _save(picture: Image.Image, path: Path) -> None:
    """Write in the format the suffix names (JPEG at quality 95), as the real datasets store them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(path, format="JPEG", quality=95)
    else:
        picture.save(path)


def _resized(picture: Image.Image, source_size: tuple[int, int] | None, resample: Image.Resampling) -> Image.Image:
    return picture if source_size is None else picture.resize(source_size, resample)


def _write_item(root: Path, item: Item, seed: int, size: int, source_size: tuple[int, int] | None) -> None:
    """Render one planned image (and its mask) into the dataset folder, stretched to `source_size` if given."""
    image, mask = render_sample(item.render, _sample_rng(seed, *item.key), size, item.defect)
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    _save(_resized(picture, source_size, Image.Resampling.BICUBIC), root / item.image)
    if item.mask is not None:
        _save(_resized(Image.fromarray(mask.astype(np.uint8) * 255), source_size, Image.Resampling.NEAREST),
              root / item.mask)


def _publish(staging: Path, final: Path) -> None:
    """Swap a finished dataset folder into place, so no reader ever sees a half-written one."""
    if not final.exists():
        staging.rename(final)
        return
    retired = final.with_name(f".{final.name}.old-{os.getpid()}")
    final.rename(retired)
    staging.rename(final)
    shutil.rmtree(retired)


def _write_dataset(out: Path, slug: str, items: list[Item], index: Callable[[Path, list[Item]], None], seed: int,
                   size: int, source_size: tuple[int, int] | None, progress: tqdm) -> Path:
    """Write one dataset (images, then its `index` files) into a hidden staging folder next to its destination,
    then publish it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{slug}.tmp-", dir=out))
    try:
        for item in items:
            _write_item(staging, item, seed, size, source_size)
            progress.update()
        index(staging, items)
        _publish(staging, out / slug)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / slug


def _check_arguments(seed: int, image_size: int, per_class: int, classes: int | None = None) -> None:
    if seed < 0 or image_size < 16 or per_class < 1 or (classes is not None and classes < 1):
        raise ValueError("need seed >= 0, image_size >= 16, per_class >= 1 and classes >= 1 (or None)")


def _first_classes(items: list[Item], classes: int | None) -> list[Item]:
    """The items of the first `classes` classes of a plan (all of them for None)."""
    kept = set(list(dict.fromkeys(item.class_name for item in items))[:classes])
    return [item for item in items if item.class_name in kept]


def generate_demo_dataset(slug: str, out: Path, seed: int = 0, image_size: int = 64, per_class: int = 6,
                          classes: int | None = None, real_sizes: bool = False) -> Path:
    """Write one registry dataset's demo version, as its DemoPlan says, to `out/<slug>/` (replacing an existing
    one only once complete) and return it.

    `per_class` is the number of normal and of anomalous test images per class (plus as many
    normal train images for the MVTec- and VisA-style sets). `classes` keeps only the first
    classes of the set; `real_sizes` stretches every image drawn at `image_size` to the real
    set's typical size (the declaration's `real_size`).
    """
    _check_arguments(seed, image_size, per_class, classes)
    if slug not in DATASETS:
        raise ValueError(f"no synthetic demo version of '{slug}' (there are: {', '.join(DATASETS)})")
    spec = DATASETS[slug]
    generator = GENERATORS[spec.demo.generator]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = _first_classes(generator.plan(slug, spec.demo, seed, per_class), classes)
    source_size = spec.real_size if real_sizes else None
    with tqdm(total=len(items), desc=f"synthetic {slug}", unit="img") as progress:
        return _write_dataset(out, slug, items, generator.index, seed, image_size, source_size, progress)


def generate_demo_datasets(out: Path, seed: int = 0, image_size: int = 64, per_class: int = 6) -> list[Path]:
    """Write the demo version of every registry dataset under `out/<slug>/` and return their folders."""
    _check_arguments(seed, image_size, per_class)
    return [generate_demo_dataset(slug, out, seed, image_size, per_class) for slug in DATASETS]
