"""Multiply-accumulates (MACs) of the tower's pieces, read from their modules: the per-token rate of every linear
map and the width of each block's attention.

One place for these rates, because two jobs need them and must agree: the analytic FLOP model
(`dtplib.measure.flops`, held equal to fvcore's count by the tests) and ToMe's schedule solver
(`dtplib.tower.tome`), which picks the merges that make ToMe's tower cost what DTP's costs. What counts is the
matrix products only: in x out MACs per token for a linear map (biases are additions), and 2 x T^2 x width for a
block's QK^T and AV on T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from open_clip.transformer import Attention as OpenClipAttention
from timm.layers import Attention as TimmAttention


def linear_macs_per_token(module: nn.Module) -> int:
    """MACs per token of every linear map inside `module` (nn.Linear, and the packed in-projection of attention)."""
    macs = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
        elif isinstance(m, nn.MultiheadAttention):  # in_proj is a parameter, not a Linear; out_proj is a Linear
            macs += sum(w.numel() for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
                        if w is not None)
        elif isinstance(m, OpenClipAttention):
            macs += m.in_proj_weight.numel()
    return macs


def attention_width(block: nn.Module) -> int:
    """Width of the query/key space of a transformer block's self-attention (heads x head width)."""
    widths = []
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention):
            widths.append(m.embed_dim)
        elif isinstance(m, OpenClipAttention):
            widths.append(m.in_proj_weight.shape[0] // 3)
        elif isinstance(m, TimmAttention):
            widths.append(m.attn_dim)
    if len(widths) != 1:
        raise ValueError(f"{type(block).__name__}: expected one self-attention (nn.MultiheadAttention, open_clip "
                         f"or timm Attention), found {len(widths)}; the analytic model does not cover this block")
    return widths[0]


def block_macs(blocks: Sequence[nn.Module], tokens):
    """(linear, attention) MACs of transformer blocks on `tokens` tokens each (a number, or a tensor of per-image
    counts): tokens x (qkv + out-projection + MLP) for the linear maps, 2 x tokens^2 x width for QK^T and AV."""
    linear = sum(linear_macs_per_token(block) for block in blocks) * tokens
    attention = sum(2 * attention_width(block) for block in blocks) * tokens * tokens
    return linear, attention
