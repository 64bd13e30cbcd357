"""Our April-GAN (moeclip/methods/april_gan.py) against the official release, on the same weights and inputs.

The release (github.com/ByChelsea/VAND-APRIL-GAN) is imported at runtime from a checkout: its modified open_clip
copy, `model.LinearLayer`, `prompt_ensemble`, `loss` and its `train.train` function, which runs one real training
step. Nothing of it is copied here; the script only supplies what that step reads:
  - its `create_model_and_transforms` builds the release's CLIP as usual and then loads OUR CLIP's state dict;
  - its `LinearLayer` is built as usual and then loads OUR projections (`projections.i` -> `fc.i`);
  - its dataset class is replaced by one serving our fixed images and masks (`dataset.py` is never imported);
  - its FocalLoss / BinaryDiceLoss are subclassed to record each call's input and value: the focal inputs ARE
    the release's per-layer softmax maps, and the sum of the recorded values is its training loss (the values
    go back detached, see `recording`: the release's backward only runs under CUDA autocast);
  - `pkg_resources` (imported by `prompt_ensemble.py`, gone from recent setuptools) is stubbed if missing;
  - on a machine without CUDA, the release's hard-coded `.to('cuda')` (attention bookkeeping in its
    VisionTransformer.forward) is redirected to the CPU while the release runs; its `torch.cuda.amp.autocast()`
    then disables itself (fp32), so both sides compute in float32.
The image score is the release's test.py computation (its CLS embedding and its cached text prompts, softmax of
100 f T per image), written out here because test.py needs its datasets; the summed map is the sum over layers of
the recorded anomalous channels.

The release's vision forward reads the attention of block 12, so the backbone needs at least 12 blocks. The
default is a small random 12-block ViT with ViT-L/14's patch size at 518 px (37x37 grid, taps 3/6/9/12), which
runs in seconds on a CPU; `--backbone ViT-L-14-336 --layers 6 12 18 24` compares the paper's network (minutes).

    python -m benchmarks.compare_april_gan --official /path/to/VAND-APRIL-GAN
"""
from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from benchmarks.official import cuda_on_cpu, official_imports
from moeclip.methods.april_gan import AprilGAN, AprilGANConfig
from moeclip.methods.targets import Targets

COMPARE_BACKBONE = "AprilGAN-Compare-ViT"  # 'ViT' in the name: the release's LinearLayer checks for it
COMPARE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 518, "layers": 12, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NAMES = ("metal_nut", "bottle")
RELEASE_MODULES = ("open_clip", "train", "model", "loss", "prompt_ensemble", "dataset")


