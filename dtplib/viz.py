"""Seeing the boundaries: segments over the images, boundary probabilities, tokens kept, and whether boundaries
fall where objects change.

As ToMe's vis.py: trace once, then one call draws.

    with dtplib.trace(model) as t:
        model.encode_image(images)
    figure = viz.boundary_figure(images, t.last(), *viz.input_normalization(model))

Read top to bottom:
1. Pictures as uint8 arrays (pure functions, tested pixel by pixel): `denormalize`, `segment_overlay`,
   `probability_heatmap`, `save_png`.
2. Figures for the 04 notebook: `boundary_figure` (photo | segments | P(boundary)), `token_grid` (overlays
   labelled with the tokens kept), `tokens_histogram`.
3. Alignment with object outlines on COCO: the fraction of boundaries that fall on patches crossed by an object
   outline, against uniform and random boundaries with the same count per image (`alignment`).
4. `python -m dtplib.viz align --model NAME [--checkpoint PATH]` and `python -m dtplib.viz overlay ...`.

Segments are runs of patches in raster order, so they wrap from the end of one row to the start of the next. The
overlay shows this instead of hiding it: a segment that wraps is tinted in one colour on both rows, and a yellow
tick on the image's right side (where it leaves a row) and left side (where it comes back) marks the wrap.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TraceRecord, get_tower, trace
from .utils import SHARED_DATA, atomic_write_bytes, atomic_write_text, repo_path, run_info

# Segment tints: saturated and far apart, none of them white or yellow (the edge and wrap colours). Every one has a
# channel at least 50 levels from mid-grey, so a tint changes every pixel of a mid-grey image (the tests use that).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (0, 128, 128)], dtype=np.uint8)  # 8 x 3
EDGE_COLOUR = (255, 255, 255)  # patch borders where the segment changes
WRAP_COLOUR = (255, 221, 0)  # a segment continues on the next row
COCO_MINI = SHARED_DATA / "coco-mini"
# preprocess steps that leave pixel positions alone ("function": a plain function such as open_clip's _convert_to_rgb)
NON_GEOMETRIC = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize", "PILToTensor", "ConvertImageDtype",
                 "function"}


# ----------------------------------------------------------------------------------------------------------
# 1. Pictures as arrays


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


def as_grid(values, grid: tuple[int, int]) -> np.ndarray:
    """Per-patch values in raster order (N,) -> rows x cols numpy array."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.size != grid[0] * grid[1]:
        raise ValueError(f"{array.size} values do not fill a {grid[0]} x {grid[1]} patch grid")
    return array.reshape(grid)


def edge_mask(ids: np.ndarray, size: tuple[int, int], width: int) -> np.ndarray:
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


def wrap_mask(ids: np.ndarray, size: tuple[int, int], width: int) -> np.ndarray:
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
                    edge_width: int = 2, scale: int = 1) -> np.ndarray:
    """The segments of one image drawn over it: H x W x 3 uint8 -> sH x sW x 3 uint8 (s = scale, nearest).

    - every segment of two or more patches is tinted: round((1 - alpha) * pixel + alpha * colour), colours from
      PALETTE by segment id; a patch that is a segment of its own (nothing merged) keeps its pixels;
    - borders between patches of different segments (left-right and above-below) in EDGE_COLOUR (`edge_mask`);
    - wrap ticks in WRAP_COLOUR where a segment continues on the next row (`wrap_mask`, twice the edge width).
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
    ids = as_grid(segment_ids, grid).astype(np.int64)  # rows x cols
    patch_h, patch_w = patch_shape(image.shape[:2], grid)
    merged = np.bincount(ids.ravel())[ids] > 1  # rows x cols: the patch shares its segment
    merged_px = np.repeat(np.repeat(merged, patch_h, 0), patch_w, 1)[..., None]  # H x W x 1
    tint = np.repeat(np.repeat(PALETTE[ids % len(PALETTE)], patch_h, 0), patch_w, 1)  # H x W x 3
    blended = np.rint((1 - alpha) * image.astype(np.float64) + alpha * tint)  # H x W x 3
    out = np.where(merged_px, blended, image).astype(np.uint8)
    out[edge_mask(ids, image.shape[:2], edge_width)] = EDGE_COLOUR
    out[wrap_mask(ids, image.shape[:2], 2 * edge_width)] = WRAP_COLOUR
    return out


def probability_heatmap(probs, grid: tuple[int, int], size: tuple[int, int] | None = None, boundaries=None,
                        cmap: str = "viridis") -> np.ndarray:
    """Boundary probability per patch as colours at patch resolution: (N,) -> H x W x 3 uint8, constant on each
    patch (size defaults to 16 pixels per patch). With `boundaries` (N,), a red dot in the middle of every patch
    that closes a segment, so the 0.5 threshold and the forced last boundary can be read off."""
    import matplotlib

    values = as_grid(probs, grid).astype(np.float64)  # rows x cols
    size = size or (16 * grid[0], 16 * grid[1])
    patch_h, patch_w = patch_shape(size, grid)
    colours = (matplotlib.colormaps[cmap](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    out = np.repeat(np.repeat(colours, patch_h, 0), patch_w, 1)  # H x W x 3
    if boundaries is not None:
        dot_h, dot_w = max(1, patch_h // 4), max(1, patch_w // 4)
        for r, c in zip(*np.nonzero(as_grid(boundaries, grid)), strict=True):
            top, left = r * patch_h + (patch_h - dot_h) // 2, c * patch_w + (patch_w - dot_w) // 2
            out[top:top + dot_h, left:left + dot_w] = (255, 0, 0)
    return out


def save_png(picture, path: str | Path, dpi: int = 100) -> Path:
    """Write a H x W x 3 uint8 array (exact pixels, PIL) or a matplotlib Figure as a PNG, atomically."""
    buffer = io.BytesIO()
    if isinstance(picture, np.ndarray):
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8)).save(buffer, format="png")
    else:
        picture.savefig(buffer, format="png", dpi=dpi)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------------
# 2. Figures


def display_scale(image_size: int, minimum: int = 224) -> int:
    """Integer upscaling that shows a small input (64 px) at a readable size; 1 for 224 px inputs."""
    return max(1, math.ceil(minimum / image_size))


def trace_batches(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> TraceRecord:
    """One eval-mode, no-grad trace of `images` in batches, concatenated into one record (B = len(images))."""
    was_training = model.training
    model.eval()
    records = []
    try:
        with torch.no_grad(), trace(model) as t:
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                model.encode_image(batch) if hasattr(model, "encode_image") else model(batch)
                records.append(t.last())
    finally:
        model.train(was_training)
    cat = lambda name: torch.cat([getattr(r, name) for r in records])  # noqa: E731
    return TraceRecord(boundaries=cat("boundaries"), segment_ids=cat("segment_ids"), probs=cat("probs"),
                       tokens=cat("tokens"), compression=cat("compression"),
                       boundary_loss=torch.stack([r.boundary_loss for r in records]).mean(), grid=records[0].grid)


def overlays(images: torch.Tensor, record: TraceRecord, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
             scale: int | None = None, **overlay_options) -> list[np.ndarray]:
    """`segment_overlay` of every traced image (B x 3 x H x W normalised inputs, the record of their forward)."""
    pixels = denormalize(images, mean, std)  # B x H x W x 3
    scale = scale or display_scale(pixels.shape[1])
    return [segment_overlay(pixels[i], record.segment_ids[i], record.grid, scale=scale, **overlay_options)
            for i in range(len(pixels))]


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
# 3. Alignment with object outlines (COCO polygons)


@dataclass
class OutlinedImage:
    """A COCO image and the outlines of its objects, in the original image's pixels."""

    path: Path
    width: int
    height: int
    polygons: list[np.ndarray]  # each K x 2 (x, y); non-crowd instance polygons


def coco_outlines(coco_dir: str | Path = COCO_MINI, splits: Sequence[str] = ("train2017", "val2017"),
                  num_images: int | None = None) -> list[OutlinedImage]:
    """Images with at least one object polygon (`annotations/instances_<split>.json`), sorted by split and name.
    Crowd annotations (run-length masks, not outlines) are left out."""
    coco_dir = repo_path(coco_dir)
    found = []
    for split in splits:
        path = coco_dir / "annotations" / f"instances_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"COCO instance annotations not found: {path}")
        coco = json.loads(path.read_text())
        polygons: dict[int, list[np.ndarray]] = {}
        for ann in coco["annotations"]:
            if ann.get("iscrowd") or not isinstance(ann["segmentation"], list):
                continue
            for flat in ann["segmentation"]:
                if len(flat) >= 4:
                    polygons.setdefault(ann["image_id"], []).append(np.asarray(flat, dtype=np.float64).reshape(-1, 2))
        for info in sorted(coco["images"], key=lambda i: i["file_name"]):
            file = coco_dir / split / info["file_name"]
            if info["id"] in polygons and file.is_file():
                found.append(OutlinedImage(file, info["width"], info["height"], polygons[info["id"]]))
    if not found:
        raise FileNotFoundError(f"no COCO image with object polygons under {coco_dir}")
    return found[:num_images] if num_images else found


def preprocess_geometry(preprocess, width: int, height: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Where the preprocess moves pixels: (scale (2,), offset (2,), output (H, W)), so that a point (x, y) of the
    original image lands at (x, y) * scale - offset. Read from the transform's own Resize and CenterCrop steps
    (torchvision's arithmetic: shorter side to `size`, longer side truncated; crop offsets rounded)."""
    from torchvision import transforms as T

    scale, offset, (out_h, out_w) = np.ones(2), np.zeros(2), (height, width)
    for step in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(step, T.Resize):
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            if len(size) == 1:
                short, long = min(out_h, out_w), max(out_h, out_w)
                new_short, new_long = size[0], int(size[0] * long / short)
                new_h, new_w = (new_long, new_short) if out_w <= out_h else (new_short, new_long)
            else:
                new_h, new_w = size
            factor = np.array([new_w / out_w, new_h / out_h])
            scale, offset = scale * factor, offset * factor
            out_h, out_w = new_h, new_w
        elif isinstance(step, T.CenterCrop):
            crop_h, crop_w = step.size
            if crop_h > out_h or crop_w > out_w:
                raise ValueError(f"center crop {crop_h} x {crop_w} pads a {out_h} x {out_w} image: not supported")
            offset = offset + np.array([int(round((out_w - crop_w) / 2.0)), int(round((out_h - crop_h) / 2.0))])
            out_h, out_w = crop_h, crop_w
        elif type(step).__name__ not in NON_GEOMETRIC:
            raise ValueError(f"cannot follow pixel positions through {type(step).__name__} in the preprocess")
    return scale, offset, (out_h, out_w)


def outline_patches(polygons: Sequence[np.ndarray], size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(N,) bool: the patches (closed boxes, raster order) that an outline crosses or touches. Exact: every polygon
    edge is clipped against every patch box (Liang-Barsky); parts outside the picture are ignored."""
    patch_h, patch_w = patch_shape(size, grid)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    box_x0, box_y0 = (cols * patch_w).ravel(), (rows * patch_h).ravel()  # N, N
    box_x1, box_y1 = box_x0 + patch_w, box_y0 + patch_h
    if not polygons:
        return np.zeros(grid[0] * grid[1], dtype=bool)
    starts = np.concatenate([p for p in polygons])  # E x 2
    ends = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])  # E x 2, closing each polygon
    x0, y0 = starts[:, :1], starts[:, 1:]  # E x 1
    dx, dy = ends[:, :1] - x0, ends[:, 1:] - y0  # E x 1
    p = np.stack(np.broadcast_arrays(-dx, dx, -dy, dy))  # 4 x E x 1
    q = np.stack([x0 - box_x0, box_x1 - x0, y0 - box_y0, box_y1 - y0])  # 4 x E x N
    p = np.broadcast_to(p, q.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = q / p  # 4 x E x N
    t_enter = np.maximum(0.0, np.where(p < 0, ratio, -np.inf).max(0))  # E x N
    t_exit = np.minimum(1.0, np.where(p > 0, ratio, np.inf).min(0))  # E x N
    outside = ((p == 0) & (q < 0)).any(0)  # parallel to a side and beyond it
    return ((t_enter <= t_exit) & ~outside).any(0)  # N


def coco_patch_outlines(preprocess, grid: tuple[int, int], coco_dir: str | Path = COCO_MINI,
                        num_images: int | None = None) -> tuple[torch.Tensor, np.ndarray, list[Path]]:
    """COCO images through the model's preprocess (B x 3 x H x W), the patches their object outlines cross in
    that geometry (B x N bool), and the files."""
    from PIL import Image

    images, outlines, files = [], [], []
    for item in coco_outlines(coco_dir, num_images=num_images):
        with Image.open(item.path) as photo:
            images.append(preprocess(photo.convert("RGB")))  # 3 x H x W
        scale, offset, size = preprocess_geometry(preprocess, item.width, item.height)
        outlines.append(outline_patches([p * scale - offset for p in item.polygons], size, grid))
        files.append(item.path)
    return torch.stack(images), np.stack(outlines), files


def boundary_alignment(boundaries, outline) -> float:
    """Fraction of boundaries (B x N) that lie on outline patches (B x N), over all images; the forced boundary on
    the last patch is left out. NaN when there is no other boundary."""
    chosen = np.asarray(boundaries, dtype=bool)[:, :-1]  # B x (N-1)
    hits = (chosen & np.asarray(outline, dtype=bool)[:, :-1]).sum()
    return float(hits / chosen.sum()) if chosen.any() else float("nan")


def uniform_boundaries(counts, num_patches: int) -> np.ndarray:
    """B x N bool: for an image with k segments, k boundaries spread evenly, at floor(j N / k) - 1 for j = 1..k;
    the last one is the last patch, as the model's forced boundary. k = N / c gives a boundary every c patches."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros((len(counts), num_patches), dtype=bool)
    for i, k in enumerate(counts):
        if not 1 <= k <= num_patches:
            raise ValueError(f"an image needs 1 to {num_patches} segments, got {k}")
        out[i, (np.arange(1, k + 1) * num_patches) // k - 1] = True
    return out


def random_boundaries(counts, num_patches: int, generator: np.random.Generator) -> np.ndarray:
    """B x N bool: for an image with k segments, k - 1 boundaries at random among the first N - 1 patches (without
    replacement) and the forced one on the last patch."""
    counts = np.asarray(counts, dtype=np.int64)
    ranks = generator.random((len(counts), num_patches - 1)).argsort(-1).argsort(-1)  # B x (N-1), a permutation
    chosen = ranks < (counts[:, None] - 1)  # B x (N-1)
    return np.concatenate([chosen, np.ones((len(counts), 1), dtype=bool)], axis=1)  # B x N


def alignment_table(boundaries, outline, draws: int = 100, seed: int = 0) -> pd.DataFrame:
    """Alignment of the given boundaries, of uniform ones and of random ones with the same count per image.

    Columns: alignment, std (random: over `draws` seeded draws), boundaries per image (the forced last one not
    counted), outline share (fraction of the first N - 1 patches that an outline crosses, over all images; random
    boundaries score this share with each image weighted by its number of boundaries), images.
    """
    boundaries = np.asarray(boundaries.cpu() if isinstance(boundaries, torch.Tensor) else boundaries, dtype=bool)
    outline = np.asarray(outline, dtype=bool)
    if boundaries.shape != outline.shape:
        raise ValueError(f"boundaries {boundaries.shape} and outlines {outline.shape} differ in shape")
    num_images, num_patches = boundaries.shape
    counts = boundaries[:, :-1].sum(1) + 1  # B, segments per image
    generator = np.random.default_rng(seed)
    random = [boundary_alignment(random_boundaries(counts, num_patches, generator), outline) for _ in range(draws)]
    common = {"boundaries per image": float(counts.mean() - 1), "outline share": float(outline[:, :-1].mean()),
              "images": num_images}
    rows = [{"boundaries": "learned", "alignment": boundary_alignment(boundaries, outline), "std": float("nan")},
            {"boundaries": "uniform (same count)", "alignment": boundary_alignment(
                uniform_boundaries(counts, num_patches), outline), "std": float("nan")},
            {"boundaries": "random (same count)", "alignment": float(np.mean(random)), "std": float(np.std(random))}]
    return pd.DataFrame([{**row, **common} for row in rows])


def alignment(model: torch.nn.Module, preprocess, coco_dir: str | Path = COCO_MINI, num_images: int | None = None,
              batch_size: int = 64, draws: int = 100, seed: int = 0) -> pd.DataFrame:
    """How often the model's eval-time boundaries fall on patches crossed by a COCO object outline, next to uniform
    and random boundaries with the same count per image (`alignment_table`)."""
    tower = get_tower(model)
    images, outline, _ = coco_patch_outlines(preprocess, tower.grid, coco_dir, num_images)
    record = trace_batches(model, images, batch_size)
    table = alignment_table(record.boundaries, outline, draws, seed)
    return table.assign(compression=tower.num_patches / record.tokens.float().mean().item(),
                        target=tower.dtp.compression, grid=f"{tower.grid[0]}x{tower.grid[1]}",
                        patch_size=tower.patch_embed.patch_size[0])


# ----------------------------------------------------------------------------------------------------------
# 4. Command line


UNTRAINED = ("note: no checkpoint, so the boundary predictor is untrained (random init): its boundaries say nothing "
             "about the images yet")


def model_label(name: str | None, checkpoint: str | None) -> str:
    """The open_clip name a row is about: the one given, else the one a dtplib.train checkpoint was trained as."""
    if name or not checkpoint:
        return name or ""
    from .clip import dtp_name, read_checkpoint
    from .train import resolve_model

    train_args = read_checkpoint(checkpoint).get("args") or {}
    if "model" not in train_args:
        return ""
    arch, compression, upsample = resolve_model(argparse.Namespace(**{"compression": None, "upsample": False,
                                                                      **train_args}))
    return arch if compression is None else dtp_name(arch, compression, upsample)


def append_csv(table: pd.DataFrame, path: str | Path) -> None:
    """Add rows to a CSV (creating it), atomically; columns are the union of old and new."""
    path = repo_path(path)
    if path.is_file():
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    atomic_write_text(path, table.to_csv(index=False))


def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    from .evaluate import load_model

    parser = argparse.ArgumentParser(prog="python -m dtplib.viz", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    align = commands.add_parser("align", help="alignment of boundaries with COCO object outlines")
    overlay = commands.add_parser("overlay", help="draw segments, probabilities and tokens kept for a folder")
    for sub in (align, overlay):
        sub.add_argument("--model", help="open_clip name, e.g. DTP-ViT-Ti-8-64-4x; default with --checkpoint: the "
                         "model it was trained as")
        sub.add_argument("--checkpoint", help="a checkpoint written by python -m dtplib.train")
        sub.add_argument("--batch-size", type=int, default=64)
    align.add_argument("--coco", default=str(COCO_MINI), help="COCO folder with annotations/ and the image folders")
    align.add_argument("--num-images", type=int, help="first N annotated images (default: all)")
    align.add_argument("--draws", type=int, default=100, help="draws of random boundaries")
    align.add_argument("--output", help="append the table, with model and provenance columns, to this CSV")
    overlay.add_argument("--images", default=str(SHARED_DATA / "flickr8k" / "images"), help="folder of photos")
    overlay.add_argument("--num-images", type=int, default=64, help="first N photos (sorted names)")
    overlay.add_argument("--shown", type=int, default=6, help="photos drawn in overlays.png")
    overlay.add_argument("--grid", type=int, default=24, help="photos drawn in token_grid.png")
    overlay.add_argument("--out", required=True, help="folder for overlays.png, token_grid.png, tokens_hist.png")
    args = parser.parse_args(argv)
    if args.model is None and args.checkpoint is None:
        parser.error("give --model, --checkpoint, or both")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")

    model, preprocess, _ = load_model(args.model, args.checkpoint)
    tower = get_tower(model)
    if args.checkpoint is None:
        print(UNTRAINED, file=sys.stderr)
    if args.command == "align":
        table = alignment(model, preprocess, args.coco, args.num_images, args.batch_size, args.draws)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if args.output:
            provenance = {"model": model_label(args.model, args.checkpoint), "checkpoint": args.checkpoint or "",
                          **run_info("cpu", "fp32", args.batch_size)}
            append_csv(table.assign(**provenance), args.output)
        return table
    from .utils import load_photos

    images, _ = load_photos(args.images, args.num_images, preprocess)
    record = trace_batches(model, images, args.batch_size)
    mean, std = input_normalization(model)
    out = repo_path(args.out)
    save_png(boundary_figure(images, record, mean, std, count=args.shown), out / "overlays.png")
    save_png(token_grid(images, record, mean, std, count=args.grid), out / "token_grid.png")
    save_png(tokens_histogram(record.tokens, tower.num_patches, tower.dtp.compression), out / "tokens_hist.png")
    print(f"wrote overlays.png, token_grid.png, tokens_hist.png to {out}")
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
