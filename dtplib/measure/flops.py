"""FLOPs of DTP-ViT and open_clip ViT towers: an analytic model per component, and fvcore with attention counted.

`python -m dtplib.flops --model DTP-ViT-B-32-4x --images ../shared/data/flickr8k/images` prints the table.

Units. A MAC is one multiply-accumulate; 1 MAC = 2 FLOPs. fvcore's "flops" are MACs (it counts one fused
multiply-add as one flop), so every figure here is labelled GMACs or GFLOPs, never a bare "FLOPs".

What is counted: the multiply-accumulates of matrix products, nothing else.
- Linear layers (qkv, attention out-projection, MLP with its own ratio, predictor, projections) and the patch
  embedding convolution: in x out MACs per token (biases are additions: not counted, as fvcore does).
- Attention: QK^T and AV, 2 * T^2 * D MACs per layer for T tokens of width D. fvcore has no handle for
  `aten::scaled_dot_product_attention`, and in eval mode without gradients `nn.MultiheadAttention` takes a fused
  fast path that no counter sees (qkv and out-projections included). That is how published DTP tables came to
  2.95 "GFLOPs" for ViT-B/32's image tower: MLP and patch embedding only, in MACs. The tower costs 4.41 GMACs =
  8.82 GFLOPs (open_clip's docs/model_profile.csv). Masked and causal attention count the full T^2: that is what
  the dense kernels compute (the padded segments of a batch included).
- Pooling into segments and back. The padded reference path (`execution="padded"`) multiplies by a B x N x S
  membership matrix (einsums `bns,bnd->bsd` down and `bns,bsd->bnd` up: N x S x D MACs per image each). The packed
  path, and any batch whose images share one count (topk, uniform boundaries), scatter-adds each patch into its
  segment and gathers it back: O(N x D) elementwise work, counted 0 like the other elementwise ops.
- Not counted (0 MACs, listed in NO_MAC_OPS): LayerNorm, GELU, softmax, sigmoid, residual and positional adds,
  scaling, masked mean pooling, cumsum, and bookkeeping (embedding lookup, argmax, shapes). These are elementwise:
  O(T * D) per layer against O(T * D^2) for the matrix products. For scale, fvcore's own LayerNorm estimate
  (5 FLOPs per element) is 5.0 M for ViT-B/32's image tower, 0.1% of its 4.41 GMACs.

The analytic model reads every size from the model's modules (linear in/out features, attention width, patch
convolution, token counts), so it follows the MLP ratio, predictor width and layer split of any variant; the tests
hold it equal to fvcore's count. fvcore is run with our handles (`mac_handles()`) and every op it sees must have a
handle or be listed in NO_MAC_OPS, otherwise `fvcore_macs` raises: a new op cannot slip through as zero.

Token counts and executions. Images differ in their segment count S, so the image tower's cost is per image and a
function of S. `execution="packed"` (the default of `analytic_macs` and of the towers) is what the packed path
computes: each image at its own S, attention over 1 + S tokens per image, as varlen attention does on a GPU (CPU
length buckets pad each image to its bucket's longest: a little more attention than counted). `"padded"` is the
reference path: every image of a batch at the batch's maximum S, with the membership einsums (`realised`). A
boundary every c patches gives S = ceil(N / c) (the last patch always closes a segment) and no padding either way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch
import torch.nn as nn
from open_clip.transformer import TextTransformer, VisionTransformer

from ..common.extras import optional_import
from ..common.runtime import eval_mode
from ..tower.config import EXECUTIONS
from ..tower.control import dtp_towers, forced_boundaries, trace, use_execution
from ..tower.cost import block_macs, linear_macs_per_token
from ..tower.model import DTPVisionTransformer, token_budget

# ----------------------------------------------------------------------------------------------------------
# Analytic model


def image_tower(model: nn.Module) -> nn.Module:
    """The DTP tower, or open_clip's ViT image tower, of a CLIP model (or the tower itself)."""
    towers = dtp_towers(model)
    if len(towers) == 1:
        return towers[0]
    if isinstance(model, VisionTransformer):
        return model
    if isinstance(getattr(model, "visual", None), VisionTransformer):
        return model.visual
    raise ValueError(f"{type(model).__name__}: the analytic model covers DTP-ViT and open_clip ViT image towers "
                     "(not ResNet, ConvNeXt or other timm trunks)")