def inputs(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Fixed CLIP-normalised-looking images, 0/1 masks (an anomalous rectangle in every other image), names."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    masks = torch.zeros(batch, size, size)
    for index in range(0, batch, 2):
        masks[index, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    return images, masks, [NAMES[i % len(NAMES)] for i in range(batch)]


class Recorder:
    """What the release's training step did: its CLIP, text prompts, loss calls and the order it read samples."""

    def __init__(self) -> None:
        self.clip: Any = None
        self.text_prompts: dict[str, torch.Tensor] = {}
        self.focal: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dice: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.order: list[int] = []
        self.image_scores = torch.empty(0)


def recording(loss_class: type, log: list) -> type:
    """`loss_class` that logs (input, value) of each call and hands back a detached copy of the value.

    Detached because the release's backward fails without its CUDA fp16 autocast: it divides the projection
    outputs in place by their norms, which autograd saved for the norm's backward (under autocast the norm
    reads an fp32 copy). So its forward runs as released and its backward and Adam step have nothing to do.
    """
    class Recording(loss_class):  # type: ignore[misc, valid-type]
        def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            value = super().forward(prediction, target).detach()
            log.append((prediction.detach().clone(), value.clone()))
            return value.requires_grad_()
    return Recording


def run_release(ours: AprilGAN, checkout: Path, images: torch.Tensor, masks: torch.Tensor,
                names: Sequence[str], workdir: Path) -> Recorder:
    """One step of the release's `train.train` on our weights and batch, with its computations recorded."""
    record = Recorder()
    config = ours.config
    config_path = workdir / "model_config.json"
    config_path.write_text(json.dumps(open_clip.get_model_config(config.backbone)))
    with official_imports(checkout, RELEASE_MODULES), cuda_on_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        release_clip = importlib.import_module("open_clip")
        train = importlib.import_module("train")
        release_model = importlib.import_module("model")
        release_loss = importlib.import_module("loss")
        release_clip.add_model_config(workdir)  # the compare config (a no-op for ViT-L-14-336)
        create = release_clip.create_model_and_transforms

        def create_with_our_weights(name: str, size: int, pretrained: str | None = None) -> Any:
            clip, train_transform, preprocess = create(name, size, pretrained=None)
            clip.load_state_dict(ours.clip.state_dict())
            record.clip = clip.eval()
            return clip, train_transform, preprocess

        def linear_layer_with_our_weights(*args: Any) -> Any:
            layer = release_model.LinearLayer(*args)
            layer.load_state_dict({key.replace("projections.", "fc.", 1): value
                                   for key, value in ours.trainable_state_dict().items()})
            return layer

        def text_prompts(*args: Any) -> dict[str, torch.Tensor]:
            record.text_prompts = encode(*args)
            return record.text_prompts

        class FixedBatch(torch.utils.data.Dataset):
            def __init__(self, **_: Any) -> None:
                super().__init__()

            def get_cls_names(self) -> list[str]:
                return list(dict.fromkeys(names))

            def __len__(self) -> int:
                return len(names)

            def __getitem__(self, index: int) -> dict[str, Any]:
                record.order.append(index)
                return {"img": images[index], "img_mask": masks[index][None], "cls_name": names[index],
                        "anomaly": int(masks[index].any())}

        encode = train.encode_text_with_prompt_ensemble
        release_clip.create_model_and_transforms = create_with_our_weights
        train.LinearLayer, train.encode_text_with_prompt_ensemble = linear_layer_with_our_weights, text_prompts
        train.VisaDataset = train.MVTecDataset = FixedBatch
        train.FocalLoss = recording(release_loss.FocalLoss, record.focal)
        train.BinaryDiceLoss = recording(release_loss.BinaryDiceLoss, record.dice)
        args = argparse.Namespace(
            epoch=1, learning_rate=1e-3, batch_size=len(names), image_size=images.shape[-1], save_path=str(workdir),
            train_data_path=str(workdir),
            config_path=str(config_path), dataset="visa", model=config.backbone, pretrained=None,
            features_list=list(config.feature_layers), aug_rate=0.0, print_freq=1, save_freq=10**6)
        torch.manual_seed(111)  # as the release's setup_seed: fixes its DataLoader's shuffle
        train.train(args)
        record.image_scores = release_image_scores(record, images[record.order], [names[i] for i in record.order],
                                                   list(config.feature_layers))
    return record


def release_image_scores(record: Recorder, images: torch.Tensor, names: Sequence[str],
                         layers: list[int]) -> torch.Tensor:
    """test.py's image score, image by image: softmax(100 * f / |f| @ T_class)[1] from the release's CLIP."""
    scores = []
    with torch.no_grad():
        for image, name in zip(images, names):
            features, _ = record.clip.encode_image(image[None], layers)
            features = features / features.norm(dim=-1, keepdim=True)
            scores.append((100.0 * features @ record.text_prompts[name]).softmax(dim=-1)[0, 1])
    return torch.stack(scores)


def compare(args: argparse.Namespace) -> dict[str, float]:
    """Max abs differences between our outputs and the release's on one batch."""
    config = AprilGANConfig(backbone=args.backbone, image_size=args.image_size, weights=None, quick_gelu=False,
                            precision="fp32", class_text="folder", feature_layers=tuple(args.layers),
                            logit_scale=100.0, focal_gamma=2.0)  # the release's focal loss
    images, masks, names = inputs(args.batch, args.image_size, args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="april-gan-compare-") as workdir:
        if args.backbone == COMPARE_BACKBONE:
            (Path(workdir) / f"{COMPARE_BACKBONE}.json").write_text(json.dumps(COMPARE_CONFIG))
            open_clip.add_model_config(workdir)
        ours = AprilGAN.build(config, seed=args.seed).eval()
        release = run_release(ours, args.official.resolve(), images, masks, names, Path(workdir))
    order = release.order
    images, masks, names = images[order], masks[order], [names[i] for i in order]
    with torch.no_grad():
        probs = ours.training_outputs(images, names)
        maps, scores = ours.predict(images, names, "industrial")
        targets = Targets(masks=masks, labels=masks.flatten(1).amax(1).long(), known=torch.ones(len(names), dtype=bool))
        loss = ours.training_losses(probs, targets)["loss"]
    release_probs = torch.stack([prediction for prediction, _ in release.focal], dim=1)  # (B, M, 2, H, W)
    release_loss = sum(value for _, value in release.focal + release.dice)
    result = {f"layer {layer} map": (probs[:, i, 1] - release_probs[:, i, 1]).abs().max().item()
              for i, layer in enumerate(config.feature_layers)}
    result["summed map"] = (maps - release_probs[:, :, 1].sum(dim=1)).abs().max().item()
    result["image scores"] = (scores - release.image_scores).abs().max().item()
    result["training loss"] = abs(loss.item() - float(release_loss))
    result["(training loss, ours)"] = loss.item()
    result["(image scores, ours)"] = scores.tolist()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of ByChelsea/VAND-APRIL-GAN")
    parser.add_argument("--backbone", default=COMPARE_BACKBONE)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12])
    parser.add_argument("--batch", type=int, default=2, help="at least 2 (the release squeezes the mask batch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value in compare(args).items():
        print(f"{name:>24}: {value}")


if __name__ == "__main__":
    main()
