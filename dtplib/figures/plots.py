"""Figures for the notebooks and results: drawing only, saved one way (`save_figure`).

Every function takes data frames, arrays or a trace and returns a matplotlib Figure or a H x W x 3 uint8 picture;
none shows or saves it, none builds a model or computes a table (those are `dtplib.measure.tables`). Save a figure
or a picture with `save_figure(figure, out / "name.png")`, and nothing else.

Read top to bottom:
0. `save_figure`: a PNG, atomically; pictures at exact pixels (PIL), figures with `savefig(bbox_inches="tight")`.
1. Data (01 notebook): `show_samples`, `caption_length_histogram`.
2. Pictures as uint8 arrays (pure functions, tested pixel by pixel): `input_normalization`, `denormalize`,
   `upscale`, `segment_overlay`, `probability_heatmap`, `overlays`.
3. Boundary figures (04 notebook, `python -m dtplib.viz overlay`): `boundary_figure` (photo | segments |
   P(boundary)), `token_grid` (overlays labelled with the tokens kept), `tokens_histogram`.
4. Training runs (03 notebook), read back from a run folder's CSVs: `training_curves`.
5. Efficiency (05 notebook, `python -m dtplib.bench`): `speedup_plot`, `accuracy_vs_gflops`; experiment grids
   (`python -m dtplib.experiment`): `accuracy_curves`.
6. Finetuning (06 notebook): `plot_results`.

Segments are runs of patches in raster order, so they wrap from the end of one row to the start of the next. The
overlay shows this instead of hiding it: a segment that wraps is tinted in one colour on both rows, and a yellow
tick on the image's right side (where it leaves a row) and left side (where it comes back) marks the wrap.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..common.files import atomic_write_bytes
from ..data.loader import iter_samples
from ..measure.tables import EVAL_COLUMNS, caption_lengths, metric_curves, run_tables
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
# 0. Saving: the one way


def save_figure(picture, path: str | Path, dpi: int = 120) -> Path:
    """Write a PNG atomically and return its path: a H x W x 3 uint8 array at exact pixels (PIL), or a matplotlib
    Figure with `savefig(format="png", dpi=dpi, bbox_inches="tight")` (a legend outside the axes stays in)."""
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
    Pixels elsewhere are the image's, unchanged. Patch size = image size / grid, any sizes that divide.
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
    merged = np.bincount(ids.ravel())[ids] > 1  # rows x cols: the patch shares its segment
    merged_px = np.repeat(np.repeat(merged, patch_h, 0), patch_w, 1)[..., None]  # H x W x 1
    tint = np.repeat(np.repeat(PALETTE[ids % len(PALETTE)], patch_h, 0), patch_w, 1)  # H x W x 3
    blended = np.rint((1 - alpha) * image.astype(np.float64) + alpha * tint)  # H x W x 3
    out = np.where(merged_px, blended, image).astype(np.uint8)
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
          "white: borders between segments; yellow ticks: the segment continues on the next row")


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


def tokens_histogram(tokens, num_patches: int, target: float | None = None, title: str = ""):
    """Histogram of patch tokens kept per image (segments), with the mean and the target N / compression."""
    import matplotlib.pyplot as plt

    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    figure, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.hist(tokens, bins=np.arange(tokens.min() - 0.5, tokens.max() + 1.5), color="tab:blue", alpha=0.8)
    ax.axvline(tokens.mean(), color="black", label=f"mean {tokens.mean():.1f} ({num_patches / tokens.mean():.1f}x)")
    if target:
        ax.axvline(num_patches / target, color="tab:red", linestyle="--", label=f"target {num_patches / target:g}"
                   f" ({target:g}x)")
    ax.set(xlabel=f"patch tokens kept per image (of {num_patches})", ylabel="images",
           title=title or f"tokens kept over {len(tokens)} images")
    ax.legend(fontsize=8)
    return figure


# ----------------------------------------------------------------------------------------------------------
# 4. Training runs (03 notebook): everything is read back from the run folder's CSVs




def training_curves(run_dir: str | Path):
    """Loss parts and realised compression per step, evaluations per epoch: one figure, three panels."""
    import matplotlib.pyplot as plt

    steps, epochs = run_tables(run_dir)
    figure, (loss_ax, comp_ax, eval_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for column in ("loss", "contrastive_loss", "boundary_loss"):
        loss_ax.plot(steps["step"], steps[column], label=column)
    loss_ax.set(xlabel="step", title="training loss", yscale="log")
    loss_ax.legend()
    comp_ax.plot(steps["step"], steps["compression"], alpha=0.4, label="per step (train, sampled)")
    comp_ax.plot(steps["step"], steps["compression"].rolling(10, min_periods=1).mean(), label="mean of 10")
    comp_ax.set(xlabel="step", ylabel="patches / segment", title="realised compression")
    comp_ax.legend()
    shown = [c for c in EVAL_COLUMNS if c in epochs and epochs[c].notna().any()]
    for column in shown:
        eval_ax.plot(epochs["epoch"] + 1, epochs[column], marker="o", label=column)
    eval_ax.set(xlabel="epoch", title="evaluation" if shown else "evaluation (none run)", ylim=(0, None))
    if shown:
        eval_ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------------------
# 5. Efficiency (05 notebook): FLOPs, benchmark rows and accuracy from results/, side by side


def speedup_plot(bench_csvs: list[str | Path]):
    """Measured speed-up against realised compression, beside the analytic bound of each execution: one row of
    panels per timed mode (whole CLIP step, image tower), one column per kind of boundaries (learned, uniform,
    topk, batch-topk); patch-dropout peers in every panel. The legend sits outside the panels."""
    import matplotlib.pyplot as plt

    frames = [(Path(c).stem, pd.read_csv(c)) for c in bench_csvs]
    kinds = [k for k in ("learned", "uniform", "topk", "batch-topk")
             if any((f.get("boundaries", pd.Series(dtype=str)) == k).any() for _, f in frames)] or ["learned"]
    modes = [m for m in ("clip", "image") if any((f["mode"] == m).any() for _, f in frames)]
    figure, axes = plt.subplots(len(modes), len(kinds), figsize=(4.2 * len(kinds) + 2.6, 3.6 * len(modes)),
                                squeeze=False, sharey="row")
    styles = {"static": ("^", "-"), "packed": ("o", "-"), "padded": ("s", "--")}
    for column, kind in enumerate(kinds):
        for row, mode in enumerate(modes):
            ax = axes[row, column]
            for file_index, (stem, frame) in enumerate(frames):
                color = f"C{file_index}"
                rows = frame[frame["mode"] == mode]
                tag = f" ({stem})" if len(frames) > 1 else ""
                dtp = rows[rows.get("boundaries", pd.Series("", index=rows.index)).fillna("") == kind]
                for execution, group in dtp.groupby(dtp["execution"].fillna("packed") if "execution" in dtp else
                                                    pd.Series("packed", index=dtp.index)):
                    group = group.sort_values("realised_compression")
                    marker, line = styles.get(execution, ("o", "-"))
                    bound = group["padded_bound"] if execution == "padded" else group["analytic_bound"]
                    ax.plot(group["realised_compression"], group["speedup"], marker=marker, linestyle=line,
                            color=color, label=f"DTP {execution}, measured{tag}")
                    ax.plot(group["realised_compression"], bound, marker="+" if execution == "padded" else "x",
                            linestyle=":", color=color, alpha=0.6,
                            label=f"DTP {execution}, analytic bound{tag}")
                dropout = rows[rows["model"].str.contains(r"\+pd")]
                ax.scatter(dropout["realised_compression"], dropout["speedup"], marker="D", color="grey",
                           label=f"FLIP patch dropout, measured{tag}")
                ax.scatter(dropout["realised_compression"], dropout["analytic_bound"], marker="D", facecolors="none",
                           edgecolors="grey", label=f"FLIP patch dropout, bound{tag}")
            ax.axhline(1, color="grey", lw=0.5)
            title = {"clip": "whole CLIP training step", "image": "image tower, fwd + bwd"}[mode]
            ax.set_title(f"{kind} boundaries: {title}", fontsize=9)
            ax.set_xlabel("realised compression (patches per token)", fontsize=8)
            if column == 0:
                first = frames[0][1]
                reference = first["reference"].iloc[0] if "reference" in first else "the first model"
                ax.set_ylabel(f"speed-up over {reference}", fontsize=8)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
                  frameon=False)
    figure.tight_layout()
    return figure


def accuracy_vs_gflops(table: pd.DataFrame):
    """Zero-shot top-1 against image-tower GFLOPs, for the rows that have an accuracy."""
    import matplotlib.pyplot as plt

    rows = table.dropna(subset=["zero-shot top-1"]).drop_duplicates("model")
    figure, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(rows["image GFLOPs"], 100 * rows["zero-shot top-1"])
    for _, r in rows.iterrows():
        ax.annotate(r["model"], (r["image GFLOPs"], 100 * r["zero-shot top-1"]), fontsize=7)
    ax.set(xlabel="image tower GFLOPs per image", ylabel="zero-shot top-1 (%)",
           title="accuracy against compute" if len(rows) else "accuracy against compute (no training runs yet)")
    figure.tight_layout()
    return figure


def experiment_curves(runs_csv: str | Path, metric: str):
    """`accuracy_curves` of an experiment's runs.csv (`python -m dtplib.experiment`): the metric against training
    time and training GMACs, per arm."""
    runs_csv = Path(runs_csv)
    if not runs_csv.is_file():
        raise FileNotFoundError(f"{runs_csv}: no runs.csv (run python -m dtplib.experiment --grid ... first)")
    runs = pd.read_csv(runs_csv)
    if metric not in runs or runs[metric].isna().all():
        raise ValueError(f"{runs_csv} has no values of {metric!r}")
    return accuracy_curves(metric_curves(runs, metric), metric)


def accuracy_curves(curves: pd.DataFrame, metric: str):
    """A metric against cumulative training time and against training GMACs, one line per arm, mean over seeds
    with 95% interval bars: `curves` is `metric_curves(runs, metric)` (columns arm, train_time_s,
    train_gmacs, mean, low, high; no bar where one seed gives no interval). Iso-compute comparisons read across."""
    import matplotlib.pyplot as plt

    figure, (time_ax, macs_ax) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    longest = curves["train_time_s"].max() if len(curves) else 0
    unit, scale = ("h", 3600) if longest > 7200 else ("min", 60) if longest > 120 else ("s", 1)
    for index, (arm, rows) in enumerate(curves.groupby("arm", sort=False)):
        rows = rows.sort_values("train_gmacs")
        error = np.nan_to_num(np.stack([rows["mean"] - rows["low"], rows["high"] - rows["mean"]]), nan=0.0)
        seeds = f"{rows['seeds'].min()}" if rows["seeds"].min() == rows["seeds"].max() else \
            f"{rows['seeds'].min()}-{rows['seeds'].max()}"
        style = _arm_style(index)
        for ax, x in ((time_ax, rows["train_time_s"] / scale), (macs_ax, rows["train_gmacs"])):
            ax.errorbar(x, rows["mean"], yerr=error, capsize=3, markersize=4, label=f"{arm} (seeds: {seeds})",
                        **style)
    time_ax.set(xlabel=f"cumulative training step time ({unit})", ylabel=metric, title=f"{metric} against time")
    macs_ax.set(xlabel="training GMACs (forward, image + text towers, x samples seen)",
                title=f"{metric} against compute")
    if len(curves):  # one legend for both panels, outside the data (save_figure keeps it with bbox_inches="tight")
        figure.legend(*time_ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                      fontsize=7, frameon=False)
    figure.suptitle("mean over seeds, bars: 95% t-interval over seeds", fontsize=9)
    figure.tight_layout()
    return figure


ARM_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _arm_style(index: int) -> dict:
    """The colour and marker of the `index`-th line of a figure: tab20's 20 colours, paired light and dark
    tones taken dark ones first, with a marker cycle of another length, so no two of the first 20 lines look
    alike (tab10 repeats after 10, which made the 11-arm comparison's 1x and uniform-10x the same blue)."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    colour = palette[(2 * index) % 20 + (index // 10) % 2]
    return {"color": colour, "marker": ARM_MARKERS[index % len(ARM_MARKERS)]}


# ----------------------------------------------------------------------------------------------------------
# 6. Finetuning (06 notebook)


def plot_results(table: pd.DataFrame):
    """Test top-1 of each method as bars, with the chance level as a line."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.4 * len(table) + 2, 3.2))
    bars = axis.bar(table["method"], 100 * table["top1"], color="tab:blue")
    axis.bar_label(bars, fmt="%.1f")
    chance = 100 * table["chance"].iloc[0]
    axis.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.0f}%)")
    axis.set_ylabel("test top-1 (%)")
    axis.set_ylim(0, max(100 * table["top1"].max() * 1.2, chance * 2))
    axis.legend(loc="upper left")
    axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    return figure