def patch_count(tower: nn.Module) -> int:
    """Patches per image of a DTP tower or an open_clip ViT."""
    return tower.num_patches if isinstance(tower, DTPVisionTransformer) else math.prod(tower.grid_size)


def _adapter_head(model: nn.Module, tower: nn.Module) -> nn.Module | None:
    """open_clip's TimmModel head (the projection to the CLIP embedding) around a DTP tower, if any."""
    for m in model.modules():
        if getattr(m, "trunk", None) is tower:
            return m.head
    return None


def _as_count(segments, low: int, high: int, what: str):
    """Float64 tensor for a tensor of counts, float for a number; checked to lie in [low, high]."""
    if isinstance(segments, torch.Tensor):
        values = segments.detach().to("cpu", torch.float64)
        lowest, highest = (values.min().item(), values.max().item()) if values.numel() else (low, high)
    else:
        values = lowest = highest = float(segments)
    if not (low <= lowest and highest <= high):
        raise ValueError(f"{what} must lie in [{low}, {high}], got {lowest:g}..{highest:g}")
    return values


def _image_stages(model: nn.Module, segments=None, patch_dropout: float | None = None,
                  execution: str = "packed") -> dict[str, tuple]:
    """Component -> (linear, attention) MACs per image of the image tower; see `analytic_macs`."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    stages = _tower_stages(model, segments, patch_dropout, execution)
    if not isinstance(segments, torch.Tensor):
        return stages
    zero = torch.zeros(segments.shape, dtype=torch.float64)  # every component a per-image tensor
    return {name: (linear + zero, attention + zero) for name, (linear, attention) in stages.items()}


def _tower_stages(model: nn.Module, segments, patch_dropout: float | None, execution: str) -> dict[str, tuple]:
    tower = image_tower(model)
    if isinstance(tower, VisionTransformer):  # open_clip's plain ViT
        if tower.attn_pool is not None:
            raise ValueError("open_clip ViTs with attentional pooling are not covered by the analytic model")
        num_patches = patch_count(tower)
        if segments is not None:
            _as_count(segments, num_patches, num_patches, "segments of a tower that does not pool")
        kept = max(1, int(num_patches * (1 - patch_dropout))) if patch_dropout else num_patches  # open_clip's rule
        head = tower.proj.numel() if tower.proj is not None else 0
        return {"patch_embed": (tower.conv1.weight.numel() * num_patches, 0),
                "layers": block_macs(tower.transformer.resblocks, 1 + kept),
                "head": (head, 0)}

    num_patches, width = tower.num_patches, tower.embed_dim
    pre_blocks, short_blocks, post_blocks = tower.stages
    head = linear_macs_per_token(tower.head) + linear_macs_per_token(_adapter_head(model, tower) or nn.Identity())
    if not tower.pools:  # compression=1: a plain ViT on the same code path
        if segments is not None:
            _as_count(segments, num_patches, num_patches, "segments of a tower that does not pool (compression=1)")
        kept = max(1, int(num_patches * (1 - patch_dropout))) if patch_dropout else num_patches  # timm's rule
        return {"patch_embed": (tower.patch_embed.proj.weight.numel() * num_patches, 0),
                "pre_layers": block_macs(pre_blocks, 1 + kept), "predictor": (0, 0), "downsample": (0, 0),
                "short_layers": block_macs(short_blocks, 1 + kept), "upsample": (0, 0), "post_layers": (0, 0),
                "head": (head, 0)}
    if patch_dropout:
        raise ValueError("a pooling DTP tower has no patch dropout (it would remove patches before the predictor)")
    if tower.reducer is not None:
        return _reduction_stages(tower, segments, head)
    segments = num_patches / tower.dtp.compression if segments is None else segments
    segments = _as_count(segments, 1, num_patches, "segments per image")
    pooling = num_patches * segments * width if execution == "padded" else 0 * segments  # einsum N x S x D
    return {"patch_embed": (tower.patch_embed.proj.weight.numel() * num_patches, 0),
            "pre_layers": block_macs(pre_blocks, 1 + num_patches),
            "predictor": (linear_macs_per_token(tower.predictor) * num_patches if tower.predictor else 0, 0),
            "downsample": (pooling, 0),
            "short_layers": block_macs(short_blocks, 1 + segments),
            "upsample": (pooling if tower.dtp.upsample else 0, 0),
            "post_layers": block_macs(post_blocks, 1 + num_patches),
            "head": (head, 0)}


def _reduction_stages(tower: DTPVisionTransformer, segments, head: int) -> dict[str, tuple]:
    """A reduction of the field: the shortened layers as its reducer runs them (`short_macs`: dense at CLS + K
    tokens, or ToMe's schedule), and the reducer's own MACs (`reduction_macs()`, ToMe's matching) as the "predictor"
    component; `segments`, if given, must be the budget K = ceil(N / c)."""
    num_patches, budget = tower.num_patches, tower.topk_segments
    if segments is not None:
        _as_count(segments, budget, budget, f"segments of reduction {tower.dtp.reduction!r}")
    pre_blocks, short_blocks, _ = tower.stages
    return {"patch_embed": (tower.patch_embed.proj.weight.numel() * num_patches, 0),
            "pre_layers": block_macs(pre_blocks, 1 + num_patches), "predictor": (tower.reduction_macs(), 0),
            "downsample": (0, 0), "short_layers": tower.reducer.short_macs(short_blocks, budget),
            "upsample": (0, 0), "post_layers": (0, 0), "head": (head, 0)}


def analytic_macs(model: nn.Module, segments: float | torch.Tensor | None = None,
                  patch_dropout: float | None = None, execution: str = "packed") -> dict[str, float | torch.Tensor]:
    """MACs per image of each image-tower component at `segments` segments per image.

    `segments`: a number, or a tensor of per-image counts (then every component is a per-image tensor); None is
    the tower's target N / compression. Components of a DTP tower: patch_embed, pre_layers (1+N tokens),
    predictor, downsample (the membership einsum with `execution="padded"`, else 0), short_layers (1+S), upsample
    (likewise), post_layers (1+N), head
    (projection to the CLIP embedding). An open_clip ViT: patch_embed, layers, head. `patch_dropout` (towers that
    do not pool): training-time FLIP-style dropout, the layers run on 1 + int(N * (1 - p)) tokens.
    """
    return {name: linear + attention for name, (linear, attention)
            in _image_stages(model, segments, patch_dropout, execution).items()}


def attention_macs(model: nn.Module, segments: float | torch.Tensor | None = None,
                   patch_dropout: float | None = None, execution: str = "packed") -> float | torch.Tensor:
    """The QK^T and AV share of `analytic_macs` (the part that published DTP tables left out)."""
    return sum(attention for _, attention in _image_stages(model, segments, patch_dropout, execution).values())


def total(components: dict) -> float | torch.Tensor:
    return sum(components.values())


def text_tower(model: nn.Module) -> tuple[nn.Module, nn.Module | torch.Tensor | None, int]:
    """(transformer, text projection, tokens per text) of an open_clip CLIP's text tower."""
    if isinstance(getattr(model, "text", None), TextTransformer):
        text = model.text
        tokens = text.context_length + (1 if text.cls_emb is not None else 0)  # CoCa appends a class token
        return text.transformer, text.text_projection, tokens
    if isinstance(model, TextTransformer):
        return model.transformer, model.text_projection, model.context_length + (1 if model.cls_emb is not None else 0)
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):  # open_clip.CLIP keeps it inline
        return model.transformer, model.text_projection, model.context_length
    raise ValueError(f"{type(model).__name__}: no open_clip text transformer (HF text towers are not covered)")


def text_macs(model: nn.Module) -> dict[str, int]:
    """MACs per text of the text tower at open_clip's context length: layers, head (projection of one token)."""
    transformer, projection, tokens = text_tower(model)
    if isinstance(projection, nn.Module):
        head = linear_macs_per_token(projection)
    else:
        head = projection.numel() if projection is not None else 0
    return {"layers": sum(block_macs(transformer.resblocks, tokens)), "head": head}


def fixed_segments(num_patches: int, compression: int) -> int:
    """Segments per image with a boundary every `compression` patches: the last patch closes the last segment."""
    return math.ceil(num_patches / compression)


def clip_macs_at(model: nn.Module, segments: float | torch.Tensor | None = None, patch_dropout: float | None = None,
                 execution: str = "packed") -> dict[str, float]:
    """Analytic MACs of one CLIP forward per image-text pair: {"image": ..., "text": ...} at `segments` (a number,
    or per-image counts: then the image figure is their mean)."""
    image = total(analytic_macs(model, segments, patch_dropout, execution))
    image = image.mean() if isinstance(image, torch.Tensor) else image
    return {"image": float(image), "text": float(total(text_macs(model)))}


# ----------------------------------------------------------------------------------------------------------
# fvcore, with attention counted (the `flops` extra, imported at first use: the analytic model above needs none)


def fvcore_nn():
    """fvcore.nn (FlopCountAnalysis) and fvcore.nn.jit_handles, or one error naming the `flops` extra."""
    with warnings.catch_warnings():  # fvcore scripts a helper at import: torch's deprecation of jit.script, not ours
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
        return optional_import("fvcore.nn"), optional_import("fvcore.nn.jit_handles")


def get_shape(value) -> list[int] | None:
    """The sizes of a traced tensor value (fvcore.nn.jit_handles.get_shape)."""
    return value.type().sizes() if value.isCompleteTensor() else None


def _sdpa_macs(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention(q, k, v, ...): QK^T (.. L x E by S x E) and AV (.. L x S by S x Ev)."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def _baddbmm_macs(inputs, outputs) -> int:
    """aten::baddbmm(bias, b1, b2): the batched product b1 @ b2 (nn.MultiheadAttention when it returns weights)."""
    (batch, rows, inner), cols = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return batch * rows * inner * cols


def _einsum_macs(inputs, outputs) -> int:
    """aten::einsum: exact for two operands (product of every index size); fvcore's rule otherwise.

    fvcore handles two equations exactly and sends the rest to numpy's einsum_path, whose printed count has four
    significant digits (the upsampling einsum `bns,bsd->bnd` came out 16 MACs short on a Ti model).
    """
    equation = inputs[0].toIValue().replace(" ", "")
    operands = list(inputs[1].node().inputs())
    if len(operands) != 2 or "..." in equation:
        return fvcore_nn()[1].einsum_flop_jit(inputs, outputs)
    sizes = {}
    for letters, operand in zip(equation.split("->")[0].split(","), operands, strict=True):
        sizes.update(zip(letters, get_shape(operand), strict=True))
    return math.prod(sizes.values())


def mac_handles() -> dict:
    """fvcore's handles for matrix products and convolutions, with attention and an exact einsum added."""
    handles = fvcore_nn()[1]
    return {
        "aten::linear": handles.linear_flop_jit,
        "aten::addmm": handles.addmm_flop_jit,
        "aten::matmul": handles.matmul_flop_jit,
        "aten::mm": handles.matmul_flop_jit,
        "aten::bmm": handles.bmm_flop_jit,
        "aten::baddbmm": _baddbmm_macs,
        "aten::_convolution": handles.conv_flop_jit,
        "aten::einsum": _einsum_macs,
        "aten::scaled_dot_product_attention": _sdpa_macs,
    }

NO_MAC_OPS = (  # seen in these towers and deliberately counted as 0 MACs (see the module docstring)
    # normalisation, activations, softmax: elementwise
    "aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::instance_norm", "aten::gelu", "aten::silu",
    "aten::sigmoid", "aten::softmax", "aten::tanh",
    # residual and positional adds, scaling, masks, the mean of segments, cumsum of boundaries, the training sampler
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::sum", "aten::mean", "aten::cumsum", "aten::log", "aten::log1p", "aten::exp", "aten::neg",
    "aten::rand_like", "aten::randn", "aten::topk", "aten::nan_to_num", "aten::fill_",
    "aten::masked_fill_",  # timm's attention without SDPA (TIMM_FUSED_ATTN=0): the padding mask
    # the packed path and equal counts: scatter-add into segments, gathers, packing (elementwise, O(N x D))
    "aten::index_add", "aten::index_copy", "aten::index", "aten::index_select", "aten::scatter", "aten::lt",
    "aten::lift_fresh", "aten::numel",  # host-built packing indices, constants in the trace
    "aten::pad", "aten::isfinite", "aten::where", "aten::bucketize",  # the static path's device-built indices
    # lookups and bookkeeping
    "aten::embedding", "aten::argmax", "aten::unflatten", "aten::new_ones", "aten::ones_like", "aten::scalar_tensor",
    # the reductions of the field (dtplib.tower.reductions): ranking, selection, masks, clamps
    "aten::sort", "aten::expand_as", "aten::clamp_min", "aten::clamp", "aten::gather", "aten::eq", "aten::ne",
    "aten::ge", "aten::amax", "aten::max", "aten::full", "aten::arange",
    # ToMe (dtplib.tower.tome): the metric's norm, the matching's sorts, the merge's scatter-add
    "aten::linalg_vector_norm", "aten::argsort", "aten::empty_like", "aten::scatter_", "aten::scatter_add",
)


@contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Turn off nn.MultiheadAttention's fused eval-mode fast path, which hides attention from any op counter."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _flop_analysis(module: nn.Module, inputs):
    """fvcore's FlopCountAnalysis with mac_handles() only and NO_MAC_OPS ignored; its counts are MACs."""
    analysis = fvcore_nn()[0].FlopCountAnalysis(module, inputs).clear_op_handles()
    analysis.set_op_handle(**mac_handles()).set_op_handle(**dict.fromkeys(NO_MAC_OPS))
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def fvcore_macs(module: nn.Module, inputs, strict: bool = True) -> int:
    """MACs of `module(*inputs)` for the whole batch, counted by fvcore with attention.

    Runs with the MultiheadAttention fast path off and without gradients, in the module's current mode.
    `strict`: raise if fvcore met an op that has neither a handle nor a place in NO_MAC_OPS.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    analysis = _flop_analysis(module, inputs)
    with mha_fastpath_disabled(), torch.no_grad():
        macs = analysis.total()
    unhandled = analysis.unsupported_ops()
    if strict and unhandled:
        raise RuntimeError(f"fvcore met ops with no MAC handle: {dict(unhandled)}; give them a handle in "
                           "dtplib.measure.flops.mac_handles() or, if they do no matrix products, list them in "
                           "NO_MAC_OPS")
    return int(macs)


class _Method(nn.Module):
    """Calls one method of a model, so that fvcore can trace encode_image or encode_text alone."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


def image_size(model: nn.Module) -> tuple[int, int]:
    """Input size (height, width) of a CLIP's image tower."""
    size = getattr(getattr(model, "visual", model), "image_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no visual.image_size; pass images")
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def image_fvcore_macs(model: nn.Module, images: torch.Tensor | None = None) -> float:
    """fvcore MACs per image of the image tower in eval mode, on `images` (default: one random image).

    A DTP tower's count depends on the content, and in a batch on its largest segment count (padding); for a
    fixed ratio wrap the call in `forced_boundaries(model, c)`.
    """
    if images is None:
        images = torch.randn(1, 3, *image_size(model), generator=torch.Generator().manual_seed(0))
    with eval_mode(model):
        return fvcore_macs(_Method(model, "encode_image"), images) / len(images)


def text_fvcore_macs(model: nn.Module) -> float:
    """fvcore MACs per text of the text tower in eval mode, at open_clip's context length."""
    tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    with eval_mode(model):
        return float(fvcore_macs(_Method(model, "encode_text"), tokens))


def clip_macs(model: nn.Module, images: torch.Tensor | None = None) -> dict[str, float]:
    """fvcore MACs of a CLIP: {"image": per image (see `image_fvcore_macs`), "text": per text}."""
    return {"image": image_fvcore_macs(model, images), "text": text_fvcore_macs(model)}


# ----------------------------------------------------------------------------------------------------------
# Realised boundaries over real images


def realised_segments(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Segments per image (B, long) that the model chooses in eval mode, forwarding `batch_size` images at a time."""
    batch_size = batch_size or len(images)
    counts = []
    with eval_mode(model), trace(model) as t:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            model.encode_image(batch) if hasattr(model, "encode_image") else model(batch)
            counts.append(t.tokens.cpu())
    return torch.cat(counts)


def _padded_segments(segments: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Segments that the padded implementation runs per image: the maximum of each batch of `batch_size`."""
    batch_size = batch_size or len(segments)
    return torch.cat([chunk.max().expand(len(chunk)) for chunk in segments.split(batch_size)])


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """Mean, std (over these images, no Bessel correction), min and max."""
    values = values.double()
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_std": values.std(correction=0).item(),
            f"{prefix}_min": values.min().item(), f"{prefix}_max": values.max().item()}


def realised(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> dict[str, float]:
    """Image-tower GMACs per image at the boundaries the model realises on `images` (eval mode).

    Packed: each image at its own segment count S (what a variable-length implementation pays): mean, std, min,
    max. Padded: every image at the largest S of its batch of `batch_size` (default: all images in one batch),
    what the padded reference implementation pays: `padded_gmacs_mean`. Also segments and compression N / S per
    image, and `realised_compression` = N / mean(S), the token budget.
    """
    if not isinstance(image_tower(model), DTPVisionTransformer):
        raise ValueError("realised boundaries need a DTP-ViT tower; an open_clip ViT always runs every patch")
    return _realised_stats(model, realised_segments(model, images, batch_size), batch_size)


def _realised_stats(model: nn.Module, segments: torch.Tensor, batch_size: int | None = None) -> dict[str, float]:
    """`realised` from the segment counts per image (B) that `realised_segments` returned."""
    num_patches = patch_count(image_tower(model))
    packed = total(analytic_macs(model, segments))  # B
    padded = total(analytic_macs(model, _padded_segments(segments, batch_size), execution="padded"))  # B
    return {"images": len(segments), "batch_size": batch_size or len(segments), **_stats("gmacs", packed / 1e9),
            "padded_gmacs_mean": padded.mean().item() / 1e9, **_stats("segments", segments),
            **_stats("compression", num_patches / segments.double()),
            "realised_compression": token_budget(num_patches, segments)}


# ----------------------------------------------------------------------------------------------------------
# Report and command line


def report(model: nn.Module, name: str, compressions: Sequence[int] = (1, 2, 4, 10),
           images: torch.Tensor | None = None, batch_size: int | None = None,
           executions: Sequence[str] = EXECUTIONS) -> pd.DataFrame:
    """One row per setting, GMACs per image (text: per text); each image-tower component in its own column, and the
    execution that the figure is for.

    Settings: "fixed Cx" for a pooling tower (fvcore at `forced_boundaries(model, C)` on one random image; every
    image has the same count, so packed and padded compute the same) or "plain"; with `images`, for a tower that
    pools, per execution in `executions`: "realised, packed" (mean over images at their own S, with the spread) and
    "realised, padded" (fvcore on the same batches run by the padded path); "text tower".
    """
    tower = image_tower(model)
    pools = isinstance(tower, DTPVisionTransformer) and tower.pools
    num_patches = patch_count(tower)
    rows = []

    def add(setting: str, counts, fvcore: float | None, tower_name: str = "image", execution: str = "packed",
            **extra):
        if tower_name == "text":
            components, attention = text_macs(model), float("nan")
        else:
            components = {k: float(v.mean()) if isinstance(v, torch.Tensor) else float(v)
                          for k, v in analytic_macs(model, counts, execution=execution).items()}
            attention = float(torch.as_tensor(attention_macs(model, counts, execution=execution),
                                              dtype=torch.float64).mean())
        analytic = float(total(components))
        rows.append({"model": name, "tower": tower_name, "setting": setting,
                     "execution": execution if tower_name == "image" else "", **extra,
                     **{f"{k} GMACs": v / 1e9 for k, v in components.items()}, "attention GMACs": attention / 1e9,
                     "analytic GMACs": analytic / 1e9, "analytic GFLOPs": 2 * analytic / 1e9,
                     "fvcore GMACs": fvcore / 1e9 if fvcore is not None else float("nan"),
                     "fvcore GFLOPs": 2 * fvcore / 1e9 if fvcore is not None else float("nan")})

    if pools and tower.reducer is not None:  # one budget K, every image (ToMe: the MACs of K, by its schedule)
        tokens = tower.topk_segments
        add(f"{tower.dtp.reduction} {tower.dtp.compression:g}x", None, image_fvcore_macs(model), segments=tokens,
            compression=num_patches / tokens)
    elif pools:
        for c in compressions:
            segments = fixed_segments(num_patches, c)
            with forced_boundaries(model, c):
                measured = image_fvcore_macs(model)
            add(f"fixed {c}x", segments, measured, segments=segments, compression=num_patches / segments)
    else:
        add("plain", None, image_fvcore_macs(model), segments=num_patches, compression=1.0)
    if images is not None and pools:
        segments = realised_segments(model, images, batch_size)  # B
        stats = _realised_stats(model, segments, batch_size)
        if "packed" in executions:
            add("realised, packed", segments, None, segments=stats["segments_mean"],
                compression=stats["realised_compression"], **stats)
        if "padded" in executions:
            padded = _padded_segments(segments, batch_size)
            with use_execution(model, "padded"):
                measured = sum(image_fvcore_macs(model, chunk) * len(chunk)
                               for chunk in images.split(stats["batch_size"]))
            add("realised, padded", padded, measured / len(images), execution="padded",
                segments=padded.double().mean().item(), compression=token_budget(num_patches, padded))
    add("text tower", None, text_fvcore_macs(model), tower_name="text")
    return pd.DataFrame(rows)


def format_report(frame: pd.DataFrame) -> str:
    """The report as text: image-tower components by setting, totals, realised-boundary spread, text tower."""
    image = frame[frame["tower"] == "image"].set_index("setting")
    components = [c for c in image.columns if c.endswith(" GMACs")
                  and c not in ("attention GMACs", "analytic GMACs", "fvcore GMACs")]
    table = image[components].T.rename(index=lambda c: c.removesuffix(" GMACs")).dropna(how="all")  # image rows
    for label, column in (("total, analytic (GMACs)", "analytic GMACs"), ("total, fvcore (GMACs)", "fvcore GMACs"),
                          ("total, analytic (GFLOPs)", "analytic GFLOPs"),
                          ("of which attention QK^T, AV (GMACs)", "attention GMACs"),
                          ("segments per image", "segments"), ("compression N / S", "compression")):
        table.loc[label] = image[column]
    lines = [f"{frame['model'].iloc[0]}: image tower, GMACs per image (1 MAC = 2 FLOPs; attention counted)",
             table.to_string(float_format=lambda v: f"{v:.5g}", na_rep="-"), ""]
    if "realised, packed" in image.index:
        r = image.loc["realised, packed"]
        lines += [f"realised boundaries, {int(r['images'])} images, eval mode:",
                  f"  packed, each image at its own S: GMACs mean {r['gmacs_mean']:.5g}, std {r['gmacs_std']:.5g}, "
                  f"min {r['gmacs_min']:.5g}, max {r['gmacs_max']:.5g}",
                  f"  padded, batches of {int(r['batch_size'])} at their largest S: GMACs {r['padded_gmacs_mean']:.5g}",
                  f"  compression N / S per image: mean {r['compression_mean']:.2f}, std {r['compression_std']:.2f}, "
                  f"min {r['compression_min']:.2f}, max {r['compression_max']:.2f}; "
                  f"N / mean(S) = {r['realised_compression']:.2f}", ""]
    text = frame[frame["tower"] == "text"].iloc[0]
    lines.append(f"text tower, per text: {text['analytic GMACs']:.5g} GMACs analytic, {text['fvcore GMACs']:.5g} "
                 f"GMACs fvcore ({text['analytic GFLOPs']:.5g} GFLOPs)")
    return "\n".join(lines)
