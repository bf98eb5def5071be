"""timm's intermediate-feature API on the merged path (`forward_intermediates`, `prune_intermediate_layers`), as a
mixin of `DTPVisionTransformer`, and the `Tap` a forward fills for it.

A forward with a `Tap` records the outputs of the blocks asked for; pre- and post-layers are full length, shortened
layers hold segment (or reduced) tokens, which `place_intermediate` puts back on the patch grid: each patch gets
its segment's token (zero where a reduction dropped it; ToMe: the token it is in after that layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices


@dataclass
class Tap:
    """What `forward_intermediates` asks of a forward: the outputs of blocks `take` (indices into `blocks`), no block
    run after `last`, and with `stop_early` no stage after the one that holds it. The forward fills the rest."""

    take: set[int]
    last: int
    stop_early: bool = False
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> B x T x D
    segment_of: torch.Tensor | None = None  # B x N: each patch's segment (reading order), when the tower pools
    keep: torch.Tensor | None = None  # B x (1+S) validity of the shortened layers' tokens; None: all real
    segment_of_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # ToMe: block index -> B x N

    def record(self, index: int, tokens: torch.Tensor) -> None:
        if index in self.take:
            self.outputs[index] = tokens

    def stops_before(self, index: int) -> bool:
        """Whether the forward ends before block `index` (stop_early and the last wanted block is earlier)."""
        return self.stop_early and self.last < index


class TimmIntermediates:
    """timm's `forward_intermediates` and `prune_intermediate_layers` for `DTPVisionTransformer` (which provides
    `forward_tokens`, `final_norm`, `norm`, `pools`, `dtp`, `grid` and `reading_order`)."""

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """timm's `forward_intermediates` along the merged path: the outputs of the blocks `indices` (the last n if
        an int, all if None, negative from the end) and the final tokens.

        Each intermediate is its block's tokens without the CLS token (`return_prefix_tokens`: with it, as a pair):
        a pre- or post-layer's at full length; a shortened layer's as segment tokens. With output_fmt "NLC":
        B x N x D at grid positions for full-length layers, B x S x D for shortened ones (segments in reading order,
        padded to the batch's largest count, or to N in the static execution; the padding zero). With "NCHW":
        B x D x H x W on the patch grid, where each patch of a shortened layer gets its segment's token. `norm`
        applies the final norm to each; `stop_early` runs no block after the last one asked for (and the final
        output is then that block's). The final output is `forward_features`' tokens (`forward_head` of it is
        `forward`'s output; `last_keep` marks its real tokens). attn_mask and is_causal do not apply (the tower
        masks its own padding). Returns (final, intermediates), the intermediates alone (`intermediates_only`), or
        timm's dict (`output_dict`)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("DTP-ViT takes no attn_mask or is_causal: it masks the padding of its segments itself")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        tap = Tap(set(take), max_index if stop_early else len(self.blocks) - 1, stop_early)
        tokens, _ = self.forward_tokens(x, tap)
        placed = [self.place_intermediate(tap, index, norm, output_fmt == "NCHW") for index in take]
        intermediates, prefix_tokens = [y for y, _ in placed], [cls for _, cls in placed]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.final_norm(tokens)
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        return intermediates if intermediates_only else (self.final_norm(tokens), intermediates)

    def place_intermediate(self, tap: Tap, index: int, norm: bool,
                           spatial: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index`'s recorded output as (tokens, CLS): B x N x D or B x S x D (spatial: B x D x H x W, each
        patch with its segment's token), and B x 1 x D (see `forward_intermediates`)."""
        y = tap.outputs[index]  # B x T x D
        y = self.norm(y) if norm else y
        cls_token, y = y[:, :1], y[:, 1:]  # B x 1 x D, B x (T-1) x D
        shortened = self.pools and self.dtp.pre_layers <= index < self.dtp.pre_layers + self.dtp.short_layers
        if shortened:
            if tap.keep is not None:
                y = y * tap.keep[:, 1:, None].to(y.dtype)  # the padding zero
            if not spatial:
                return y, cls_token
            y = F.pad(y, (0, 0, 0, 1))  # B x T x D: a zero row for patches a reduction dropped
            segment_of = tap.segment_of_layer.get(index, tap.segment_of)  # B x N (ToMe: per layer)
            y = y.gather(1, segment_of[..., None].expand(-1, -1, y.shape[-1]))  # B x N x D, reading order
            order = self.reading_order(y.device)
            y = y if order is None else y.index_select(1, order[1])  # B x N x D, grid positions
        if spatial:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[-1], *self.grid)  # B x D x H x W
        return y, cls_token

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: drop the blocks after the last of `indices` (optionally the final norm, and the head and pool:
        `forward` then returns `forward_features`' tokens). The layer split keeps its boundaries: blocks cut from
        the shortened or post-layers shorten those stages, and the merging still runs after the pre-layers."""
        return super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
