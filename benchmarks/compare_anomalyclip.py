"""Our AnomalyCLIP (moeclip/methods/anomalyclip.py) against the official code on the same weights and inputs.

    .venv/bin/python -m benchmarks.compare_anomalyclip --official /path/to/AnomalyCLIP \
        [--backbone ViT-B-16 --image-size 240 --dpam-from 6 --feature-layers 12 --batch 2]

`--official` is a checkout of zqhang/AnomalyCLIP (its AnomalyCLIP_lib/, prompt_ensemble.py and loss.py are
used). Their modules are imported from there at runtime; nothing of theirs is copied here. `thop` and
`pkg_resources`, imported by those modules but unused by this comparison, are stubbed when absent.

Both sides get the same random open_clip CLIP at the backbone's native input size (the official `build_model`
reads OpenAI-style state-dict keys, which open_clip's CLIP shares), the official prompt learner's random tensors
(loaded into ours with `load_official_prompts`) and the same images, masks and labels. The official side is
driven as its test.py and train.py drive it (DPAM_replace, encode_image, encode_text_learn, compute_similarity,
get_similarity_map, scipy's gaussian_filter, FocalLoss, BinaryDiceLoss, lambda 4); only its batch-1 indexing of
the image score is taken per image. The official code needs 64-wide attention heads (it derives the head count
from the width), so the tiny test ViT does not fit; ViT-B-16 (default) and ViT-L-14-336 do.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from benchmarks.official import stub_pkg_resources
from moeclip.backbone import load_clip
from moeclip.methods.anomalyclip import (
    AnomalyCLIP,
    AnomalyCLIPConfig,
    native_image_size,
)
from moeclip.methods.targets import Targets


def import_official(path: Path) -> types.SimpleNamespace:
    """The official modules, imported from the checkout at `path`, with stubs for what they import but never run."""
    if "thop" not in sys.modules:
        sys.modules["thop"] = types.SimpleNamespace(profile=None)
    stub_pkg_resources()
    sys.path.insert(0, str(path))
    import AnomalyCLIP_lib
    from AnomalyCLIP_lib.build_model import build_model
    from loss import BinaryDiceLoss, FocalLoss
    from prompt_ensemble import AnomalyCLIP_PromptLearner
    return types.SimpleNamespace(lib=AnomalyCLIP_lib, build_model=build_model, focal=FocalLoss(),
                                 dice=BinaryDiceLoss(), PromptLearner=AnomalyCLIP_PromptLearner)


def our_config(args: argparse.Namespace, weights: str) -> AnomalyCLIPConfig:
    return AnomalyCLIPConfig(
        backbone=args.backbone, image_size=args.image_size, weights=weights, quick_gelu=True,
        position_resize="bilinear", precision="fp32", prompt_length=args.prompt_length, deep_prompt_length=4,
        deep_prompt_depth=args.deep_depth, deep_prompt_fp16=True, dpam_from=args.dpam_from,
        feature_layers=tuple(args.feature_layers), temperature=0.07, lambda_local=4.0, focal_gamma=2.0,
        sigma=args.sigma, object_word="object", anomaly_word="damaged")


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP-normalised-like random images, labels alternating normal / anomalous, a rectangle per anomalous mask."""
    generator = torch.Generator().manual_seed(args.seed)
    size = args.image_size
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    labels = torch.arange(args.batch) % 2
    masks = torch.zeros(args.batch, size, size)
    for i in range(1, args.batch, 2):
        top, left = (torch.randint(0, size // 2, (2,), generator=generator)).tolist()
        masks[i, top:top + size // 3, left:left + size // 4] = 1
    return images, labels, masks


def official_outputs(official: types.SimpleNamespace, model: torch.nn.Module, learner: torch.nn.Module,
                     images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                     args: argparse.Namespace, dpam: int) -> dict[str, torch.Tensor]:
    """Text, scores, maps before / after the Gaussian (test.py) and the training loss (train.py), official side."""
    prompts, tokenized, deep = learner(cls_id=None)
    text = model.encode_text_learn(prompts, tokenized, deep).float()
    text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
    text = text / text.norm(dim=-1, keepdim=True)  # (1, 2, D)
    with torch.no_grad():
        image_features, patch_features = model.encode_image(images, args.feature_layers, DPAM_layer=dpam)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    scores = ((image_features @ text.permute(0, 2, 1)) / 0.07).softmax(-1)[0, :, 1]  # test.py, every image
    maps, loss = [], 0
    for patch_feature in patch_features:
        patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
        similarity, _ = official.lib.compute_similarity(patch_feature, text[0])
        similarity_map = official.lib.get_similarity_map(similarity[:, 1:, :], args.image_size)
        maps.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
        probs = similarity_map.permute(0, 3, 1, 2)
        loss = loss + official.focal(probs, masks) + official.dice(probs[:, 1], masks) + \
            official.dice(probs[:, 0], 1 - masks)
    raw = torch.stack(maps).sum(dim=0).detach()
    smoothed = torch.stack([torch.from_numpy(gaussian_filter(m.numpy(), sigma=args.sigma)) for m in raw])
    image_logits = (image_features.unsqueeze(1) @ text.permute(0, 2, 1))[:, 0] / 0.07
    image_loss = F.cross_entropy(image_logits, labels)
    total = image_loss + 4 * loss
    total.backward()
    deep_grad = torch.stack([p.grad for p in learner.compound_prompts_text])
    return {"text": text[0].detach(), "scores": scores.detach(), "raw_maps": raw, "maps": smoothed,
            "image_loss": image_loss.detach(), "local_loss": loss.detach(), "loss": total.detach(),
            "grad_ctx_pos": learner.ctx_pos.grad.reshape(-1), "grad_ctx_neg": learner.ctx_neg.grad.reshape(-1),
            "grad_deep": deep_grad.reshape(-1)}


def our_outputs(model: AnomalyCLIP, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The same quantities through the method's protocol (predict; training_outputs + training_losses)."""
    model.eval()
    with torch.no_grad():
        text = model.text_features()
        maps, scores = model.predict(images, ["object"] * args.batch, "industrial")
        vision = model.encode_image(images)
        raw = model.local_probabilities(vision.patch_features, text, images.shape[-2:])[:, :, 1].sum(dim=1)
    model.train()
    losses = model.training_losses(model.training_outputs(images, []),
                                   Targets(masks, labels, torch.ones(args.batch, dtype=torch.bool)))
    losses["loss"].backward()
    grads = {f"grad_{name}": param.grad.reshape(-1) for name, param in model.prompts.named_parameters()}
    return {"text": text, "scores": scores, "raw_maps": raw, "maps": maps, "image_loss": losses["image_loss"],
            "local_loss": losses["local_loss"], "loss": losses["loss"], **grads}


def compare(args: argparse.Namespace) -> dict[str, float]:
    official = import_official(args.official)
    torch.manual_seed(args.seed)
    clip = load_clip(args.backbone, native_image_size(args.backbone), None, quick_gelu=True)
    state = {key: value.clone() for key, value in clip.state_dict().items()}
    design = {"Prompt_length": args.prompt_length, "learnabel_text_embedding_depth": args.deep_depth,
              "learnabel_text_embedding_length": 4}
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructors print shapes
        reference = official.build_model("random", dict(state), design).float().eval()
        learner = official.PromptLearner(reference, design)
    depth = len(reference.visual.transformer.resblocks)
    dpam = depth - args.dpam_from + 2  # DAPM_replace(n) gives the last n - 1 blocks the V-V path
    reference.visual.DAPM_replace(DPAM_layer=dpam)
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "random_clip.pt"
        torch.save(state, weights)
        ours = AnomalyCLIP.build(our_config(args, str(weights)))
    ours.load_official_prompts(learner.state_dict())
    images, labels, masks = inputs(args)
    theirs = official_outputs(official, reference, learner, images, labels, masks, args, dpam)
    mine = our_outputs(ours, images, labels, masks, args)
    return {key: (mine[key].float() - theirs[key].float()).abs().max().item() for key in theirs} | {
        f"official {key}": theirs[key].float().abs().max().item() for key in ("scores", "loss", "grad_deep")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of zqhang/AnomalyCLIP")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=240, help="240 with patch 16: 15x15 from the native 14x14")
    parser.add_argument("--dpam-from", type=int, default=6)
    parser.add_argument("--feature-layers", type=int, nargs="+", default=[12])
    parser.add_argument("--deep-depth", type=int, default=9)
    parser.add_argument("--prompt-length", type=int, default=12)
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=111)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    np.set_printoptions(precision=3)
    print(f"{args.backbone} at {args.image_size} px, DPAM from block {args.dpam_from}, feature layers "
          f"{args.feature_layers}, batch {args.batch}: max |ours - official|")
    for key, value in compare(args).items():
        print(f"  {key:<24} {value:.3e}")


if __name__ == "__main__":
    main()
