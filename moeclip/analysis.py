"""Analyses behind the paper's expert figures: utilisation (Fig. 9), inter-expert similarity
(Figs. 5, 10) and low-level statistics of the patches each expert receives (Table 14).

Every analysis walks a loader of batches (mappings with an `image` entry of CLIP-normalised
(B, 3, S, S) images, as `ManifestDataset` yields) through the model in eval mode, on the
model's device, and accumulates per-expert sums so memory stays independent of the data size.
Token 0 of every routed sequence is CLS and is excluded: the figures are about patches.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeclip.data.transforms import CLIP_MEAN, CLIP_STD
from moeclip.methods.moeclip.moe import MoEAux
from moeclip.methods.moeclip.network import MoECLIP

Batch = Mapping[str, object]
GREY_LEVELS = 256
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")
STATISTICS = ("gradient", "contrast", "entropy")


# -- running the model ------------------------------------------------------------------------
def _routed_batches(model: MoECLIP, loader: Iterable[Batch], layers: Sequence[int], dense: bool,
                    desc: str) -> Iterator[tuple[torch.Tensor, dict[int, MoEAux]]]:
    """Yield (images on the model's device, MoE aux of `layers`) per batch, with the model in eval mode.

    The model's previous train/eval mode is restored afterwards, so an analysis can run mid-training.
    Callers run under `torch.inference_mode`, which also covers their accumulation.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, leave=False):
            images = batch["image"].to(device)
            aux = model.encode_image(images, dense=dense).moe
            missing = [layer for layer in layers if layer not in aux]
            if missing:
                raise KeyError(f"layers {missing} were not routed; the model routes {sorted(aux)} "
                               f"(MoE layers beyond the last feature layer never run)")
            yield images, {layer: aux[layer] for layer in layers}
    finally:
        model.train(was_training)


def _selected(topk_index: torch.Tensor, num_experts: int, top1: bool) -> torch.Tensor:
    """(B, 1+L, k) routing choice -> (B, L, K) bool: patch i chose expert n (its top-1 only if `top1`)."""
    choice = topk_index[:, 1:, :1] if top1 else topk_index[:, 1:]
    mask = torch.zeros(*choice.shape[:-1], num_experts, dtype=torch.bool, device=choice.device)
    return mask.scatter(-1, choice, True)


# -- Fig. 9: expert utilisation ----------------------------------------------------------------
@torch.inference_mode()
def expert_utilisation(model: MoECLIP, loader: Iterable[Batch], layers: Sequence[int] | None = None,
                       top1: bool = False) -> pd.DataFrame:
    """Share (%) of the patch tokens' top-k routing assignments that each expert receives, per layer.

    Fig. 9 stacks these shares per data set (top-2 at layer 18). Every selected (patch, expert)
    pair counts once, so with top-2 each patch contributes two assignments; `top1` counts only
    each patch's first choice. Long format: columns layer, expert (1-indexed), share; the shares
    of one layer sum to 100.
    """
    layers = sorted(int(layer) for layer in model.moe) if layers is None else list(layers)
    num_experts = model.config.num_experts
    counts = {layer: torch.zeros(num_experts, dtype=torch.float64) for layer in layers}
    for _, aux in _routed_batches(model, loader, layers, dense=False, desc="expert utilisation"):
        for layer in layers:
            counts[layer] += assignment_counts(aux[layer].routing.topk_index, num_experts, top1).cpu()
    rows = [dict(layer=layer, expert=n + 1, share=float(share))
            for layer in layers for n, share in enumerate(100 * counts[layer] / counts[layer].sum())]
    return pd.DataFrame(rows, columns=["layer", "expert", "share"])


def assignment_counts(topk_index: torch.Tensor, num_experts: int, top1: bool = False) -> torch.Tensor:
    """(B, 1+L, k) routing choice -> (K,) float64 number of patch assignments per expert (CLS excluded)."""
    return _selected(topk_index, num_experts, top1).sum(dim=(0, 1)).double()


# -- Figs. 5 / 10: inter-expert similarity -----------------------------------------------------
@torch.inference_mode()
def inter_expert_similarity(model: MoECLIP, loader: Iterable[Batch], layer: int, eps: float = 1e-8) -> np.ndarray:
    """(K, K) cosine similarity between expert-specific features at one MoE layer, averaged over images.

    The paper derives an expert's feature in an image "by averaging all patch features that
    selected that expert (via Top-k)". We take the *unmixed* expert outputs E_n(x_i) of those
    patches (not the mixed MoE output tokens, which blend the top-k experts and the residual and
    would make every pair look alike): the figure measures whether experts compute different
    functions. A pair's similarity is averaged over the images in which both experts were
    selected and have a non-zero feature; a zero feature (e.g. LoRA B still at its zero
    initialisation) has no direction, so it is left out rather than counted as 0. Entries with no
    such image are NaN; the diagonal is 1 wherever the expert had a feature at all.
    """
    num_experts = model.config.num_experts
    total = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    count = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for _, aux in _routed_batches(model, loader, [layer], dense=True, desc=f"expert similarity (layer {layer})"):
        moe = aux[layer]
        if moe.expert_outputs is None:
            raise ValueError(f"layer {layer} returned no expert outputs; its experts must run densely")
        selected = _selected(moe.routing.topk_index, num_experts, top1=False)
        gram, valid = image_expert_similarity(moe.expert_outputs[:, 1:], selected, eps)
        total += (gram * valid).sum(dim=0).double().cpu()
        count += valid.sum(dim=0).double().cpu()
    similarity = total / count  # 0/0 -> NaN for pairs that never co-occur
    similarity.diagonal().copy_(torch.where(count.diagonal() > 0, 1.0, torch.nan))
    return similarity.numpy()


