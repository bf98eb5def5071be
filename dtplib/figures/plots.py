"""Figures for the notebooks and results: drawing only, saved one way (`save_figure`).

Every function takes data frames, arrays or a trace and returns a matplotlib Figure or a H x W x 3 uint8 picture;
none shows or saves it, none builds a model or computes a table (those are `dtplib.measure.tables`). Save a figure
or a picture with `save_figure(figure, out / "name.png")`, and nothing else.

Read top to bottom:
0. Style and saving: every figure function draws under `figure_style()` (seaborn "ticks" at "paper" scale, sized
   for a paper's column or page width), one colour per kind of arm (`arm_family`, FAMILY_COLOURS); `save_figure`:
   a PNG at 200 dpi, atomically (a PDF beside it with `pdf=True`); pictures at exact pixels (PIL).
1. Data (01 notebook): `show_samples`, `caption_length_histogram`.
2. Pictures as uint8 arrays (pure functions, tested pixel by pixel): `input_normalization`, `denormalize`,
   `upscale`, `segment_overlay`, `probability_heatmap`, `overlays`.
3. Boundary figures (04 notebook, `python -m dtplib.viz overlay`): `boundary_figure` (photo | segments |
   P(boundary)), `token_grid` (overlays labelled with the tokens kept), `tokens_histogram`, `methods_figure` (the
   same photos grouped by each method: DTP and the field's reductions, `python -m dtplib.viz methods`).
4. Training runs (03 notebook), read back from a run folder's CSVs: `training_curves`.
Figures that compare models (speed-up, accuracy against cost, the 05 and 06 notebooks) are `dtplib.figures.compare`,
in this style. Intervals are clipped to what their metric can take (`interval_limits`); accuracy figures mark
chance (`tables.chance_level`).

Segments are runs of patches in raster order, so they wrap from the end of one row to the start of the next. The
overlay shows this instead of hiding it: a segment that wraps is tinted in one colour on both rows, and a yellow
tick on the image's right side (where it leaves a row) and left side (where it comes back) marks the wrap.
"""

from __future__ import annotations

import functools
import io
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..common.files import atomic_write_bytes
from ..data.loader import iter_samples
from ..measure.tables import (
    caption_lengths,
    chance_level,
    metric_unit,
    run_params,
    run_tables,
    zeroshot_class_count,
)
from ..tower.model import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TraceRecord,
)

# Segment tints: saturated and far apart, none of them white or yellow (the edge and wrap colours). Every one has a
# channel at least 50 levels from mid-grey, so a tint changes every pixel of a mid-grey image (the tests use that).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (0, 128, 128)], dtype=np.uint8)  # 8 x 3
EDGE_COLOUR = (255, 255, 255)  # patch borders where the segment changes
WRAP_COLOUR = (255, 221, 0)  # a segment continues on the next row


# ----------------------------------------------------------------------------------------------------------
# 0. Style and saving: one style for every figure, one way to save


PAGE_WIDTH, COLUMN_WIDTH = 7.0, 3.4  # inches: the text width of a two-column paper, and one column
# The field's token reductions (`DTPConfig.reduction`, spec modifier `+tome`, ...): their family names in figures.
REDUCTION_FAMILIES = {"tome": "ToMe", "evit": "EViT", "tokenlearner": "TokenLearner", "kmeans": "k-means grouping",
                      "prune": "learned pruning"}
# One colour per kind of arm in every figure (seaborn's colour-blind palette; the reductions from Paul Tol's muted
# one, chosen so that every pair stays apart under simulated deuteranopia, protanopia and tritanopia): a reader
# matches arms across figures.
FAMILY_COLOURS = {"baseline (1x)": "#000000", "learned": "#0173b2", "uniform": "#de8f05", "top-k": "#029e73",
                  "2x2 pooling": "#cc78bc", "patch dropout (FLIP)": "#d55e00", "open_clip ViT": "#949494",
                  "ToMe": "#56b4e9", "EViT": "#661100", "TokenLearner": "#882255", "k-means grouping": "#332288",
                  "learned pruning": "#ddcc77"}
FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P")  # arms of one family, in their order of appearance
REFERENCE_GREY = "#9a9a9a"


def arm_family(label: str) -> str:
    """The kind of arm that a model label (`DTP-ViT-Ti-8-64-4x+uniform+hilbert`, `ViT-B-32+pd0.5`, from
    `dtplib.measure.specs`) or an arm name (`pool-2x2`, `flip-50`) is: a key of FAMILY_COLOURS. Uniform boundaries
    along a Hilbert curve every 4 patches are 2x2 pooling; a reduction of the field (`DTP-ViT-Ti-8-64-4x+tome`, an
    arm `tome-4x`) is its method's family."""
    name = label.lower()
    for method, family in REDUCTION_FAMILIES.items():
        if re.search(rf"(^|\+){method}($|[+-])", name):
            return family
    if "+pd" in name or name.startswith("flip"):
        return "patch dropout (FLIP)"
    if name.startswith("pool") or ("uniform" in name and "hilbert" in name):
        return "2x2 pooling"
    if "topk" in name:
        return "top-k"
    if "uniform" in name:
        return "uniform"
    if name.startswith("vit-"):
        return "open_clip ViT"
    if re.search(r"(^|-)1x($|\+)", name):
        return "baseline (1x)"
    return "learned"


def figure_style() -> dict:
    """rcParams of every figure drawn here: seaborn's "ticks" style at "paper" scale (8-9 pt text, readable at
    the width of a paper's column), a light grid, frameless legends, constrained layout, 200 dpi when saved."""
    import seaborn as sns

    return {**sns.axes_style("ticks"), **sns.plotting_context("paper"),
            "axes.grid": True, "grid.color": "#e5e5e5", "grid.linewidth": 0.6, "axes.spines.top": False,
            "axes.spines.right": False, "legend.frameon": False, "figure.constrained_layout.use": True,
            "savefig.dpi": 200, "font.family": "sans-serif", "axes.titlesize": 9, "axes.labelsize": 8.5}


