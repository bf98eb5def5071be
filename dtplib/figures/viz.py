"""Seeing the boundaries: trace many images, measure alignment with COCO object outlines, draw from the command line.

The pictures and figures (segment overlays, P(boundary) heatmaps, token grids, histograms) live in
`dtplib.figures.plots`, saved with `plots.save_figure`. As ToMe's vis.py: trace once, then one call draws.

    record = viz.trace_batches(model, images)
    figure = plots.boundary_figure(images, record, *plots.input_normalization(model))
    plots.save_figure(figure, "boundaries.png")

Read top to bottom:
1. `trace_batches`: one eval-mode, no-grad trace of many images in batches, as one `TraceRecord`.
2. Alignment with object outlines on COCO: a boundary is the transition between two patches consecutive in the
   tower's reading order, aligned when an object outline separates them (different sets of objects cover the two
   patch centres). Per image the share of boundaries aligned, averaged over images with a bootstrap CI, against
   uniform and random boundaries at the same count per image and the chance rate (`alignment`).
3. `python -m dtplib.viz align --model NAME [--checkpoint PATH]` (the alignment table) and
   `python -m dtplib.viz overlay ...` (overlays.png, token_grid.png, tokens_hist.png, drawn by `dtplib.figures.plots`).
4. The same photos grouped by each method (`trace_methods`, `draw_methods`; `python -m dtplib.viz methods`): DTP's
   learned runs, uniform pooling and the field's reductions (docs/reductions.md) at one arch and compression, each
   tower seeded at random init or from trained weights where given, traced on the same photos for
   `plots.methods_figure`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..common.images import load_images, open_rgb
from ..common.paths import data_root, repo_path
from ..common.progress import progress
from ..common.runtime import seed_everything
from ..measure.stats import bootstrap_ci
from ..tower.clip import create_model_and_transforms, parse_dtp_name
from ..tower.config import REDUCTIONS
from ..tower.control import fit_boundary_prior, get_tower, trace
from ..tower.model import TraceRecord
from ..tower.order import patch_order
from ..tower.weights import load_weights
from ..training.checkpoint import load_trained
from .plots import (
    REDUCTION_FAMILIES,
    boundary_figure,
    input_normalization,
    methods_figure,
    patch_shape,
    save_figure,
    token_grid,
    tokens_histogram,
)

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
            for start in progress(range(0, len(images), batch_size), desc="boundaries"):
                batch = images[start:start + batch_size]
                model.encode_image(batch) if hasattr(model, "encode_image") else model(batch)
                records.append(t.last())
    finally:
        model.train(was_training)
    cat = lambda name: torch.cat([getattr(r, name) for r in records])  # noqa: E731
    return TraceRecord(boundaries=cat("boundaries"), segment_ids=cat("segment_ids"), probs=cat("probs"),
                       tokens=cat("tokens"), compression=cat("compression"),
                       boundary_loss=torch.stack([r.boundary_loss for r in records]).mean(), grid=records[0].grid,
                       patch_order=records[0].patch_order)


# ----------------------------------------------------------------------------------------------------------
# 2. Alignment with object outlines (COCO polygons)


@dataclass
class OutlinedImage:
    """A COCO image and the outlines of its objects, in the original image's pixels."""

    path: Path
    width: int
    height: int
    objects: list[list[np.ndarray]]  # per non-crowd instance, its polygons (each K x 2, (x, y))

    @property
    def polygons(self) -> list[np.ndarray]:
        """Every object's polygons in one list."""
        return [polygon for parts in self.objects for polygon in parts]


def coco_outlines(coco_dir: str | Path = COCO_MINI, splits: Sequence[str] = ("train2017", "val2017"),
                  num_images: int | None = None) -> list[OutlinedImage]:
    """Images with at least one object polygon (`annotations/instances_<split>.json`), sorted by split and name,
    with their polygons grouped by instance. Crowd annotations (run-length masks, not outlines) are left out."""
    coco_dir = repo_path(coco_dir)
    found = []
    for split in splits:
        path = coco_dir / "annotations" / f"instances_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"COCO instance annotations not found: {path}")
        coco = json.loads(path.read_text())
        objects: dict[int, list[list[np.ndarray]]] = {}
        for ann in coco["annotations"]:
            if ann.get("iscrowd") or not isinstance(ann["segmentation"], list):
                continue
            flats = [flat for flat in ann["segmentation"] if len(flat) >= 4]
            parts = [np.asarray(flat, dtype=np.float64).reshape(-1, 2) for flat in flats]
            if parts:
                objects.setdefault(ann["image_id"], []).append(parts)
        for info in sorted(coco["images"], key=lambda i: i["file_name"]):
            file = coco_dir / split / info["file_name"]
            if info["id"] in objects and file.is_file():
                found.append(OutlinedImage(file, info["width"], info["height"], objects[info["id"]]))
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