def image_expert_similarity(expert_outputs: torch.Tensor, selected: torch.Tensor,
                            eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, cosine similarities between the experts' mean outputs over the patches that selected them.

    `expert_outputs` (B, L, K, d), `selected` (B, L, K) bool. Returns the (B, K, K) Gram matrices of
    the unit expert features and a (B, K, K) bool telling where both experts had a feature.
    """
    weights = selected.to(torch.float32)
    sums = torch.einsum("blk,blkd->bkd", weights, expert_outputs.float())
    features = sums / weights.sum(dim=1).clamp(min=1).unsqueeze(-1)
    norms = features.norm(dim=-1)
    present = selected.any(dim=1) & (norms > eps)
    unit = features / norms.clamp(min=eps).unsqueeze(-1)
    gram = torch.einsum("bkd,bjd->bkj", unit, unit).clamp(-1.0, 1.0)
    return gram, present.unsqueeze(-1) & present.unsqueeze(-2)


# -- Table 14: low-level statistics of routed patches ------------------------------------------
@torch.inference_mode()
def routed_patch_statistics(model: MoECLIP, loader: Iterable[Batch], layer: int, top1: bool = True) -> pd.DataFrame:
    """Mean Sobel gradient, contrast and entropy of the patches routed to each expert at one layer (Table 14).

    Statistics are taken on the image the model saw (the batch's input, de-normalised to grey
    levels 0-255), each over the pixel square of one patch token. With `top1` a patch counts
    for its first-choice expert only; otherwise for every expert in its top-k. Columns: expert
    (1-indexed), n_patches, gradient, contrast, entropy (bits); NaN for an expert no patch chose.
    """
    num_experts = model.config.num_experts
    patch = _square_patch_size(model)
    sums = torch.zeros(num_experts, len(STATISTICS), dtype=torch.float64)
    counts = torch.zeros(num_experts, dtype=torch.float64)
    for images, aux in _routed_batches(model, loader, [layer], dense=False, desc=f"patch statistics (layer {layer})"):
        selected = _selected(aux[layer].routing.topk_index, num_experts, top1).flatten(0, 1).double()  # (B*L, K)
        stats = patch_statistics(grey_levels(images), patch).flatten(0, 1).double()  # (B*L, 3)
        sums += (selected.T @ stats).cpu()
        counts += selected.sum(dim=0).cpu()
    means = (sums / counts.unsqueeze(-1)).numpy()  # 0/0 -> NaN for unused experts
    frame = pd.DataFrame(means, columns=list(STATISTICS))
    frame.insert(0, "n_patches", counts.numpy().astype(np.int64))
    frame.insert(0, "expert", np.arange(1, num_experts + 1))
    return frame


def _square_patch_size(model: MoECLIP) -> int:
    """The ViT's patch side in pixels (open_clip stores it as an int or an (h, w) pair)."""
    size = model.clip.visual.patch_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"patch statistics need square patches, got {height}x{width}")
    return int(height)


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) CLIP-normalised images -> (B, S, S) float grey levels, rounded to the integers 0..255."""
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    rgb = (images.float() * std + mean).clamp(0.0, 1.0) * 255.0
    luma = torch.einsum("bchw,c->bhw", rgb, rgb.new_tensor(LUMA))
    return luma.round().clamp(0, GREY_LEVELS - 1)


def sobel_magnitude(grey: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) Sobel gradient magnitude, edges by replication (scipy.ndimage.sobel's 'reflect')."""
    smooth = grey.new_tensor([1.0, 2.0, 1.0])
    derive = grey.new_tensor([-1.0, 0.0, 1.0])
    kernels = torch.stack([torch.outer(smooth, derive), torch.outer(derive, smooth)]).unsqueeze(1)  # d/dx, d/dy
    padded = F.pad(grey.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(padded, kernels)  # cross-correlation, as scipy
    return gradients.norm(dim=1)


def patch_statistics(grey: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, S, S) grey levels -> (B, L, 3) per patch token (row-major grid): mean Sobel magnitude,
    pixel standard deviation (population) and Shannon entropy in bits of the 256-bin histogram.

    The gradient is computed on the whole image before cutting it into patches, so a patch's
    border pixels see their true neighbours.
    """
    gradient = _patches(sobel_magnitude(grey), patch)  # (B, L, p*p)
    pixels = _patches(grey, patch)
    contrast = pixels.std(dim=-1, unbiased=False)
    return torch.stack([gradient.mean(dim=-1), contrast, histogram_entropy(pixels)], dim=-1)


def _patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, S, S) -> (B, L, p*p): the pixels of each non-overlapping p x p patch, patches row-major."""
    return F.unfold(image.unsqueeze(1), kernel_size=patch, stride=patch).transpose(1, 2)


def histogram_entropy(pixels: torch.Tensor) -> torch.Tensor:
    """(..., N) integer grey levels 0..255 -> (...) Shannon entropy (bits) of their 256-bin histogram."""
    levels = pixels.long().clamp(0, GREY_LEVELS - 1)
    counts = torch.zeros(*levels.shape[:-1], GREY_LEVELS, dtype=torch.float32, device=levels.device)
    counts.scatter_add_(-1, levels, torch.ones_like(levels, dtype=torch.float32))
    probs = counts / levels.shape[-1]
    return -(probs * torch.log2(probs.clamp(min=1e-12))).sum(dim=-1)  # empty bins contribute 0 * finite = 0
