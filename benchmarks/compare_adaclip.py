"""Our AdaCLIP (moeclip/methods/adaclip.py) against the official code on the same weights and inputs.

    .venv/bin/python -m benchmarks.compare_adaclip --official /path/to/AdaCLIP \
        [--backbone ViT-B-16 --image-size 240 --batch 2]
    .venv/bin/python -m benchmarks.compare_adaclip --official /path/to/AdaCLIP \
        --backbone ViT-L-14-336 --image-size 518 --batch 1 --skip-gradients

`--official` is a checkout of caoyunkang/AdaCLIP (its method/adaclip.py, method/clip_model.py and loss.py are
used). Their modules are imported from there at runtime; nothing of theirs is copied here. Their package
`method` is entered without running its __init__ (which imports the trainer's cv2 / tools stack that this
comparison never runs), `pkg_resources`, imported but unused here, is stubbed when absent, and where the
checkout holds only the Git LFS pointer of the BPE vocabulary its tokenizer reads open_clip's copy of that file.

Both sides get the same random open_clip CLIP at the backbone's native size (the official CLIP is built from
its own model config with exact GELU, as its loader does, and takes the state dict through its own bicubic
position resize), the official AdaCLIP's random trainable tensors (copied into ours) and the same images,
class names, masks and labels. The official k-means gets `random_state = kmeans_seed` (it is unseeded there),
so both cluster alike. The official side runs as trainer.py drives it, one image at a time (it supports batch
1 only): forward(aggregation=True) and scipy's gaussian_filter(sigma 4) for the test, forward(aggregation=False)
with FocalLoss / BinaryDiceLoss on the squeezed mask for the loss; ours takes the whole batch, whose loss is
the mean of the per-image losses, so the official gradients are those of the per-image losses over B.
Their forward normalises in place (`x /= x.norm()`), which autograd refuses in float32 on a CPU (on a GPU
the fp16 autocast makes norm save a float32 copy): the official training forward runs with autograd saving
copies (`saved_tensors_hooks(clone)`), which changes no value. The official code needs 64-wide attention heads,
so the tiny test ViT does not fit; ViT-B-16 and ViT-L-14-336 do.

Results on this machine's CPU (fp32, random weights), max |ours - official| (official magnitude):
ViT-B-16 @ 240, layers 3 6 9 12, batch 2: maps 1.3e-6 (0.74), scores 4.8e-7 (0.90), loss 1.4e-6 (6.3), gradients
2.4e-7..7.8e-7 (1.2e-3..0.19) except the text side: text static tokens 3.8e-6 (3.0e-2), text generator 1.3e-5
(0.12). Both codes round the text contexts' gradients through float16 per sequence (the `.half()`), so fp32-level
differences upstream (our batched text pass, its order of sums) flip some float16 roundings: 1e-4 relative.
ViT-L-14-336 @ 518, layers 6 12 18 24, batch 1, --skip-gradients: maps 1.0e-6 (0.64), scores 7.2e-7 (0.82),
loss 4.3e-6 (7.1), 3 to 7 minutes; the backward passes there would need tens of GB (the hook above keeps copies).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import open_clip
import torch
from scipy.ndimage import gaussian_filter
from sklearn.cluster import KMeans

from benchmarks.official import stub_pkg_resources
from moeclip.backbone import default_moe_layers, load_clip
from moeclip.methods.adaclip import AdaCLIP, AdaCLIPConfig
from moeclip.methods.anomalyclip import native_image_size
from moeclip.methods.targets import Targets

CLASSES = ("metal-nut", "pcb1", "bottle", "pipe_fryum")
# open_clip ships the same BPE vocabulary (sha256 924691ac...), the file the official checkout keeps in Git LFS.
OPEN_CLIP_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def is_gzip(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(2) == b"\x1f\x8b"


def import_official(path: Path) -> types.SimpleNamespace:
    """The official modules, imported from the checkout at `path`, with stubs for what they import but never run."""
    stub_pkg_resources()
    sys.path.insert(0, str(path))
    package = types.ModuleType("method")
    package.__path__ = [str(path / "method")]
    sys.modules["method"] = package
    from method import simple_tokenizer
    if not is_gzip(Path(simple_tokenizer.default_bpe())):  # a Git LFS pointer in a checkout without LFS
        simple_tokenizer.SimpleTokenizer.__init__.__defaults__ = (str(OPEN_CLIP_BPE),)
    from loss import BinaryDiceLoss, FocalLoss
    from method.adaclip import AdaCLIP as OfficialAdaCLIP
    from method.clip_model import CLIP, resize_pos_embed
    return types.SimpleNamespace(AdaCLIP=OfficialAdaCLIP, CLIP=CLIP, resize_pos_embed=resize_pos_embed,
                                 focal=FocalLoss(), dice=BinaryDiceLoss())


def our_config(args: argparse.Namespace, weights: str) -> AdaCLIPConfig:
    return AdaCLIPConfig(
        backbone=args.backbone, image_size=args.image_size, weights=weights, quick_gelu=False, precision="fp32",
        position_resize="bicubic", class_text="folder", feature_layers=default_moe_layers(args.backbone),
        prompting_branch="VL", prompting_type="SD", prompting_length=5, prompting_depth=4, prompt_fp16=True,
        use_hsf=True, k_clusters=args.k_clusters, hsf_tokens_per_cluster=5, hsf_variant="code", hsf_alpha=0.2,
        kmeans_seed=args.seed, logit_scale=100.0, sigma=4.0, focal_gamma=2.0, dice_unit="row")


def official_model(official: types.SimpleNamespace, path: Path, state: dict[str, torch.Tensor],
                   config: AdaCLIPConfig) -> torch.nn.Module:
    """The official CLIP (built as create_model builds it) holding `state`, wrapped in the official AdaCLIP."""
    model_config = json.loads((path / "model_configs" / f"{config.backbone}.json").read_text())
    model_config["vision_cfg"]["image_size"] = config.image_size
    clip = official.CLIP(**model_config)
    state = dict(state)
    official.resize_pos_embed(state, clip)
    clip.load_state_dict({key: value for key, value in state.items() if key in clip.state_dict()}, strict=True)
    clip.eval()
    model = official.AdaCLIP(freeze_clip=clip, text_channel=model_config["embed_dim"],
                             visual_channel=model_config["vision_cfg"]["width"], prompting_length=5,
                             prompting_depth=4, prompting_branch="VL", prompting_type="SD", use_hsf=True,
                             k_clusters=config.k_clusters, output_layers=list(config.feature_layers), device="cpu",
                             image_size=config.image_size)
    model.HSF.cluster_performer = KMeans(n_clusters=config.k_clusters, n_init="auto", random_state=config.kmeans_seed)
    return model


def copy_official_tensors(theirs: torch.nn.Module, ours: AdaCLIP) -> None:
    """Their random trainable tensors into our modules (the same values, laid out as ours)."""
    with torch.no_grad():
        for branch, prompter, generator in (
                (ours.text_prompts, theirs.text_prompter, theirs.dynamic_text_prompt_generator),
                (ours.visual_prompts, theirs.visual_prompter, theirs.dynamic_visual_prompt_generator)):
            branch.static.copy_(torch.stack(list(prompter.static_prompts)))
            branch.dynamic.load_state_dict({f"heads.{key[5:]}": value for key, value in generator.state_dict().items()})
        ours.patch_projections.load_state_dict({key[5:]: value for key, value in
                                                theirs.patch_token_layer.state_dict().items()})
        ours.cls_projection.load_state_dict(theirs.cls_token_layer.head[0].state_dict())


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Random images, labels alternating normal / anomalous, a rectangle per anomalous mask, class names."""
    generator = torch.Generator().manual_seed(args.seed)
    size = args.image_size
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    labels = torch.arange(args.batch) % 2
    masks = torch.zeros(args.batch, size, size)
    for i in range(1, args.batch, 2):
        top, left = (torch.randint(0, size // 2, (2,), generator=generator)).tolist()
        masks[i, top:top + size // 3, left:left + size // 4] = 1
    return images, labels, masks, [CLASSES[i % len(CLASSES)] for i in range(args.batch)]


def official_outputs(official: types.SimpleNamespace, model: torch.nn.Module, images: torch.Tensor,
                     labels: torch.Tensor, masks: torch.Tensor, names: list[str],
                     gradients: bool) -> dict[str, torch.Tensor]:
    """Test maps and scores (trainer.evaluation) and the training loss and gradients (train_one_batch), per image."""
    maps, scores, losses = [], [], []
    batch = images.shape[0]
    model.eval()
    with torch.no_grad():
        for i in range(batch):
            anomaly_map, score = model(images[i:i + 1], [names[i]], aggregation=True)
            maps.append(torch.from_numpy(gaussian_filter(anomaly_map[0].numpy(), sigma=4)))
            scores.append(score[0])
    model.train()
    for i in range(batch):
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved), \
                torch.set_grad_enabled(gradients):
            layer_maps, probabilities = model(images[i:i + 1], [names[i]], aggregation=False)
            gt = masks[i:i + 1].squeeze()
            loss = official.focal(probabilities, labels[i:i + 1].float().unsqueeze(1))
            for am in layer_maps:
                loss = loss + official.focal(am, gt) + official.dice(am[:, 1], gt) + official.dice(am[:, 0], 1 - gt)
        if gradients:
            (loss / batch).backward()
        losses.append(loss.detach())
    grads = official_grads(model) if gradients else {}
    return {"maps": torch.stack(maps), "scores": torch.stack(scores), "loss": torch.stack(losses).mean(),
            **{f"grad {name}": grad for name, grad in grads.items()}}


def official_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the official trainer's parameter groups, each group's concatenated in its own order (the
    unused first text tokens: zeros)."""
    groups = ("text_prompter", "visual_prompter", "dynamic_text_prompt_generator",
              "dynamic_visual_prompt_generator", "patch_token_layer", "cls_token_layer")
    return {group: torch.cat([torch.zeros(param.numel()) if param.grad is None else param.grad.reshape(-1)
                              for name, param in model.named_parameters() if name.startswith(group)])
            for group in groups}


def our_outputs(model: AdaCLIP, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                names: list[str], gradients: bool) -> dict[str, torch.Tensor]:
    """The same quantities through the method's protocol (predict; training_outputs + training_losses)."""
    model.eval()
    with torch.no_grad():
        maps, scores = model.predict(images, names, "industrial")
    model.train()
    with torch.set_grad_enabled(gradients):
        losses = model.training_losses(model.training_outputs(images, names),
                                       Targets(masks, labels, torch.ones(len(names), dtype=torch.bool)))
    if not gradients:
        return {"maps": maps, "scores": scores, "loss": losses["loss"]}
    losses["loss"].backward()

    def flat(*params: torch.Tensor) -> torch.Tensor:
        return torch.cat([param.grad.reshape(-1) for param in params])

    text, visual = model.text_prompts, model.visual_prompts
    grads = {
        "text_prompter": flat(text.static), "visual_prompter": flat(visual.static),
        "dynamic_text_prompt_generator": flat(*text.dynamic.parameters()),
        "dynamic_visual_prompt_generator": flat(*visual.dynamic.parameters()),
        "patch_token_layer": flat(*model.patch_projections.parameters()),
        "cls_token_layer": flat(*model.cls_projection.parameters()),
    }
    return {"maps": maps, "scores": scores, "loss": losses["loss"],
            **{f"grad {name}": grad for name, grad in grads.items()}}


def compare(args: argparse.Namespace) -> dict[str, float]:
    official = import_official(args.official)
    torch.manual_seed(args.seed)
    clip = load_clip(args.backbone, native_image_size(args.backbone), None, quick_gelu=False)
    state = {key: value.clone() for key, value in clip.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "random_clip.pt"
        torch.save(state, weights)
        config = our_config(args, str(weights))
        ours = AdaCLIP.build(config)
    theirs = official_model(official, args.official, state, config)
    copy_official_tensors(theirs, ours)
    images, labels, masks, names = inputs(args)
    reference = official_outputs(official, theirs, images, labels, masks, names, not args.skip_gradients)
    mine = our_outputs(ours, images, labels, masks, names, not args.skip_gradients)
    return {key: (mine[key].float() - reference[key].float()).abs().max().item() for key in reference} | {
        f"official max |{key}|": reference[key].float().abs().max().item() for key in reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of caoyunkang/AdaCLIP")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=240, help="240 with patch 16: 15x15 from the native 14x14")
    parser.add_argument("--k-clusters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--skip-gradients", action="store_true",
                        help="losses without backward passes (ViT-L at 518 px would need tens of GB here)")
    args = parser.parse_args()
    np.set_printoptions(precision=3)
    print(f"{args.backbone} at {args.image_size} px, feature layers {default_moe_layers(args.backbone)}, "
          f"batch {args.batch}: max |ours - official|, then the official magnitudes")
    for key, value in compare(args).items():
        print(f"  {key:<48} {value:.3e}")


if __name__ == "__main__":
    main()
