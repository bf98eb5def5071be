"""Packed (variable-length) execution of the shortened layers: nothing is computed for padding.

Images of a batch keep different numbers of segments. The padded reference path (`DTPConfig.execution="padded"`)
pads every image to the batch's largest count and masks the padding, so a batch pays for its largest image. The
packed paths concatenate the real tokens of the batch, CLS + segments of image 0, then of image 1, ..., into one
sequence:

- token-wise work (norms, qkv, attention out-projection, MLP, layer scale) runs on the packed rows;
- attention is the only operation that must keep images apart;
- downsampling is a scatter-add of each patch into its segment's row and upsampling a gather, both weighted by the
  straight-through segment ids, so the contrastive loss reaches the boundary predictor exactly as through the
  padded path's membership matrix (`model.membership`): the same values and the same gradients.

Two packed executions. Read top to bottom: the host-planned one, then the static one.

`execution="packed"` (`Packing`): the sequence is exactly T = sum over images of 1 + segments rows. The counts are
read to the host once per forward (`Packing.plan`) and every index is built there with numpy and moved in one
transfer. Attention: on CUDA in fp16/bf16 one call of varlen flash attention over the cumulative lengths; elsewhere
the images are sorted by length and cut into `CPU_BUCKETS` length buckets, each padded to its own longest and run
as one masked SDPA call (buckets chosen by dynamic programming to minimise sum of images x length^2). The host read
splits a compiled forward into several graphs and makes CUDA graphs impossible.

`execution="static"` (`StaticPacking`, the default): the same layout in a buffer of T_cap = B + the segment
capacity rows, fixed by the batch's shape (`DTPVisionTransformer.segment_capacity`: in training at most
`capacity` x B * ceil(N/c) segments, a cap the tower enforces on the device before packing; in eval B * N). The
cumulative lengths, the row of each segment and the image of each row are device tensors (`cumsum`, `bucketize`,
`index_add`, `index_copy`); the rows past the batch's last token (the tail) start at zero, stay finite, and are
read by nothing, so they add nothing to any gradient (a weight gradient X^T dY sees them with dY = 0). No value is
read to the host: a compiled forward is one graph for every batch of one shape, as CUDA graphs need. Attention:
- CUDA fp16/bf16: varlen flash attention with cumulative lengths as device data and the static maximum L = N + 1;
  the tail is covered by extra sequences of at most L rows (varlen leaves rows outside every sequence unwritten);
- elsewhere: each image's window of L rows from its CLS token, keys masked to its own tokens, one SDPA call.
Measured on the development CPU (AMD EPYC, 1 of 2 cores, fp32, torch 2.14.1), attention alone, forward + backward,
Ti short-layer shapes (width 192, 3 heads, batch 64, segments per image with a learned-like spread: mean 16,
std 5.5; T = 1122 real rows in a static buffer of 1344 at capacity 1.25):

    candidate                                               ms
    host-planned length buckets (execution="packed")        10.2
    padded to the batch maximum, masked                      23.9
    static: one window of N + 1 per image (kept)             35.7
    static: block-diagonal mask over the whole buffer        90.9
    FlexAttention with a document mask                      no CPU backward in torch 2.14
    nested jagged tensors + SDPA                            reads the lengths to the host

A static shape must hold the worst case, so on a CPU the window pays for images up to N + 1 tokens long; the
token-wise layers also run on the buffer's slack. On the whole Ti tower (eager, batch 64, 2 threads) the static
path took 1.18x the host-planned one's time. What it buys is compilation: one graph, no recompile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import Block

CPU_BUCKETS = 4  # length buckets for attention where varlen flash attention is not used (see the docstring)


def varlen_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's varlen flash attention: CUDA, fp16/bf16 only (flash kernels have no fp32)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def bucket_splits(lengths: np.ndarray, buckets: int) -> list[int]:
    """Split ascending `lengths` into at most `buckets` runs minimising sum over runs of images x longest^2.

    Returns the end position of each run. Dynamic programming over the distinct lengths (at most N + 1 of them),
    so its cost does not grow with the batch; a run is added only where it lowers the cost.
    """
    values, counts = np.unique(lengths, return_counts=True)  # ascending distinct lengths
    images = np.concatenate([[0], np.cumsum(counts)])  # images[j]: images with one of the first j lengths
    squares = values.astype(np.float64) ** 2
    ends = np.arange(1, len(values) + 1)  # a run covering lengths [i, j) costs (images[j] - images[i]) x values[j-1]^2
    best = images[1:] * squares  # best[j-1]: cost of covering the first j lengths
    starts = np.arange(len(values))[:, None]
    back = []
    for _ in range(1, min(buckets, len(values))):
        previous = np.concatenate([[np.inf], best[:-1]])[:, None]  # cost of covering [0, i), i >= 1
        cost = np.where(starts < ends[None], previous + (images[ends][None] - images[starts]) * squares[None], np.inf)
        start = cost.argmin(0)
        lowest = cost[start, ends - 1]
        back.append(np.where(lowest < best, start, -1))
        best = np.minimum(lowest, best)
    splits, end = [], len(values)
    for level in reversed(back):  # the last run of the cheapest cover, then the run before it, ...
        if level[end - 1] > 0:
            splits.append(int(images[end]))
            end = int(level[end - 1])
    splits.append(int(images[end]))
    return sorted(splits)


@dataclass
class Bucket:
    gather: torch.Tensor  # n x L, packed token index of each slot (T: a zero row, padding)
    mask: torch.Tensor  # n x 1 x 1 x L, the keys that are real
    padded: bool  # whether any slot is padding (else eager attention runs without a mask)


@dataclass
class Packing:
    """Where each image's tokens lie in the packed T x D sequence, and how attention keeps images apart."""

    lengths: list[int]  # 1 + segments per image (host)
    cu_seqlens: torch.Tensor  # B+1, int32, cumulative lengths
    max_length: int
    starts: torch.Tensor  # B, long: packed index of each image's CLS token
    segment_rows: torch.Tensor  # S_total, long: packed index of each segment (image-major)
    segment_offsets: torch.Tensor  # B, long: index of each image's first segment among all segments
    image_of_token: torch.Tensor  # T, long
    padded_gather: torch.Tensor  # B x max_length: packed index per padded slot (T: padding)
    padded_slots: torch.Tensor  # T, long: flat slot of each packed token in B x max_length, for `unpack`
    buckets: list[Bucket]  # length buckets for attention when varlen is not used
    bucket_inverse: torch.Tensor  # T, long: row of each packed token in the concatenated bucket outputs

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def num_images(self) -> int:
        return len(self.lengths)

    def segment_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The segment rows of packed T x D tokens, S_total x D, in the order pack_tokens' segment index counts."""
        return tokens.index_select(0, self.segment_rows)

    def unpack(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unpack(tokens, self)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Self-attention within each image of packed T x H x hd queries, keys and values; returns T x H x hd."""
        if dropout_p == 0 and varlen_attention_available(q.device, q.dtype):
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), self.cu_seqlens, self.cu_seqlens,
                               self.max_length, self.max_length)
        qkv = torch.stack([q, k, v], dim=1)  # T x 3 x H x hd
        qkv = torch.cat([qkv, qkv.new_zeros(1, *qkv.shape[1:])])  # T+1: the last row pads
        outputs = []
        for bucket in self.buckets:
            gathered = qkv.index_select(0, bucket.gather.flatten()).view(*bucket.gather.shape, *qkv.shape[1:])
            q_b, k_b, v_b = gathered.permute(2, 0, 3, 1, 4).unbind(0)  # n x H x L x hd each
            mask = bucket.mask if torch.compiler.is_compiling() or bucket.padded else None  # compiled: one graph
            out = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=mask, dropout_p=dropout_p)
            outputs.append(out.transpose(1, 2).flatten(0, 1))  # n*L x H x hd
        return torch.cat(outputs).index_select(0, self.bucket_inverse)  # T x H x hd

    @staticmethod
    @torch.compiler.disable  # host bookkeeping: traced, its numpy would specialise on the counts of every batch
    def plan(segments: list[int], device: torch.device, buckets: int = CPU_BUCKETS) -> Packing:
        """All indices for images with `segments` segments each (host ints), built on the host, one transfer."""
        lengths = np.asarray(segments, dtype=np.int64) + 1  # CLS + segments
        count, total = len(lengths), int(lengths.sum())
        cu = np.concatenate([[0], np.cumsum(lengths)])
        starts = cu[:-1]
        is_segment = np.ones(total, dtype=bool)
        is_segment[starts] = False
        segment_rows = np.flatnonzero(is_segment)
        segment_offsets = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
        image_of_token = np.repeat(np.arange(count), lengths)
        max_length = int(lengths.max())
        slots = np.arange(max_length)
        padded_gather = np.where(slots[None] < lengths[:, None], starts[:, None] + slots[None], total)  # B x L
        padded_slots = np.flatnonzero(padded_gather < total)  # T, in packed order (image-major, then position)

        order = np.argsort(lengths, kind="stable")
        gathers, inverse, row, first = [], np.empty(total, dtype=np.int64), 0, 0
        for end in bucket_splits(lengths[order], buckets):
            members = order[first:end]
            width = int(lengths[members].max())
            gather = padded_gather[members, :width]  # n x L
            real = gather < total
            inverse[gather[real]] = row + np.flatnonzero(real)
            gathers.append(gather)
            row, first = row + gather.size, end

        host = [cu, starts, segment_rows, segment_offsets, image_of_token, padded_gather, padded_slots, inverse,
                *gathers]
        staged = torch.from_numpy(np.concatenate([a.ravel() for a in host]))
        if device.type == "cuda":  # pinned: the copy is asynchronous, not a second synchronisation
            staged = staged.pin_memory()
        moved = staged.to(device, non_blocking=True)
        cu_t, starts_t, rows_t, offsets_t, image_t, padded_t, slots_t, inverse_t, *gathers_t = moved.split(
            [a.size for a in host])
        buckets_t = []
        for gather, host_gather in zip(gathers_t, gathers, strict=True):
            gather = gather.view(host_gather.shape)
            buckets_t.append(Bucket(gather, (gather < total)[:, None, None, :], not (host_gather < total).all()))
        return Packing(lengths=lengths.tolist(), cu_seqlens=cu_t.to(torch.int32), max_length=max_length,
                       starts=starts_t, segment_rows=rows_t, segment_offsets=offsets_t, image_of_token=image_t,
                       padded_gather=padded_t.view(count, max_length), padded_slots=slots_t, buckets=buckets_t,
                       bucket_inverse=inverse_t)


def segment_ids(boundaries: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum: a boundary closes its segment, the next patch opens a new one. B x N."""
    return boundaries.cumsum(-1) - boundaries


def segment_index(boundaries: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each patch's segment among all segments of the batch (B x N, long; image b's first segment is row
    offsets[b]) and the straight-through weight of each patch (B x N: value 1, d/d(segment id) = 1, Nawrot's
    1 - (s - id) at s = id), through which the contrastive loss reaches the boundary predictor."""
    ids = segment_ids(boundaries)  # B x N, float, exact integers
    hard_ids = segment_ids(boundaries.detach().nan_to_num(1.0)).long()  # NaN weights: a NaN loss, no bad index
    return offsets[:, None] + hard_ids, 1 + ids - ids.detach()


def segment_means(patches: torch.Tensor, index: torch.Tensor, through_ids: torch.Tensor,
                  total: int) -> torch.Tensor:
    """Mean of the patches (B x N x D) of each of `total` segments: a weighted scatter-add, total x D.

    The same values and gradients as the padded path's membership einsum (`model.downsample`): the sums and the
    counts both carry the straight-through weights."""
    weights = through_ids.flatten().to(patches.dtype)  # B*N
    flat_index = index.flatten()
    weighted = patches.flatten(0, 1) * weights[:, None]  # B*N x D
    sums = patches.new_zeros(total, patches.shape[-1]).index_add(0, flat_index, weighted)
    counts = weights.new_zeros(total).index_add(0, flat_index, weights)  # exactly the patch counts
    return sums / counts.clamp(min=1)[:, None]


def gather_segments(segments: torch.Tensor, index: torch.Tensor, through_ids: torch.Tensor) -> torch.Tensor:
    """Each patch gets its segment's token (segments: rows x D), weighted by the straight-through ids: B x N x D.
    The same values and gradients as the padded path's `model.upsample`."""
    gathered = segments.index_select(0, index.flatten()).view(*index.shape, -1)  # B x N x D
    return gathered * through_ids.unsqueeze(-1).to(segments.dtype)


def pack_tokens(cls_token: torch.Tensor, patches: torch.Tensor, boundaries: torch.Tensor,
                packing: Packing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLS + segment means of every image, packed: T x D; and `segment_index`'s index and weights (B x N)."""
    index, through_ids = segment_index(boundaries, packing.segment_offsets)
    segments = segment_means(patches, index, through_ids, packing.segment_rows.numel())  # S_total x D
    tokens = cls_token.new_zeros(packing.num_tokens, cls_token.shape[-1])
    tokens = tokens.index_copy(0, packing.starts, cls_token[:, 0]).index_copy(0, packing.segment_rows, segments)
    return tokens, index, through_ids


def unpack(tokens: torch.Tensor, packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed T x D back to B x max_length x D (padding zero) with its B x max_length validity mask.

    Each real token is copied into its own slot (`index_copy`; its backward is a gather). A gather from a zero
    row for the padding would be slower to differentiate: on CUDA the backward of indexing with repeated indices
    (every padded slot reads the same row) is a sort-based accumulation, measured at a third of a B/16 step."""
    count, length = packing.padded_gather.shape
    padded = tokens.new_zeros(count * length, tokens.shape[-1]).index_copy(0, packing.padded_slots, tokens)
    return padded.view(count, length, -1), packing.padded_gather < tokens.shape[0]


def _drop_path(module: nn.Module, x: torch.Tensor, packing: Packing | StaticPacking) -> torch.Tensor:
    """timm's per-sample stochastic depth on packed tokens: one draw per image, shared by its tokens."""
    if not isinstance(module, DropPath) or module.drop_prob == 0 or not module.training:
        return x
    keep = 1 - module.drop_prob
    kept = x.new_empty(packing.num_images).bernoulli_(keep)  # B
    if module.scale_by_keep:
        kept = kept / keep
    return x * kept.index_select(0, packing.image_of_token)[:, None]


def check_block(block: nn.Module) -> None:
    """The packed path re-implements timm's `Block.forward`; other block types would silently differ."""
    if type(block) is not Block:
        raise ValueError(f"packed execution supports timm's vision_transformer.Block, got {type(block).__name__}; "
                         "use execution='padded'")


def block_forward(block: Block, x: torch.Tensor, packing: Packing | StaticPacking) -> torch.Tensor:
    """timm's `Block.forward` (pre-norm attention and MLP with layer scale and drop path) on packed T x D tokens."""
    attn = block.attn
    h = block.norm1(x)  # T x D
    gate = attn.gate(h).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(h).view(-1, 3, attn.num_heads, attn.head_dim).unbind(1)  # T x H x hd each
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = packing.attend(q, k, v, attn.attn_drop.p if attn.training else 0.0).flatten(1)  # T x H*hd
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + _drop_path(block.drop_path1, block.ls1(out), packing)
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), packing)


# ----------------------------------------------------------------------------------------------------------
# Static capacity: the same packed layout in a buffer of fixed size, every index a device tensor


@dataclass
class StaticPacking:
    """The packed layout of `Packing` in a buffer of `rows` rows fixed by the batch's shape, never by its content.

    Image b's CLS token is row starts[b], its segments the rows after it; rows from the batch's total on are the
    tail, zero on entry. Every field is computed on the device from the per-image lengths (`cumsum`,
    `bucketize`): nothing is read to the host, so a compiled forward is one graph for every batch of one shape.
    """

    rows: int  # T_cap: B + the segment capacity (static)
    max_length: int  # L = N + 1: the longest an image can be (static)
    lengths: torch.Tensor  # B, long: 1 + segments per image
    cu_seqlens: torch.Tensor  # B+1, int32: cumulative lengths
    covering_seqlens: torch.Tensor  # B+1+E, int32: cu_seqlens, then the tail cut into E pieces of at most L rows
    starts: torch.Tensor  # B, long: row of each image's CLS token
    image_of_token: torch.Tensor  # T_cap, long: image of each row (the tail: the last image)
    window: torch.Tensor  # B x L, long: rows starts[b] .. starts[b] + L - 1 (clamped), for windowed attention
    key_mask: torch.Tensor  # B x 1 x 1 x L, bool: the window slots that are the image's own tokens
    window_slot: torch.Tensor  # T_cap, long: flat slot in B x L of each row (the tail: a real slot, never read)
    unpack_slot: torch.Tensor  # T_cap, long: flat slot in B x L of each row; the tail: B*L, a slot dropped after

    @property
    def num_images(self) -> int:
        return self.lengths.shape[0]

    @staticmethod
    def plan(lengths: torch.Tensor, rows: int, max_length: int) -> StaticPacking:
        """The layout of images with `lengths` (B, long, on the device; each >= 2, summing to at most `rows`)."""
        count, device = lengths.shape[0], lengths.device
        cu = F.pad(lengths.cumsum(0), (1, 0))  # B+1
        starts = cu[:-1]
        positions = torch.arange(rows, device=device)  # T_cap
        image = torch.bucketize(positions, cu[1:], right=True)  # T_cap: cu[b] <= t < cu[b+1] -> b; the tail -> B
        valid = image < count
        image = image.clamp(max=count - 1)
        slot = image * max_length + (positions - starts.index_select(0, image)).clamp(max=max_length - 1)  # T_cap
        span = torch.arange(max_length, device=device)  # L
        pieces = -(-max(rows - 2 * count, 0) // max_length)  # E: the tail is at most T_cap - 2B rows (S >= 1 each)
        tail = (cu[-1] + torch.arange(1, pieces + 1, device=device) * max_length).clamp(max=rows)  # E
        return StaticPacking(
            rows=rows, max_length=max_length, lengths=lengths, cu_seqlens=cu.to(torch.int32),
            covering_seqlens=torch.cat([cu, tail]).to(torch.int32), starts=starts, image_of_token=image,
            window=(starts[:, None] + span).clamp(max=rows - 1),  # B x L
            key_mask=(span[None] < lengths[:, None])[:, None, None, :],  # B x 1 x 1 x L
            window_slot=slot, unpack_slot=torch.where(valid, slot, count * max_length))

    def segment_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows pack_static's segment index counts: the whole buffer (its index names buffer rows)."""
        return tokens

    def unpack(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unpack_static(tokens, self)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Self-attention within each image of T_cap x H x hd queries, keys and values; returns T_cap x H x hd.

        CUDA fp16/bf16: varlen flash attention over `covering_seqlens` with the static maximum L, so the tail rows
        attend among themselves and come out finite (varlen leaves rows outside every sequence unwritten).
        Elsewhere: each image's window of L rows from its CLS token, keys masked to its own tokens (one SDPA call,
        B x H x L x L); a row takes its output from its own image's window."""
        if dropout_p == 0 and varlen_attention_available(q.device, q.dtype):
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), self.covering_seqlens,
                               self.covering_seqlens, self.max_length, self.max_length)
        qkv = torch.stack([q, k, v], dim=1)  # T_cap x 3 x H x hd
        gathered = qkv.index_select(0, self.window.flatten()).view(*self.window.shape, *qkv.shape[1:])
        q_w, k_w, v_w = gathered.permute(2, 0, 3, 1, 4).unbind(0)  # B x H x L x hd each
        out = F.scaled_dot_product_attention(q_w, k_w, v_w, attn_mask=self.key_mask, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(0, 1).index_select(0, self.window_slot)  # T_cap x H x hd


def pack_static(cls_token: torch.Tensor, patches: torch.Tensor, boundaries: torch.Tensor,
                packing: StaticPacking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLS + segment means of every image in the T_cap x D buffer (the tail zero); and `segment_index`'s buffer
    row of each patch's segment and straight-through weights (B x N)."""
    index, through_ids = segment_index(boundaries, packing.starts + 1)  # B x N: segment s of image b at row start+1+s
    tokens = segment_means(patches, index, through_ids, packing.rows)  # T_cap x D, CLS rows and the tail zero
    return tokens.index_copy(0, packing.starts, cls_token[:, 0]), index, through_ids


def unpack_static(tokens: torch.Tensor, packing: StaticPacking) -> tuple[torch.Tensor, torch.Tensor]:
    """The T_cap x D buffer as B x L x D (padding zero; L = N + 1, static) with its B x L validity mask."""
    count, length = packing.window.shape
    padded = tokens.new_zeros(count * length + 1, tokens.shape[-1]).index_copy(0, packing.unpack_slot, tokens)
    return padded[:-1].view(count, length, -1), packing.key_mask.view(count, length)