def styled(draw):
    """Draw under `figure_style()` (the style applies to the figure drawn, not to the caller's later figures)."""

    @functools.wraps(draw)
    def draw_styled(*args, **kwargs):
        import matplotlib.pyplot as plt

        with plt.rc_context(figure_style()):
            return draw(*args, **kwargs)

    return draw_styled


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only (epochs, counts) on a matplotlib axis (`ax.xaxis`, `ax.yaxis`)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(picture, path: str | Path, dpi: int = 200, pdf: bool = False) -> Path:
    """Write a PNG atomically and return its path: a H x W x 3 uint8 array at exact pixels (PIL), or a matplotlib
    Figure with `savefig(format="png", dpi=dpi, bbox_inches="tight")` (a legend outside the axes stays in); with
    `pdf`, the figure also as a vector PDF beside it (same name, .pdf)."""
    buffer = io.BytesIO()
    if isinstance(picture, np.ndarray):
        from PIL import Image

        if picture.ndim != 3 or picture.shape[-1] != 3 or picture.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 picture, got {picture.dtype} {picture.shape}")
        Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="png")
    elif hasattr(picture, "savefig"):
        picture.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    else:
        raise TypeError(f"save_figure takes a matplotlib Figure or a H x W x 3 uint8 array, not {type(picture)}")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())  # creates the parent folders
    if pdf and hasattr(picture, "savefig"):
        vector = io.BytesIO()
        picture.savefig(vector, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
        atomic_write_bytes(path.with_suffix(".pdf"), vector.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------------
# 1. Data (01 notebook)


def show_samples(shards: str | Sequence[str], n: int = 8, columns: int = 4):
    """A matplotlib figure: a grid of the first `n` images with their first caption underneath."""
    import matplotlib.pyplot as plt

    samples = list(iter_samples(shards, limit=n))
    rows = max(1, math.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(sample["image"])
        ax.set_title(textwrap.fill(sample["captions"][0], 34), fontsize=8)
    fig.tight_layout()
    return fig


def caption_length_histogram(shards: str | Sequence[str]):
    """A matplotlib figure: histogram of caption lengths in words."""
    import matplotlib.pyplot as plt

    lengths = caption_lengths(shards)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=range(0, max(lengths) + 2), color="tab:blue", edgecolor="white")
    ax.set_xlabel("words per caption")
    ax.set_ylabel("captions")
    ax.set_title(f"{len(lengths)} captions, median {sorted(lengths)[len(lengths) // 2]} words")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# 2. Pictures as arrays


def input_normalization(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that the model's preprocess normalises with: open_clip's `visual.preprocess_cfg`, else the
    tower's timm config, else OpenAI CLIP's."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    towers = [m for m in model.modules() if hasattr(m, "default_cfg") and "mean" in (m.default_cfg or {})]
    if towers:
        return tuple(towers[0].default_cfg["mean"]), tuple(towers[0].default_cfg["std"])
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def denormalize(images: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """Model inputs back to pixels at the input resolution: (B x) 3 x H x W float -> (B x) H x W x 3 uint8."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected 3 x H x W or B x 3 x H x W images, got shape {tuple(x.shape)}")
    mean_ = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_ = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = ((x * std_ + mean_).clamp(0, 1) * 255).round().to(torch.uint8)  # (B x) 3 x H x W
    return pixels.movedim(-3, -1).numpy()  # (B x) H x W x 3


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Repeat every pixel scale x scale times (nearest neighbour): H x W x C -> sH x sW x C."""
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return np.repeat(np.repeat(image, int(scale), axis=0), int(scale), axis=1)


def patch_shape(image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Pixels per patch (height, width) of an H x W picture cut into a rows x cols grid; raises if it does not fit."""
    (height, width), (rows, cols) = image_size, grid
    if rows < 1 or cols < 1 or height % rows or width % cols:
        raise ValueError(f"a {height} x {width} picture does not split into a {rows} x {cols} patch grid")
    return height // rows, width // cols


def _as_grid(values, grid: tuple[int, int]) -> np.ndarray:
    """Per-patch values in raster order (N,) -> rows x cols numpy array."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.size != grid[0] * grid[1]:
        raise ValueError(f"{array.size} values do not fill a {grid[0]} x {grid[1]} patch grid")
    return array.reshape(grid)


def _edge_mask(ids: np.ndarray, size: tuple[int, int], width: int) -> np.ndarray:
    """H x W mask of the patch borders where the segment changes (ids: rows x cols).

    A border between two patches of different segments, left-right or above-below, is a band `width` pixels wide
    centred on the border line (pixels [b - width//2, b - width//2 + width) across it), and it runs along the
    whole side of the patch including the border bands at both of its ends, so corners close.
    """
    mask = np.zeros(size, dtype=bool)  # H x W
    patch_h, patch_w = patch_shape(size, ids.shape)
    lo = width // 2
    for r, c in zip(*np.nonzero(ids[:, 1:] != ids[:, :-1]), strict=True):  # between (r, c) and (r, c + 1)
        x = (c + 1) * patch_w
        mask[max(r * patch_h - lo, 0):(r + 1) * patch_h - lo + width, max(x - lo, 0):x - lo + width] = True
    for r, c in zip(*np.nonzero(ids[1:] != ids[:-1]), strict=True):  # between (r, c) and (r + 1, c)
        y = (r + 1) * patch_h
        mask[max(y - lo, 0):y - lo + width, max(c * patch_w - lo, 0):(c + 1) * patch_w - lo + width] = True
    return mask


def _wrap_mask(ids: np.ndarray, size: tuple[int, int], width: int) -> np.ndarray:
    """H x W mask of the wrap ticks: where a segment runs from the end of row r into the start of row r + 1, a tick
    `width` pixels wide on the image's right side (middle half of row r) and on its left side (row r + 1)."""
    mask = np.zeros(size, dtype=bool)  # H x W
    patch_h, _ = patch_shape(size, ids.shape)
    inset = patch_h // 4
    for r in np.nonzero(ids[:-1, -1] == ids[1:, 0])[0]:
        mask[r * patch_h + inset:(r + 1) * patch_h - inset, -width:] = True  # leaves row r on the right
        mask[(r + 1) * patch_h + inset:(r + 2) * patch_h - inset, :width] = True  # comes back on row r + 1
    return mask


def segment_overlay(image: np.ndarray, segment_ids, grid: tuple[int, int], alpha: float = 0.45,
                    edge_width: int = 2, scale: int = 1, patch_order: str = "raster") -> np.ndarray:
    """The segments of one image drawn over it: H x W x 3 uint8 -> sH x sW x 3 uint8 (s = scale, nearest).

    - every segment of two or more patches is tinted: round((1 - alpha) * pixel + alpha * colour), colours from
      PALETTE by segment id; a patch that is a segment of its own (nothing merged) keeps its pixels;
    - borders between patches of different segments (left-right and above-below) in EDGE_COLOUR (`_edge_mask`);
    - wrap ticks in WRAP_COLOUR where a segment continues on the next row (`_wrap_mask`, twice the edge width),
      for segments read in raster order only: along a Hilbert curve (`patch_order="hilbert"`) runs never wrap.
    Pixels elsewhere are the image's, unchanged; a patch that a reduction dropped (segment id -1) is untinted and
    darkened to half. Patch size = image size / grid, any sizes that divide.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if edge_width < 1:
        raise ValueError(f"edge_width must be at least 1 pixel, got {edge_width}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image (see `denormalize`), got {image.dtype} {image.shape}")
    image = upscale(image, scale)  # sH x sW x 3
    ids = _as_grid(segment_ids, grid).astype(np.int64)  # rows x cols
    patch_h, patch_w = patch_shape(image.shape[:2], grid)
    dropped = ids < 0  # rows x cols: no token (a pruning reduction)
    merged = (np.bincount(ids.ravel() + 1)[ids + 1] > 1) & ~dropped  # rows x cols: the patch shares its segment
    merged_px = np.repeat(np.repeat(merged, patch_h, 0), patch_w, 1)[..., None]  # H x W x 1
    tint = np.repeat(np.repeat(PALETTE[ids % len(PALETTE)], patch_h, 0), patch_w, 1)  # H x W x 3
    blended = np.rint((1 - alpha) * image.astype(np.float64) + alpha * tint)  # H x W x 3
    out = np.where(merged_px, blended, image).astype(np.uint8)
    out[np.repeat(np.repeat(dropped, patch_h, 0), patch_w, 1)] //= 2
    out[_edge_mask(ids, image.shape[:2], edge_width)] = EDGE_COLOUR
    if patch_order == "raster":
        out[_wrap_mask(ids, image.shape[:2], 2 * edge_width)] = WRAP_COLOUR
    return out


def probability_heatmap(probs, grid: tuple[int, int], size: tuple[int, int] | None = None, boundaries=None,
                        cmap: str = "viridis") -> np.ndarray:
    """Boundary probability per patch as colours at patch resolution: (N,) -> H x W x 3 uint8, constant on each
    patch (size defaults to 16 pixels per patch). With `boundaries` (N,), a red dot in the middle of every patch
    that closes a segment, so the 0.5 threshold and the forced last boundary can be read off."""
    import matplotlib

    values = _as_grid(probs, grid).astype(np.float64)  # rows x cols
    size = size or (16 * grid[0], 16 * grid[1])
    patch_h, patch_w = patch_shape(size, grid)
    colours = (matplotlib.colormaps[cmap](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    out = np.repeat(np.repeat(colours, patch_h, 0), patch_w, 1)  # H x W x 3
    if boundaries is not None:
        dot_h, dot_w = max(1, patch_h // 4), max(1, patch_w // 4)
        for r, c in zip(*np.nonzero(_as_grid(boundaries, grid)), strict=True):
            top, left = r * patch_h + (patch_h - dot_h) // 2, c * patch_w + (patch_w - dot_w) // 2
            out[top:top + dot_h, left:left + dot_w] = (255, 0, 0)
    return out


def display_scale(image_size: int, minimum: int = 224) -> int:
    """Integer upscaling that shows a small input (64 px) at a readable size; 1 for 224 px inputs."""
    return max(1, math.ceil(minimum / image_size))


def overlays(images: torch.Tensor, record: TraceRecord, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
             scale: int | None = None, **overlay_options) -> list[np.ndarray]:
    """`segment_overlay` of every traced image (B x 3 x H x W normalised inputs, the record of their forward)."""
    pixels = denormalize(images, mean, std)  # B x H x W x 3
    scale = scale or display_scale(pixels.shape[1])
    return [segment_overlay(pixels[i], record.segment_ids[i], record.grid, scale=scale,
                            patch_order=record.patch_order, **overlay_options) for i in range(len(pixels))]


# ----------------------------------------------------------------------------------------------------------
# 3. Boundary figures (04 notebook)


LEGEND = ("tint: one segment (a run of patches in raster order); untinted: a patch kept as its own token; "
          "white: borders between segments; yellow ticks: the segment continues on the next row; darkened: a dropped "
          "patch (no token)")


def boundary_figure(images: torch.Tensor, record: TraceRecord, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                    count: int = 4, scale: int | None = None, cmap: str = "viridis"):
    """One row per image (the first `count`): the input photo, its segments, P(boundary) per patch with red dots
    on the patches that close a segment."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    count = min(count, len(images))
    pixels = denormalize(images[:count], mean, std)  # count x H x W x 3
    scale = scale or display_scale(pixels.shape[1])
    drawn = overlays(images[:count], record, mean, std, scale=scale)
    num_patches = record.boundaries.shape[1]
    figure, axes = plt.subplots(count, 3, figsize=(9.5, 3.1 * count + 0.4), squeeze=False, layout="constrained")
    for i in range(count):
        tokens = int(record.tokens[i])
        heat = probability_heatmap(record.probs[i], record.grid, drawn[i].shape[:2], record.boundaries[i], cmap)
        panels = [(upscale(pixels[i], scale), "input"),
                  (drawn[i], f"{tokens} / {num_patches} tokens ({num_patches / tokens:.1f}x)"),
                  (heat, "P(boundary), red: boundary")]
        for ax, (picture, title) in zip(axes[i], panels, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes[:, 2], shrink=0.8, label="P(boundary)")
    figure.supxlabel(LEGEND, fontsize=7, wrap=True)
    return figure


def token_grid(images: torch.Tensor, record: TraceRecord, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
               count: int | None = None, columns: int = 6, sort: bool = True, scale: int | None = None):
    """Overlays of `count` images in a grid, each titled with the tokens it keeps; sorted from fewest to most
    tokens, so simple and cluttered photos sit at either end."""
    import matplotlib.pyplot as plt

    count = min(count or len(images), len(images))
    order = np.argsort(record.tokens[:count].cpu().numpy(), kind="stable") if sort else np.arange(count)
    drawn = overlays(images[:count], record, mean, std, scale=scale)
    num_patches = record.boundaries.shape[1]
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), squeeze=False,
                                layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, order, strict=False):  # the last row may have empty axes
        ax.imshow(drawn[i], interpolation="nearest")
        ax.set_title(f"{int(record.tokens[i])} / {num_patches} tokens", fontsize=9)
    figure.supxlabel(LEGEND, fontsize=7, wrap=True)
    return figure


METHODS_LEGEND = ("tint: the patches of one token (two or more); untinted: a patch that is a token of its own; "
                  "white: borders between tokens; darkened: a dropped patch (no token); yellow ticks: a run of patches "
                  "in raster order (DTP) continues on the next row. ToMe merges layer by layer, at the others' MACs: "
                  "its count is after its last layer")


def is_runs(segment_ids) -> bool:
    """Whether every group is a run of patches in raster order (DTP's segments: ids never fall along the row-major
    order, none dropped), so that a group leaving a row's end continues at the next row's start: then the overlay's
    wrap ticks are true statements. A 2-D grouping (k-means, TokenLearner), a fused token (EViT) or a pruned patch
    is no run."""
    ids = torch.as_tensor(segment_ids)  # (B x) N
    return bool((ids >= 0).all() and (ids.diff(dim=-1) >= 0).all())


def _tokens_title(record: TraceRecord, shown: int) -> str:
    """"16 / 64 tokens", or "12-31 / 64 tokens" when the shown images keep different counts."""
    tokens = record.tokens[:shown].cpu()
    low, high = int(tokens.min()), int(tokens.max())
    return f"{low}{'' if low == high else f'-{high}'} / {record.segment_ids.shape[1]} tokens"


def methods_figure(images: torch.Tensor, records: dict[str, TraceRecord], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                   notes: dict[str, str] | None = None, count: int | None = None, scale: int | None = None):
    """The same photos grouped by each method: a row per photo (the first `count`), a column per record (its key is
    the column's title, with the tokens it keeps), each cell `segment_overlay` of that method's trace. `notes`:
    a column's note (e.g. "random init") in red under its title, so an untrained grouping says so wherever the
    figure is copied. Wrap ticks only for records whose groups are runs in raster order (`is_runs`)."""
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("methods_figure needs at least one method's record")
    count = min(count or len(images), len(images))
    pixels = denormalize(images[:count], mean, std)  # count x H x W x 3
    scale = scale or display_scale(pixels.shape[1])
    figure, axes = plt.subplots(count, len(records), figsize=(1.55 * len(records) + 0.3, 1.55 * count + 1.0),
                                squeeze=False, layout="constrained")
    for column, (label, record) in enumerate(records.items()):
        if record.segment_ids.shape[0] < count:
            raise ValueError(f"the record of {label!r} has {record.segment_ids.shape[0]} images, fewer than {count}")
        order = "raster" if is_runs(record.segment_ids[:count]) else "grid"  # "grid": no wrap ticks
        for row in range(count):
            ax = axes[row, column]
            ax.imshow(segment_overlay(pixels[row], record.segment_ids[row], record.grid, scale=scale,
                                      patch_order=order), interpolation="nearest")
            ax.set_axis_off()
        note = (notes or {}).get(label, "")
        title = [label, _tokens_title(record, count), *([note] if note else [])]
        axes[0, column].set_title("\n".join(title), fontsize=8, color="tab:red" if note else "black")
    figure.supxlabel(METHODS_LEGEND, fontsize=6.5, wrap=True)
    return figure


@styled
def tokens_histogram(tokens, num_patches: int, target: float | None = None, title: str = ""):
    """Histogram of patch tokens kept per image (segments), with the mean and the target N / compression; whole
    numbers on both axes, the legend above the bars."""
    import matplotlib.pyplot as plt

    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    figure, ax = plt.subplots(figsize=(COLUMN_WIDTH * 1.5, 2.6))
    ax.hist(tokens, bins=np.arange(tokens.min() - 0.5, tokens.max() + 1.5), color=FAMILY_COLOURS["learned"],
            alpha=0.8)
    ax.axvline(tokens.mean(), color="black", label=f"mean {tokens.mean():.1f} ({num_patches / tokens.mean():.1f}x)")
    if target:
        ax.axvline(num_patches / target, color="#d55e00", linestyle="--", label=f"target {num_patches / target:g}"
                   f" ({target:g}x)")
    ax.set(xlabel=f"patch tokens kept per image (of {num_patches})", ylabel="images",
           title=title or f"tokens kept over {len(tokens)} images")
    integer_ticks(ax.xaxis)
    integer_ticks(ax.yaxis)
    figure.legend(loc="outside upper center", ncols=2)
    return figure


# ----------------------------------------------------------------------------------------------------------
# 4. Training runs (03 notebook): everything is read back from the run folder's CSVs and params.json


CURVE_METRICS = ("zeroshot_top1", "imagenet_top1", "image_to_text_R@10", "text_to_image_R@10")  # shown per epoch


def interval_limits(metric: str, low, high) -> tuple[np.ndarray, np.ndarray]:
    """An interval's ends clipped to what the metric can take (`metric_unit`: [0, 100] % or at least 0)."""
    _, _, (floor, ceiling) = metric_unit(metric)
    return np.clip(np.asarray(low, float), floor, ceiling), np.clip(np.asarray(high, float), floor, ceiling)


@styled
def training_curves(run_dir: str | Path):
    """Four panels: the contrastive loss per step (with the validation loss at each epoch's end), the boundary loss
    per step on its own axis, the realised compression per step against its target, and the evaluations per
    epoch in percent with their chance levels (dotted); legends outside the data, whole epochs."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    steps, epochs = run_tables(run_dir)
    params = run_params(run_dir)
    figure, axes = plt.subplots(2, 2, figsize=(PAGE_WIDTH, 4.6))
    (contrastive_ax, boundary_ax), (compression_ax, eval_ax) = axes
    window = max(1, len(steps) // 40)
    for ax, column, colour in ((contrastive_ax, "contrastive_loss", "#0173b2"), (boundary_ax, "boundary_loss",
                                                                                "#029e73"),
                               (compression_ax, "compression", FAMILY_COLOURS["learned"])):
        ax.plot(steps["step"], steps[column], color=colour, alpha=0.25, lw=0.8, label="per step")
        ax.plot(steps["step"], steps[column].rolling(window, min_periods=1).mean(), color=colour, lw=1.4,
                label=f"mean of {window} steps")
        ax.set(xlabel="step", ylabel=metric_unit(column)[1])
    if "val_loss" in epochs and epochs["val_loss"].notna().any():
        ends = steps.groupby("epoch")["step"].max()  # the step at which each epoch's evaluation ran
        contrastive_ax.plot(ends.reindex(epochs["epoch"]).to_numpy(), epochs["val_loss"], "o", color="black",
                            ms=3.5, label="validation loss (epoch end)")
    contrastive_ax.set_title("contrastive loss")
    boundary_ax.set_title("boundary loss" + ("" if steps["boundary_loss"].abs().sum() else " (none: no pooling)"))
    target = params.get("compression")
    if target and target > 1:
        compression_ax.axhline(target, color="#d55e00", ls="--", lw=1, label=f"target {target:g}x")
    compression_ax.set(title="realised compression", ylabel="patches per token")
    compression_ax.set_ylim(bottom=0)
    _evaluation_panel(eval_ax, epochs, params)
    handles = {"per step": Line2D([], [], color="#555555", alpha=0.3), f"mean of {window} steps":
               Line2D([], [], color="#555555", lw=1.4)}
    for ax in (contrastive_ax, compression_ax):
        handles.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)
                        if label not in ("per step", f"mean of {window} steps")})
    figure.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=len(handles), fontsize=7)
    return figure


def _evaluation_panel(ax, epochs: pd.DataFrame, params: dict) -> None:
    """The per-epoch evaluations of a run (CURVE_METRICS that ran) in percent, chance levels dotted."""
    from matplotlib.lines import Line2D

    shown = [c for c in CURVE_METRICS if c in epochs and epochs[c].notna().any()]
    sizes = {**epochs.iloc[0].to_dict(), "zeroshot_classes": zeroshot_class_count(params)} if len(epochs) else {}
    for index, metric in enumerate(shown):
        factor, label, _ = metric_unit(metric)
        colour = f"C{index}"
        ax.plot(epochs["epoch"] + 1, factor * epochs[metric], marker="o", ms=3, color=colour, label=label)
        chance = chance_level(metric, sizes)
        if chance is not None:
            ax.axhline(factor * chance, color=colour, ls=":", lw=1, label="chance (dotted, same colour)")
    ax.set(xlabel="epoch", ylabel="%", title="evaluation" if shown else "evaluation (none run)")
    ax.set_ylim(bottom=0)
    integer_ticks(ax.xaxis)
    if shown:
        entries = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        if entries.pop("chance (dotted, same colour)", None) is not None:
            entries["chance (dotted, same colour)"] = Line2D([], [], color="#555555", ls=":")  # last, in grey
        ax.legend(list(entries.values()), list(entries), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=6.5)
