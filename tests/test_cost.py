"""Table 13's FLOPs (moeclip/cost.py): every matrix product of one image's inference, attention included."""
import torch

from moeclip.cost import inference_flop_counts
from moeclip.methods.moeclip import build_model
from tiny_models import tiny_config


def test_attention_and_mlp_flops_match_the_vit_formula_and_text_is_not_counted():
    config = tiny_config()  # 4 blocks, width 64, 8 px patches at 64 px: 65 tokens
    model = build_model(config, seed=0).eval()
    image = torch.randn(1, 3, config.image_size, config.image_size)
    counts = inference_flop_counts(model, image, ["object"], "industrial")
    tokens, width, blocks = (config.image_size // 8) ** 2 + 1, 64, 4
    # 2 FLOPs per multiply-add: Q, K, V and output projections 4 N d^2, scores and weighted sum 2 N^2 d.
    assert counts["ResidualAttentionBlock.attn"] == blocks * 2 * (4 * tokens * width**2 + 2 * tokens**2 * width)
    assert counts["ResidualAttentionBlock.mlp"] == blocks * 2 * 8 * tokens * width**2
    assert "Transformer" not in counts  # open_clip's text tower: its anchors were computed beforehand
    assert counts == inference_flop_counts(model, image, ["object"], "industrial")
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting
