"""Seeing the boundaries: trace many images, measure alignment with COCO object outlines, draw from the command line.

The pictures and figures (segment overlays, P(boundary) heatmaps, token grids, histograms) live in `dtplib.plots`,
saved with `plots.save_figure`. As ToMe's vis.py: trace once, then one call draws.

    record = viz.trace_batches(model, images)
    figure = plots.boundary_figure(images, record, *plots.input_normalization(model))
    plots.save_figure(figure, "boundaries.png")

Read top to bottom:
1. `trace_batches`: one eval-mode, no-grad trace of many images in batches, as one `TraceRecord`.
2. Alignment with object outlines on COCO: the fraction of boundaries that fall on patches crossed by an object
   outline, against uniform and random boundaries with the same count per image (`alignment`).
3. `python -m dtplib.viz align --model NAME [--checkpoint PATH]` (the alignment table) and
   `python -m dtplib.viz overlay ...` (overlays.png, token_grid.png, tokens_hist.png, drawn by `dtplib.plots`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .model import TraceRecord, get_tower, trace
from .plots import boundary_figure, input_normalization, patch_shape, save_figure, token_grid, tokens_histogram
from .utils import append_csv, data_root, open_rgb, repo_path, run_cli, run_info

COCO_MINI = data_root() / "coco-mini"  # DTPLIB_DATA as set when dtplib.viz is imported
# preprocess steps that leave pixel positions alone ("function": a plain function such as open_clip's _convert_to_rgb)
NON_GEOMETRIC = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize", "PILToTensor", "ConvertImageDtype",
                 "function"}


# ----------------------------------------------------------------------------------------------------------
# 1. Tracing


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


# ----------------------------------------------------------------------------------------------------------
# 2. Alignment with object outlines (COCO polygons)


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
    images, outlines, files = [], [], []
    for item in coco_outlines(coco_dir, num_images=num_images):
        images.append(preprocess(open_rgb(item.path)))  # 3 x H x W
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
    return table.assign(compression=record.budget,
                        target=tower.dtp.compression, grid=f"{tower.grid[0]}x{tower.grid[1]}",
                        patch_size=tower.patch_embed.patch_size[0])


# ----------------------------------------------------------------------------------------------------------
# 3. Command line


UNTRAINED = ("note: no checkpoint, so the boundary predictor is untrained (random init): its boundaries say nothing "
             "about the images yet")


def model_label(name: str | None, checkpoint: str | None) -> str:
    """The open_clip name a row is about: the one given, else the one a dtplib.train checkpoint was trained as."""
    if name or not checkpoint:
        return name or ""
    from .clip import open_clip_name, training_config

    config = training_config(checkpoint)
    return "" if config is None else open_clip_name(config.model, config.compression, config.upsample)


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
    overlay.add_argument("--images", default=str(data_root() / "flickr8k" / "images"), help="folder of photos")
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
            append_csv(repo_path(args.output), table.assign(**provenance).to_dict("records"))
        return table
    from .utils import load_photos

    images, _ = load_photos(args.images, args.num_images, preprocess)
    record = trace_batches(model, images, args.batch_size)
    mean, std = input_normalization(model)
    out = repo_path(args.out)
    save_figure(boundary_figure(images, record, mean, std, count=args.shown), out / "overlays.png")
    save_figure(token_grid(images, record, mean, std, count=args.grid), out / "token_grid.png")
    save_figure(tokens_histogram(record.tokens, tower.num_patches, tower.dtp.compression), out / "tokens_hist.png")
    print(f"wrote overlays.png, token_grid.png, tokens_hist.png to {out}")
    return None


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.viz")
