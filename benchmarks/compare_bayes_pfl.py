"""Our Bayes-PFL (moeclip/methods/bayes_pfl.py) against the official code, on the same weights, inputs and noise.

The official code (github.com/xiaozhen228/Bayes-PFL) is imported at run time from a checkout: its CLIP
(`models.model_CLIP.CLIP`, `tokenize`), `models.VPB.Context_Prompting` / `TextEncoder` and `loss`. Nothing of
it is copied here; the script only supplies what those classes read:
  - its CLIP is built with our backbone's sizes and loads OUR random open_clip state dict (its token table has one
    extra, unused row; its unused `prompt_text_projection` keeps its own values);
  - its Context_Prompting is built as usual and then loads OUR added weights (`load_ours`); the modules we leave
    out (decoders, p_mu, fuse, image_mapping) keep their own values and never reach the compared numbers;
  - `pkg_resources` (imported by model_CLIP.py, gone from recent setuptools) is stubbed if missing; the checkout
    is the working directory while it is imported (its tokenizer opens ./models/bpe_simple_vocab_16e6.txt.gz);
  - on a machine without CUDA its hard-coded `.cuda()` / `.to('cuda')` (log-det bookkeeping, attention
    bookkeeping) are redirected to the CPU while it runs.
The test-time score and map, and the stage-1 training loss and optimiser, are test.py's and train.py's
computations written out (both scripts need their datasets). The noise: before each official image the global
RNG is seeded with `sample_seed` and its state-sample cache is cleared, so that its draws are ours (a CPU
generator seeded the same, the same order); our `predict` runs the whole batch at once. Training: the global RNG
is seeded the same before each side's step. The optimiser step compares Adam with train.py's four groups at
their own learning rates, without train.py's warm-up schedule (its first step has learning rate 0).

The official vision forward reads the attention of block 12, so the backbone needs at least 12 blocks:

    python -m benchmarks.compare_bayes_pfl --official /path/to/Bayes-PFL                  # ViT-B-16 @ 224
    python -m benchmarks.compare_bayes_pfl --official ... --backbone ViT-L-14-336 --image-size 518 \\
        --layers 6 12 18 24
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.official import cuda_on_cpu, official_imports
from moeclip.config import TrainConfig
from moeclip.methods.bayes_pfl import BayesPFL, BayesPFLConfig
from moeclip.methods.targets import Targets
from moeclip.training import build_optimizer

OFFICIAL_MODULES = ("models", "loss")
NAMES = ("pcb1", "bottle")
# Adam's first step moves each element by lr * g / (|g| + 1e-8): where |g| is near 1e-8, fp32 rounding of g
# changes the step by up to lr; the step is also compared where |g| is well above that.
ADAM_CLEAR = 1e-6
TRAIN = {"epochs": 30, "batch_size": 2, "lr": 1e-4, "betas": (0.5, 0.999), "weight_decay": 0.0, "milestones": (),
         "gamma": 1.0, "seed": 333, "augment": False, "num_workers": 0, "checkpoint_every": 1000, "max_steps": None}


def official_args(model: BayesPFL, image_size: int) -> argparse.Namespace:
    config, clip = model.config, model.clip
    return argparse.Namespace(
        embed_dim=clip.text_projection.shape[1], vision_width=clip.visual.conv1.out_channels,
        text_width=clip.ln_final.normalized_shape[0], prompt_num=config.prompt_num,
        prompt_context_len=config.context_length, prompt_state_len=config.state_length,
        sample_num=config.test_samples, num_flows=config.num_flows, features_list=list(config.feature_layers),
        image_size=image_size)


def official_clip(model_clip: Any, ours: BayesPFL, image_size: int) -> torch.nn.Module:
    """The official CLIP with our backbone's sizes and weights."""
    clip = ours.clip
    visual, text_width = clip.visual, clip.ln_final.normalized_shape[0]
    theirs = model_clip.CLIP(clip.text_projection.shape[1], image_size, len(visual.transformer.resblocks),
                             visual.conv1.out_channels, visual.patch_size[0], 77, clip.vocab_size + 1, text_width,
                             text_width // 64, len(clip.transformer.resblocks), 1, 0)
    state = {k: v for k, v in clip.state_dict().items() if k != "attn_mask"}
    state["token_embedding.weight"] = torch.cat([state["token_embedding.weight"],
                                                 torch.zeros(1, text_width)])
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert set(missing) == {"prompt_text_projection"} and not unexpected, (missing, unexpected)
    return theirs.eval()


def official_names(ours: BayesPFL) -> dict[str, torch.nn.Parameter]:
    """Each of our added parameters under its official Context_Prompting name (shapes may differ by unit axes)."""
    names = {"prompt_context": ours.prompts.context, "prompt_state_normal": ours.prompts.normal,
             "prompt_state_abnormal": ours.prompts.anomalous, "temperature_pixel": ours.temperatures["pixel"],
             "temperature_image": ours.temperatures["image"], "class_mapping.weight": ours.class_mapping.weight,
             "class_mapping.bias": ours.class_mapping.bias, "RCA.q_proj_pre.weight": ours.rca.query.weight,
             "RCA.q_proj_pre.bias": ours.rca.query.bias}
    for prefix, encoder in (("context_encoder", ours.context_flow.encoder), ("state_encoder", ours.state_encoder)):
        for theirs_name, mlp in (("weight_mean", encoder.mean), ("weight_log_variance", encoder.log_variance)):
            for key, param in mlp.named_parameters():
                names[f"{prefix}.{theirs_name}.module.{key}"] = param
    for kind in ("u", "w", "b"):
        for key, param in getattr(ours.context_flow, kind).named_parameters():
            names[f"PFL_context.amor_{kind}.{key}"] = param
    for name, flow in (("PFL_normal", ours.normal_flow), ("PFL_abnormal", ours.anomalous_flow)):
        names[f"{name}.state"] = flow.state
        for kind in ("u", "w", "b"):
            names[f"{name}.amor_{kind}"] = getattr(flow, kind)
    for i, projection in enumerate(ours.rca.projections):
        names[f"RCA.linear_proj.{i}.weight"] = projection.weight
    assert len(names) == len(list(ours.parameters())) - len(list(ours.clip.parameters())), "a parameter is unmapped"
    return names


def load_ours(theirs: torch.nn.Module, ours: BayesPFL) -> None:
    """Copy our added weights into the official Context_Prompting (their shapes)."""
    params = dict(theirs.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in official_names(ours).items():
            params[key].copy_(value.detach().reshape(params[key].shape))


def official_groups(theirs: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """train.py's stage-1 Adam groups and learning rates (1e-3 prompts, 1e-2 temperatures, 1e-3 flows, lr rest)."""
    prompts, flows, rest = [], [], []
    for name, param in theirs.named_parameters():
        if "prompt" in name:
            prompts.append(param)
        elif "PFL" in name and "encoder" not in name and "decoder" not in name:
            flows.append(param)
        elif "temperature" not in name:
            rest.append(param)
    return [{"params": prompts, "lr": 1e-3}, {"params": [theirs.temperature_pixel, theirs.temperature_image],
                                             "lr": 1e-2}, {"params": flows, "lr": 1e-3}, {"params": rest, "lr": lr}]


def official_test(theirs: torch.nn.Module, text_encoder: Any, clip: torch.nn.Module, tokenize: Any,
                  images: torch.Tensor, args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """test.py's score and map per image (batch 1), the RNG seeded and the state cache cleared before each."""
    count = args.prompt_num * args.sample_num
    maps, scores = [], []
    for image in images:
        theirs.zk_n = theirs.zk_a = None
        torch.manual_seed(seed)
        with torch.no_grad():
            image_features, _, patch_tokens = clip.encode_image(image[None], args.features_list)
            text, _ = theirs.forward_ensemble(text_encoder, image_features, patch_tokens, [NAMES[len(maps)]], "cpu",
                                              tokenize, mode="test")
            logits, layer_maps = theirs(text, image_features, patch_tokens, stage=1, mode="test")
        logits = logits.squeeze(2)
        scores.append(sum(torch.stack([logits[0, i], logits[0, i + count]]).softmax(0)[1] for i in range(count))
                      / count)
        per_pair = [torch.stack([m[0, i], m[0, i + count]]).softmax(0)[1] for m in layer_maps for i in range(count)]
        maps.append(torch.stack(per_pair).mean(0))
    return torch.stack(maps), torch.stack(scores)


def official_step(theirs: torch.nn.Module, text_encoder: Any, clip: torch.nn.Module, tokenize: Any, loss: Any,
                  images: torch.Tensor, targets: Targets, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """train.py's stage-1 loss on one batch (its order of random draws), backward included."""
    with torch.no_grad():
        image_features, _, patch_tokens = clip.encode_image(images, args.features_list)
    text, regularisers = theirs.forward_ensemble(text_encoder, image_features, patch_tokens, list(NAMES), "cpu",
                                                 tokenize, mode="train")
    logits, layer_maps = theirs(text, image_features, patch_tokens, stage=1, mode="train")
    logits = logits.squeeze(2)
    index = torch.randint(0, args.prompt_num, (1, 1))[0]
    image_loss = torch.nn.CrossEntropyLoss()(torch.cat([logits[:, index], logits[:, index + args.prompt_num]], 1),
                                             targets.labels)
    kl = regularisers[1] + regularisers[2] + regularisers[3]
    orthogonal = loss.Orthogonal_Loss()(text, args)
    segmentation = 0
    for layer_map in layer_maps:
        pair = torch.cat([layer_map[:, index], layer_map[:, index + args.prompt_num]], dim=1).softmax(dim=1)
        segmentation = segmentation + loss.FocalLoss()(pair.clone(), targets.masks.clone()) \
            + loss.DiceLoss()(pair, targets.masks)
    total = image_loss + segmentation + kl + orthogonal
    total.backward()
    return {"loss": total, "image_loss": image_loss, "kl_weighted": kl, "orthogonal_loss": orthogonal}


def compare(checkout: Path, backbone: str, image_size: int, layers: list[int], seed: int) -> dict[str, float]:
    config = BayesPFLConfig(backbone=backbone, image_size=image_size, weights=None, quick_gelu=False,
                            precision="fp32", feature_layers=tuple(layers), prompt_num=3, context_length=5,
                            state_length=5, num_flows=10, test_samples=10, sample_seed=333, rca_heads=4,
                            initial_temperature=0.07, kl_weight=0.01, orthogonal_weight=1.0, focal_gamma=2.0,
                            sigma=8.0, score_alpha=0.5, topk=2000, lr_scale_prompts=10.0, lr_scale_flows=10.0,
                            lr_scale_temperatures=100.0)
    ours = BayesPFL.build(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a bias away from its zero init, so that it matters
        ours.class_mapping.bias.add_(0.05 * torch.randn(ours.class_mapping.bias.shape, generator=generator))
    images = torch.randn(2, 3, image_size, image_size, generator=generator)
    masks = torch.zeros(2, image_size, image_size)
    masks[1, image_size // 4:image_size // 2, image_size // 3:image_size // 2] = 1
    targets = Targets(masks=masks, labels=torch.tensor([0, 1]), known=torch.tensor([True, True]))

    with official_imports(checkout, OFFICIAL_MODULES, workdir=True), cuda_on_cpu():
        model_clip, vpb, loss = (importlib.import_module(m) for m in ("models.model_CLIP", "models.VPB", "loss"))
        args = official_args(ours, image_size)
        clip = official_clip(model_clip, ours, image_size)
        theirs = vpb.Context_Prompting(args)
        load_ours(theirs, ours)
        text_encoder = vpb.TextEncoder(clip, args)
        theirs.eval()
        their_maps, their_scores = official_test(theirs, text_encoder, clip, model_clip.tokenize, images, args,
                                                 config.sample_seed)
        theirs.train()
        torch.manual_seed(seed)
        their_losses = official_step(theirs, text_encoder, clip, model_clip.tokenize, loss, images, targets, args)
        their_params = dict(theirs.named_parameters())
        their_grads = {name: p.grad.clone() for name, p in their_params.items() if p.grad is not None}
        optimizer = torch.optim.Adam(official_groups(theirs, TRAIN["lr"]), betas=(0.5, 0.999))
        optimizer.step()

    ours.eval()
    with torch.no_grad():
        maps, scores = ours.predict(images, list(NAMES), "industrial")
    ours.train()
    torch.manual_seed(seed)
    losses = ours.training_losses(ours.training_outputs(images, list(NAMES)), targets)
    losses["loss"].backward()
    mine = official_names(ours)
    grad_diff = max((mine[name].grad.reshape(their_grads[name].shape) - their_grads[name]).abs().max().item()
                    for name in mine)
    grad_scale = max(their_grads[name].abs().max().item() for name in mine)
    our_optimizer, _ = build_optimizer(ours, TrainConfig.model_validate(TRAIN), torch.device("cpu"))
    our_optimizer.step()
    step = {name: (mine[name].detach().reshape(their_params[name].shape) - their_params[name].detach()).abs()
            for name in mine}
    step_diff, step_worst = max((value.max().item(), name) for name, value in step.items())
    clear = max(torch.where(their_grads[name].abs() > ADAM_CLEAR, value, 0).max().item()
                for name, value in step.items())
    return {"backbone": f"{backbone} @ {image_size}", "max_abs_map": (maps - their_maps).abs().max().item(),
            "max_abs_score": (scores - their_scores).abs().max().item(),
            "loss_ours": losses["loss"].item(), "loss_theirs": their_losses["loss"].item(),
            "max_abs_loss": abs(losses["loss"].item() - their_losses["loss"].item()),
            "max_abs_kl": abs(config.kl_weight * losses["kl_loss"].item() - their_losses["kl_weighted"].item()),
            "max_abs_orthogonal": abs(losses["orthogonal_loss"].item() - their_losses["orthogonal_loss"].item()),
            "max_abs_gradient": grad_diff, "max_abs_gradient_value": grad_scale,
            "max_abs_param_after_step": step_diff, "param_after_step_worst": step_worst,
            f"max_abs_param_after_step_where_abs_grad_above_{ADAM_CLEAR:g}": clear}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of xiaozhen228/Bayes-PFL")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(compare(args.official.resolve(), args.backbone, args.image_size, args.layers, args.seed),
                     indent=2))


if __name__ == "__main__":
    main()