def patch_objects(objects: Sequence[Sequence[np.ndarray]], size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(N, M) bool: which of the M objects (each a list of polygons, in the picture's pixels) cover each patch
    (raster order). An object covers a patch when the patch centre lies inside one of its polygons (even-odd rule;
    a polygon with fewer than 3 points covers nothing). The centre, not the share of the patch's area: exact, and
    an object smaller than a patch that covers no centre separates no patches. Parts outside the picture are ignored."""
    patch_h, patch_w = patch_shape(size, grid)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centre_x, centre_y = ((cols.ravel() + 0.5) * patch_w)[:, None], ((rows.ravel() + 0.5) * patch_h)[:, None]  # N x 1
    cover = np.zeros((grid[0] * grid[1], len(objects)), dtype=bool)
    for j, polygons in enumerate(objects):
        for polygon in polygons:
            x0, y0 = polygon[:, 0], polygon[:, 1]  # K
            x1, y1 = np.roll(x0, -1), np.roll(y0, -1)  # closing the polygon
            crosses = (y0 > centre_y) != (y1 > centre_y)  # N x K: edges that span the centre's height
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x0 + (centre_y - y0) * (x1 - x0) / (y1 - y0)  # N x K: where the edge is at that height
            cover[:, j] |= (crosses & (centre_x < x_at)).sum(1) % 2 == 1  # a ray to the right crosses an odd count
    return cover


def patch_regions(cover) -> np.ndarray:
    """(N,) int labels from (N, M) cover: two patches get the same label exactly when the same set of objects
    covers them (label 0: the set that the first patch has)."""
    cover = np.asarray(cover, dtype=bool)
    if cover.shape[1] == 0:
        return np.zeros(len(cover), dtype=np.int64)
    _, first, inverse = np.unique(cover, axis=0, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse.reshape(-1)].astype(np.int64)  # labels in order of appearance


def coco_patch_regions(preprocess, grid: tuple[int, int], coco_dir: str | Path = COCO_MINI,
                       num_images: int | None = None) -> tuple[torch.Tensor, np.ndarray, list[Path]]:
    """COCO images through the model's preprocess (B x 3 x H x W), each patch's region label in that geometry
    (B x N int, raster order: equal labels = covered by the same set of objects, `patch_objects`), and the files."""
    images, regions, files = [], [], []
    for item in progress(coco_outlines(coco_dir, num_images=num_images), desc="COCO outlines"):
        images.append(preprocess(open_rgb(item.path)))  # 3 x H x W
        scale, offset, size = preprocess_geometry(preprocess, item.width, item.height)
        moved = [[polygon * scale - offset for polygon in parts] for parts in item.objects]
        regions.append(patch_regions(patch_objects(moved, size, grid)))
        files.append(item.path)
    return torch.stack(images), np.stack(regions), files


def _reading_order(order, num_patches: int) -> np.ndarray:
    """The reading order as grid indices (N,): `order` given (a permutation of range(N)), or raster when None."""
    if order is None:
        return np.arange(num_patches)
    order = np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order, dtype=np.int64).reshape(-1)
    if len(order) != num_patches or not np.array_equal(np.sort(order), np.arange(num_patches)):
        raise ValueError(f"a reading order must be a permutation of the {num_patches} patches")
    return order


def aligned_transitions(regions, order=None) -> np.ndarray:
    """B x (N-1) bool: transition t (between patches order[t] and order[t+1], consecutive in the reading order)
    is aligned when an object outline separates the two patches: different sets of objects cover them."""
    regions = np.asarray(regions)
    order = _reading_order(order, regions.shape[1])
    return regions[:, order[:-1]] != regions[:, order[1:]]


def boundary_alignment(boundaries, regions, order=None) -> np.ndarray:
    """Per image (B,): the share of its boundaries that are aligned transitions (`aligned_transitions`).

    `boundaries` are B x N at grid positions, as `dtplib.trace` reports them: the flag of grid patch p says that
    the run closes after p, so the boundary of patch order[t] is transition t. The forced boundary after the last
    patch of the reading order is no transition and is left out. NaN for an image with no other boundary."""
    boundaries = np.asarray(boundaries.cpu() if isinstance(boundaries, torch.Tensor) else boundaries, dtype=bool)
    order = _reading_order(order, boundaries.shape[1])
    chosen = boundaries[:, order[:-1]]  # B x (N-1), in reading order
    hits = (chosen & aligned_transitions(regions, order)).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chosen.any(1), hits / chosen.sum(1), np.nan)


def chance_alignment(regions, order=None) -> np.ndarray:
    """Per image (B,): the share of all N - 1 transitions of the reading order that are aligned; what a boundary
    at a random transition scores on average. Near 1, every boundary looks aligned (a saturated metric)."""
    return aligned_transitions(regions, order).mean(1)


def uniform_boundaries(counts, num_patches: int) -> np.ndarray:
    """B x N bool in reading order: for an image with k segments, k boundaries spread evenly, at floor(j N / k) - 1
    for j = 1..k; the last one is the last patch, as the model's forced boundary. k = N / c gives one every c."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros((len(counts), num_patches), dtype=bool)
    for i, k in enumerate(counts):
        if not 1 <= k <= num_patches:
            raise ValueError(f"an image needs 1 to {num_patches} segments, got {k}")
        out[i, (np.arange(1, k + 1) * num_patches) // k - 1] = True
    return out


def random_boundaries(counts, num_patches: int, generator: np.random.Generator) -> np.ndarray:
    """B x N bool in reading order: for an image with k segments, k - 1 boundaries at random among the first N - 1
    positions (without replacement) and the forced one on the last."""
    counts = np.asarray(counts, dtype=np.int64)
    ranks = generator.random((len(counts), num_patches - 1)).argsort(-1).argsort(-1)  # B x (N-1), a permutation
    chosen = ranks < (counts[:, None] - 1)  # B x (N-1)
    return np.concatenate([chosen, np.ones((len(counts), 1), dtype=bool)], axis=1)  # B x N


def at_grid_positions(boundaries, order=None) -> np.ndarray:
    """B x N boundaries in reading order (position t = after patch order[t]) -> at grid positions, as traces."""
    boundaries = np.asarray(boundaries, dtype=bool)
    out = np.zeros_like(boundaries)
    out[:, _reading_order(order, boundaries.shape[1])] = boundaries
    return out


def alignment_table(boundaries, regions, order=None, draws: int = 100, seed: int = 0,
                    resamples: int = 1000) -> pd.DataFrame:
    """Alignment of the given boundaries (B x N, grid positions), of uniform ones and of random ones with the same
    count per image, placed along the reading order `order` (grid indices; None: raster). `regions` (B x N, grid
    positions) label each patch by the set of objects that cover it (`coco_patch_regions`).

    One row per kind of boundaries. Columns: alignment (mean over images of the share of an image's boundaries that
    are aligned transitions, `boundary_alignment`; random: each image's share averaged over `draws` seeded draws
    first), ci low and ci high (95% bootstrap interval over images, `dtplib.measure.stats.bootstrap_ci`), std (random:
    of the alignment over draws), chance (mean over images of the share of all transitions that are aligned: random
    boundaries score this on average, and near 1 the metric is saturated), boundaries per image (the forced last
    one not counted), images (those scored: an image with no boundary but the forced one has no score and is left
    out of every row and of the chance rate).
    """
    boundaries = np.asarray(boundaries.cpu() if isinstance(boundaries, torch.Tensor) else boundaries, dtype=bool)
    regions = np.asarray(regions)
    if boundaries.shape != regions.shape:
        raise ValueError(f"boundaries {boundaries.shape} and regions {regions.shape} differ in shape")
    num_images, num_patches = boundaries.shape
    order = _reading_order(order, num_patches)
    counts = boundaries[:, order[:-1]].sum(1) + 1  # B, segments per image
    scored = counts > 1
    if not scored.any():
        raise ValueError("no image has a boundary besides the forced last one: nothing to score")
    generator = np.random.default_rng(seed)
    random = np.stack([boundary_alignment(at_grid_positions(random_boundaries(counts, num_patches, generator), order),
                                          regions, order) for _ in range(draws)])  # draws x B
    per_image = {"learned": boundary_alignment(boundaries, regions, order),
                 "uniform (same count)": boundary_alignment(
                     at_grid_positions(uniform_boundaries(counts, num_patches), order), regions, order),
                 "random (same count)": random.mean(0)}
    common = {"chance": float(chance_alignment(regions, order)[scored].mean()),
              "boundaries per image": float(counts[scored].mean() - 1), "images": int(scored.sum())}
    rows = []
    for name, scores in per_image.items():
        interval = bootstrap_ci(scores[scored], resamples=resamples, seed=seed)
        spread = float(np.std(random[:, scored].mean(1))) if name.startswith("random") else float("nan")
        rows.append({"boundaries": name, "alignment": interval.value, "ci low": interval.low,
                     "ci high": interval.high, "std": spread, **common})
    return pd.DataFrame(rows)


def alignment(model: torch.nn.Module, preprocess, coco_dir: str | Path = COCO_MINI, num_images: int | None = None,
              batch_size: int = 64, draws: int = 100, seed: int = 0) -> pd.DataFrame:
    """How often the model's eval-time boundaries, read along the tower's patch order, separate patches that COCO
    objects cover differently, next to uniform and random boundaries with the same count per image and the chance
    rate (`alignment_table`)."""
    tower = get_tower(model)
    kind = getattr(tower.dtp, "patch_order", "raster")
    order = patch_order(kind, *tower.grid)
    images, regions, _ = coco_patch_regions(preprocess, tower.grid, coco_dir, num_images)
    record = trace_batches(model, images, batch_size)
    table = alignment_table(record.boundaries, regions, order, draws, seed)
    return table.assign(compression=record.budget, target=tower.dtp.compression, order=kind,
                        grid=f"{tower.grid[0]}x{tower.grid[1]}", patch_size=tower.patch_embed.patch_size[0])


RANDOM_WEIGHTS_NOTE = "random weights, not trained: these boundaries say nothing about the images"


def add_note(figure, note: str = RANDOM_WEIGHTS_NOTE):
    """`figure` (a matplotlib Figure) with `note` in red at its top, above any title it has, so that a picture drawn
    from untrained weights says so inside itself wherever it is copied; an empty note leaves it as it is."""
    if note:
        title = figure.get_suptitle()
        figure.suptitle(f"{note}\n{title}" if title else note, color="tab:red", fontsize=10)
    return figure


def draw_overlays(model: torch.nn.Module, preprocess, images_dir: str | Path, out: str | Path, num_images: int = 64,
                  shown: int = 6, grid: int = 24, batch_size: int = 64, note: str = "") -> Path:
    """overlays.png (segments, boundary probabilities, tokens kept), token_grid.png and tokens_hist.png in `out`
    for the first `num_images` photos (sorted names) of a folder, as the model reads them at eval time. `note`
    (e.g. RANDOM_WEIGHTS_NOTE for an untrained model) goes on top of each figure (`add_note`)."""
    from matplotlib import pyplot

    from ..common.images import load_photos

    images, _ = load_photos(images_dir, num_images, preprocess)
    record = trace_batches(model, images, batch_size)
    mean, std = input_normalization(model)
    tower = get_tower(model)
    out = Path(out)
    for name, figure in (("overlays.png", boundary_figure(images, record, mean, std, count=shown)),
                         ("token_grid.png", token_grid(images, record, mean, std, count=grid)),
                         ("tokens_hist.png", tokens_histogram(record.tokens, tower.num_patches,
                                                              tower.dtp.compression))):
        if not isinstance(figure, np.ndarray):
            add_note(figure, note)
        save_figure(figure, out / name)
        if not isinstance(figure, np.ndarray):
            pyplot.close(figure)
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. Command line


# ----------------------------------------------------------------------------------------------------------
# 4. The same photos grouped by each method


METHODS = ("dtp", "uniform", *(r for r in REDUCTIONS if r != "dtp"))  # the figure's columns, in this order
METHOD_TITLES = {"dtp": "DTP", "uniform": "uniform pooling", **REDUCTION_FAMILIES}
RANDOM_INIT = "random init"  # a column's note when its tower is untrained


@dataclass
class MethodTraces:
    """What `plots.methods_figure` draws: the photos as every method's tower reads them, and per column (a
    method's title, "..., trained" from trained weights) its trace and its note ("random init", or "" for trained
    weights and uniform pooling)."""

    images: torch.Tensor  # B x 3 x H x W, normalised
    records: dict[str, TraceRecord]
    notes: dict[str, str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _check_method(model: torch.nn.Module, method: str, compression: float, source: str) -> None:
    """A ValueError unless `model` (from `source`) is `method`'s tower at `compression`."""
    dtp = get_tower(model).dtp
    found = "uniform" if dtp.forced_boundaries else dtp.reduction
    if found != method or dtp.compression != compression:
        raise ValueError(f"weights {source} are a {found!r} tower at {dtp.compression:g}x, not {method!r} at "
                         f"{compression:g}x")


def method_model(method: str, name: str, weights: str | Path | None = None, seed: int = 0):
    """(model in eval mode, preprocess_val, trained) of one method's tower at the arch and compression of a DTP name
    (`DTP-ViT-Ti-8-64-4x`): from `weights` (a shipped name or weights file, `dtplib.load_weights`; or a
    `dtplib.train` checkpoint) when given, else seeded at random init (the same trunk for every method)."""
    parsed = parse_dtp_name(name)
    if parsed is None or parsed[1] <= 1 or parsed[2]:
        raise ValueError(f"{name!r}: the methods need a DTP name that pools without upsampling, e.g. "
                         "DTP-ViT-Ti-8-64-4x")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    arch, compression, _ = parsed
    if weights:
        path = Path(weights)
        trained = repo_path(path).is_file() and path.suffix != ".safetensors"
        model, preprocess = (load_trained(repo_path(path)) if trained else load_weights(weights))[:2]
        _check_method(model, method, compression, str(weights))
        return model.eval(), preprocess, True
    seed_everything(seed)
    options = {"forced_boundaries": int(compression)} if method == "uniform" else \
        {"reduction": method} if method != "dtp" else {}
    model, _, preprocess = create_model_and_transforms(arch, compression, **options)
    return model.eval(), preprocess, False


def trace_methods(files: Sequence[str | Path], name: str = "DTP-ViT-Ti-8-64-4x",
                  weights: Mapping[str, str | Path] | None = None, methods: Sequence[str] = METHODS, seed: int = 0,
                  prior_steps: int = 100) -> MethodTraces:
    """Each method's tower (`method_model`: `weights[method]` where given, else seeded random init) traced on the
    same photo files. An untrained DTP predictor is first fitted to its prior on these photos (`prior_steps`), so
    it keeps about its budget; the reductions keep exactly theirs. Uniform pooling has no weights to train."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(methods))
    if unknown:
        raise ValueError(f"weights for {unknown}, which are not among the methods {list(methods)}")
    images, records, notes, normalisation = None, {}, {}, None
    for method in methods:
        model, preprocess, trained = method_model(method, name, weights.get(method), seed)
        if images is None:
            images, normalisation = load_images(files, preprocess), input_normalization(model)
        if method == "dtp" and not trained and prior_steps:
            fit_boundary_prior(model, images, steps=prior_steps, seed=seed)
        title = METHOD_TITLES[method] + (", trained" if trained else "")
        records[title] = trace_batches(model, images)
        notes[title] = "" if trained or method == "uniform" else RANDOM_INIT
    return MethodTraces(images, records, notes, *normalisation)


def draw_methods(files: Sequence[str | Path], out: str | Path, name: str = "DTP-ViT-Ti-8-64-4x",
                 weights: Mapping[str, str | Path] | None = None, methods: Sequence[str] = METHODS,
                 seed: int = 0) -> Path:
    """`plots.methods_figure` of `trace_methods` saved as the PNG `out`."""
    from matplotlib import pyplot

    traces = trace_methods(files, name, weights, methods, seed)
    figure = methods_figure(traces.images, traces.records, traces.mean, traces.std, traces.notes)
    path = save_figure(figure, out)
    pyplot.close(figure)
    return path
