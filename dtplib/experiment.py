"""Experiment grids: every (arm, seed) a `dtplib.train` run, one table of every epoch, a summary with intervals.

`python -m dtplib.experiment --grid experiments/smallrun.toml --out results/smallrun` reads a grid file (TOML, or
JSON with the same structure) and trains each (arm, seed) in `<out>/runs/<arm>-seed<seed>` as
`python -m dtplib.train ... --logs <out>/runs --name <arm>-seed<seed> --resume latest`, in a process of its own.
A run whose epochs.csv has --epochs rows is finished and skipped; a killed one resumes from its newest checkpoint,
so the command can be repeated, and a grid can be run in pieces (`--arms`, `--seeds`, `--max-runs`).

Grid file:

    reference = "1x"            # the arm the paired differences are taken against (optional)
    nproc_per_node = 8          # optional: train every run under torchrun with 8 processes (GPUs)
    seeds = [0, 1]
    metrics = ["text_to_image_R@10"]        # optional: summary rows (default: every evaluation column)
    figure_metrics = ["zeroshot_top1"]      # optional: one curves figure each (default: the first evaluated)
    [data.from_captions]        # optional: shards written once by dtplib.shards.from_captions (skipped when
    images = "$DTPLIB_DATA/flickr8k/images"  # out/stats.json exists); its keyword arguments, paths may start
    captions = "$DTPLIB_DATA/flickr8k/captions.tsv"  # with $DTPLIB_DATA, others are from the repository root
    out = "logs/data/flickr8k-64"
    [shared]                    # flags of every run: the fields of dtplib.config.TrainConfig (--lr -> lr)
    model = "ViT-Ti-8-64"
    [final]                     # optional: `dtplib.evaluate` flags for each complete run's last checkpoint,
    val_data = "logs/data/flickr8k-64/test"  # run once per run (its final.json), e.g. on the test split
    bootstrap = 1000
    [timing]                    # optional: time the training step of every arm's final checkpoint (this seed's
    seed = 0                    # runs) in turn in one process, once all of them are finished: step_times.csv
    contrasts = [["4x", "1x"]]  # optional: (arm, against) pairs differenced on each seed: contrasts.csv
    [alignment]                 # optional: COCO outline alignment of every finished run of `arms` (default: the
    num_images = 200            # learned-boundary arms), keys ALIGNMENT_KEYS; overlays = [arm, ...] draws
    overlays = ["4x"]           # overlays/<arm>/ for their overlay_seed runs
    [arms.1x]                   # each arm's own flags, over the shared ones
    compression = 1
    seeds = [0, 1, 2]           # optional: this arm's own seeds instead of the grid's

Everything is checked before any training: unknown keys (one line naming the bad key), flag types and choices
(TrainConfig's parser), then `dtplib.train.check_args` on every run in one child process (missing data, bad
model names), since no package module imports `dtplib.train`. A run folder trained with other flags than the grid
now gives (a grid edited between pieces) is refused.

Outputs in `<out>`:
- `runs.csv`: one row per run and epoch: arm, seed, model (`dtplib.specs.trained_label`: what the run trained, in
  the benchmark's spec labels), epoch (0-based, as epochs.csv) and epochs_done, complete, every
  column of the run's epochs.csv (its evaluations included), steps, samples_seen, train_time_s (cumulative sum of
  steps.csv's step times: data loading and evaluation excluded), gmacs_per_image (analytic image-tower forward
  MACs per image at the epoch's realised training compression, and with --force-patch-dropout its kept tokens),
  text_gmacs, train_gmacs (cumulative forward MACs of both towers over the samples seen; a backward pass costs about
  twice a forward, not counted), train_image_gmacs (the image tower's share), the run's provenance from its
  params.json (commit, hardware, torch, dtype, batch_size) and the arm's flags.
  With a [final] table, the last epoch's row also has `final_<metric>` columns from the run's final.json (with
  --bootstrap their per-run intervals, `final_<metric>_ci_low/_ci_high`).
- `summary.md`: per arm the last epoch's metrics of the complete runs, mean and 95% Student-t interval over seeds
  (mean +- t(0.975, n-1) sd / sqrt(n): with 2 seeds t = 12.7, wide as it should be), paired differences against
  the reference arm (same seed), and which runs are complete, partial or missing.
- `step_times.csv` ([timing]): per arm, the median, p10 and p90 of the whole training step of its final
  checkpoint (its own AdamW kernel, fp32, one batch of real photos, `steps` timed steps after `warmup`, all arms
  interleaved), the speed-up against the reference arm and the analytic bound; summary.md shows it.
- `contrasts.csv` (`contrasts`): `contrast_table`: paired differences at the last epoch and at equal cost.
- `alignment.csv`, `overlays/<arm>/` ([alignment]): `align_runs`, once per finished run.
- `curves_<metric>.png`: the metric against cumulative training time and against training GMACs, mean over seeds
  with 95% t-interval bars (`dtplib.plots.accuracy_curves`).
- `.gitignore`: the runs' checkpoints and TensorBoard events stay out of git; their CSVs and params.json do not.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dtplib import bench, evaluate, plots
from dtplib.clip import build_from_config, resolve_model
from dtplib.config import TrainConfig
from dtplib.flops import analytic_macs, image_tower, patch_count, text_macs, total
from dtplib.shards import from_captions
from dtplib.specs import trained_label
from dtplib.stats import t_interval
from dtplib.utils import (
    PATH_FLAGS,
    REPO_ROOT,
    append_csv,
    atomic_write_text,
    data_path,
    flags,
    markdown_table,
    repo_path,
    run_cli,
    run_info,
    stop_process,
)

TOP_LEVEL = ("reference", "seeds", "shared", "arms", "data", "final", "timing", "metrics", "figure_metrics",
             "description", "nproc_per_node", "contrasts", "alignment")
CONTRASTS_FILE = "contrasts.csv"  # paired differences of the `contrasts` pairs, at the last epoch and at equal cost
COST_AXES = ("train_time_s", "train_gmacs")  # the cost axes of the equal-cost contrasts (runs.csv columns)
ALIGNMENT_FILE = "alignment.csv"  # [alignment]: COCO outline alignment of each complete run of its arms
ALIGNMENT_KEYS = {"arms": None, "coco": "$DTPLIB_DATA/coco-mini", "num_images": None, "draws": 100, "batch_size": 64,
                  "overlays": [], "overlay_seed": 0, "overlay_images": "$DTPLIB_DATA/flickr8k/images"}
TIMING_FILE = "step_times.csv"  # [timing]: the interleaved benchmark of the final checkpoints
TIMING_KEYS = {"seed": 0, "steps": 30, "warmup": 5, "batch_size": None}  # None: the runs' own batch size
FINAL_FILE = "final.json"  # a run folder's [final] evaluation (dtplib.evaluate --output)
FINAL_SET_BY_DRIVER = ("checkpoint", "compare", "model", "pretrained", "output")
FINAL_PATH_FLAGS = ("val_data", "zeroshot_data", "imagenet_val", "probe_data")
DRIVER_FLAGS = ("logs", "name", "resume", "seed")  # set by the driver for each run
RUNTIME_FLAGS = ("workers", "threads", "device", "dist_backend", "report_to", "log_every_n_steps",
                 *PATH_FLAGS)  # may change between the pieces of a grid without changing what a run trains
# epochs.csv columns that describe the training itself, not an evaluation (shown in runs.csv, not in the summary)
TRAINING_COLUMNS = ("epoch", "first_epoch", "steps", "loss", "contrastive_loss", "boundary_loss", "lr_end",
                    "step_time_s", "step_time_median_s", "data_time_s", "samples_per_s", "warmup_step_time_s",
                    "peak_memory_mb", "checkpoint", "capacity_bound_steps", "capacity_dropped")
NOT_A_METRIC = re.compile(r"skipped|_images$|_texts$|_count$|_items$|(_ci)?_(low|high|lo|hi)$|_ci$")
COST_COLUMNS = ("compression", "gmacs_per_image", "samples_seen", "train_time_s", "train_gmacs")
DRIVER_COLUMNS = ("arm", "seed", "model", "epoch", "epochs_done", "complete", "steps", "samples_seen", "train_time_s",
                  "gmacs_per_image", "text_gmacs", "train_gmacs", "train_image_gmacs", "commit", "hardware", "torch",
                  "dtype", "batch_size", "flags", "run")
FIGURE_DEFAULTS = ("zeroshot_top1", "text_to_image_R@10", "image_to_text_R@10", "imagenet_top1")
# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion
CHECK_SCRIPT = """
import json, sys
from dtplib import train
for label, argv in json.loads(sys.argv[1]):
    try:
        train.check_args(train.parse_args(argv), int(sys.argv[2]))
    except (ValueError, OSError) as error:
        sys.stderr.write(f"{label}: {' '.join(str(error).split())}\\n")
        sys.exit(2)
"""


class RunFailed(RuntimeError):
    """A `dtplib.train` child process ended with an error: the grid stops there (its message names the run)."""


# ----------------------------------------------------------------------------------------------------------
# 1. The grid file


@dataclass
class Grid:
    """A parsed, checked grid: `runs()` lists its (arm, seed) runs, seed by seed."""

    path: Path
    seeds: list[int]
    shared: dict
    arms: dict[str, dict]
    reference: str | None = None
    data: dict | None = None
    metrics: list[str] | None = None
    figure_metrics: list[str] | None = None
    description: str = ""
    final: dict | None = None  # dtplib.evaluate flags for each complete run's last checkpoint
    timing: dict | None = None  # [timing] with its defaults filled in
    arm_seeds: dict[str, list[int]] | None = None  # arms with their own `seeds = [...]` (the others: `seeds`)
    nproc_per_node: int = 1  # > 1: every run trains under torchrun with this many processes
    contrasts: list[tuple[str, str]] | None = None  # (arm, against) pairs: contrasts.csv and their summary tables
    alignment: dict | None = None  # [alignment] with its defaults filled in (arms: the learned-boundary arms)

    def options(self, arm: str, seed: int) -> dict:
        """The run's TrainConfig fields as the grid gives them (paths as written), seed included."""
        return {**self.shared, **self.arms[arm], "seed": seed}

    def seeds_of(self, arm: str) -> list[int]:
        return (self.arm_seeds or {}).get(arm, self.seeds)

    def runs(self, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[tuple[str, int]]:
        every_seed = list(dict.fromkeys([*self.seeds, *(s for arm in self.arms for s in self.seeds_of(arm))]))
        return [(arm, seed) for seed in every_seed if seeds is None or seed in seeds
                for arm in self.arms if (arms is None or arm in arms) and seed in self.seeds_of(arm)]


def shown_path(path: Path) -> str:
    """A path as the report shows it: from the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def run_label(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def read_grid_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} grid: {error}") from None


def _close(name: str, names: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_flags(where: str, options: dict) -> None:
    """Keys of a [shared] or [arms.X] table: TrainConfig fields, not set by the driver, booleans as booleans."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a table of flags, got {type(options).__name__}")
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in options.items():
        if key not in known:
            hint = _close(key.replace("-", "_"), list(known))
            raise ValueError(f"{where}: unknown flag {key!r}: not a dtplib.train flag (the TrainConfig field names, "
                             f"e.g. train_data for --train-data){hint}")
        if key in DRIVER_FLAGS:
            instead = "seeds = [...]" if key == "seed" else "--out"
            raise ValueError(f"{where}: {key!r} is set by the driver for each run (use {instead})")
        if isinstance(known[key].default, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}: {key} is a switch: give true or false, got {value!r}")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: {key} must be a single value, got {value!r}")


def check_seeds(where: str, seeds) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"{where} must be a list of distinct integers, got {seeds!r}")
    return seeds


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file: structure and flag names, without touching data or models."""
    path = repo_path(path)
    raw = read_grid_file(path)
    unknown = [key for key in raw if key not in TOP_LEVEL]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}{_close(unknown[0], TOP_LEVEL)}; a grid has "
                         f"{', '.join(TOP_LEVEL)} (flags go in [shared] or [arms.NAME])")
    seeds = check_seeds(f"{path}: seeds", raw.get("seeds", [0]))
    arms = raw.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"{path}: no arms: add [arms.NAME] tables (an empty table runs the shared flags alone)")
    arm_seeds = {}
    for arm in arms:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arm):
            raise ValueError(f"{path}: arm name {arm!r}: use letters, digits and _ . + - (it names a run folder)")
        if isinstance(arms[arm], dict) and "seeds" in arms[arm]:
            arms[arm] = dict(arms[arm])
            arm_seeds[arm] = check_seeds(f"{path}: [arms.{arm}] seeds", arms[arm].pop("seeds"))
    shared = raw.get("shared", {})
    check_flags(f"{path.name} [shared]", shared)
    for arm, options in arms.items():
        check_flags(f"{path.name} [arms.{arm}]", options)
    reference = raw.get("reference")
    if reference is not None and reference not in arms:
        raise ValueError(f"{path}: reference {reference!r} is not an arm (arms: {', '.join(arms)})")
    data = raw.get("data")
    if data is not None:
        if not isinstance(data, dict) or set(data) != {"from_captions"}:
            raise ValueError(f"{path}: [data] holds one table, [data.from_captions] (dtplib.shards.from_captions "
                             "arguments)")
        accepted = set(inspect.signature(from_captions).parameters)
        bad = sorted(set(data["from_captions"]) - accepted)
        missing = sorted({"images", "captions", "out"} - set(data["from_captions"]))
        if bad or missing:
            problem = f"unknown argument {bad[0]!r}{_close(bad[0], sorted(accepted))}" if bad else \
                f"needs {', '.join(missing)}"
            raise ValueError(f"{path}: [data.from_captions] {problem}")
    lists = {}
    for key in ("metrics", "figure_metrics"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {key} must be a list of column names, got {value!r}")
        lists[key] = value
    final = check_final(path.name, raw["final"]) if "final" in raw else None
    timing = check_timing(path.name, raw["timing"]) if "timing" in raw else None
    nproc = raw.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"{path}: nproc_per_node must be an integer >= 1 (processes per run, under torchrun), "
                         f"got {nproc!r}")
    contrasts = check_contrasts(path.name, raw["contrasts"], arms) if "contrasts" in raw else None
    grid = Grid(path, seeds, shared, arms, reference, data, **lists, description=str(raw.get("description", "")),
                final=final, timing=timing, arm_seeds=arm_seeds or None, nproc_per_node=nproc, contrasts=contrasts)
    for arm in arms:  # types and choices, by the training command's own parser
        parse_options(grid.options(arm, seeds[0]), f"{path.name} [arms.{arm}]")
    if "alignment" in raw:
        grid.alignment = check_alignment(path.name, raw["alignment"], grid)
    return grid


def check_contrasts(where: str, contrasts, arms: dict) -> list[tuple[str, str]]:
    """`contrasts = [["learned-4x", "uniform-4x"], ...]`: pairs of two different arms (arm, against)."""
    if not isinstance(contrasts, list) or not contrasts:
        raise ValueError(f"{where}: contrasts must be a list of [arm, against] pairs, got {contrasts!r}")
    pairs = []
    for pair in contrasts:
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(a, str) for a in pair):
            raise ValueError(f"{where}: contrasts: {pair!r} is not a pair of arm names [arm, against]")
        for arm in pair:
            if arm not in arms:
                raise ValueError(f"{where}: contrasts: {arm!r} is not an arm{_close(arm, list(arms))}")
        if pair[0] == pair[1]:
            raise ValueError(f"{where}: contrasts: {pair!r} compares an arm with itself")
        pairs.append((pair[0], pair[1]))
    return pairs


def pooling_arms(grid: Grid) -> dict[str, bool]:
    """The arms whose tower pools tokens (DTP at compression > 1, by --compression, --forced-boundaries or a
    DTP-ViT-* name), each with whether it predicts its boundaries (no --forced-boundaries)."""
    arms = {}
    for arm in grid.arms:
        config = parse_options(grid.options(arm, grid.seeds_of(arm)[0]), arm)
        compression = resolve_model(config.model, config.target_compression, config.upsample)[1]
        if compression is not None and compression > 1:
            arms[arm] = config.forced_boundaries is None
    return arms


def learned_arms(grid: Grid) -> list[str]:
    """Arms whose tower predicts its boundaries: DTP (compression > 1) without --forced-boundaries."""
    return [arm for arm, learned in pooling_arms(grid).items() if learned]


def check_alignment(where: str, table, grid: Grid) -> dict:
    """An [alignment] table: arms (default: every learned-boundary arm), coco, num_images, draws, batch_size,
    overlays (arms whose overlay_seed run gets overlay figures), overlay_seed, overlay_images."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [alignment] must be a table ({', '.join(ALIGNMENT_KEYS)}), got {table!r}")
    for key in table:
        if key not in ALIGNMENT_KEYS:
            raise ValueError(f"{where}: [alignment] unknown key {key!r}{_close(key, list(ALIGNMENT_KEYS))}; it "
                             f"takes {', '.join(ALIGNMENT_KEYS)}")
    spec = {**ALIGNMENT_KEYS, **table}
    dtp = pooling_arms(grid)
    if spec["arms"] is None:
        spec["arms"] = learned_arms(grid)
    for key in ("arms", "overlays"):
        if not isinstance(spec[key], list) or not all(isinstance(a, str) for a in spec[key]):
            raise ValueError(f"{where}: [alignment] {key} must be a list of arm names, got {spec[key]!r}")
        for arm in spec[key]:
            if arm not in grid.arms:
                raise ValueError(f"{where}: [alignment] {key}: {arm!r} is not an arm{_close(arm, list(grid.arms))}")
            if arm not in dtp:
                raise ValueError(f"{where}: [alignment] {key}: arm {arm!r} pools no tokens (compression 1): it has "
                                 "no boundaries to align")
    for key in ("draws", "batch_size", "overlay_seed", "num_images"):
        value, least = spec[key], 0 if key == "overlay_seed" else 1
        if key == "num_images" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}: [alignment] {key} must be an integer >= {least}, got {value!r}")
    for key in ("coco", "overlay_images"):
        if not isinstance(spec[key], str):
            raise ValueError(f"{where}: [alignment] {key} must be a path, got {spec[key]!r}")
    return spec


def check_final(where: str, final) -> dict:
    """A [final] table: `python -m dtplib.evaluate` flags (field names, as in [shared]) with at least one data flag,
    checked by that command's own parser; the checkpoint and output are the driver's."""
    if not isinstance(final, dict) or not any(key in final for key in FINAL_PATH_FLAGS):
        raise ValueError(f"{where}: [final] must be a table of dtplib.evaluate flags with at least one of "
                         f"{', '.join(FINAL_PATH_FLAGS)}, got {final!r}")
    parser = evaluate.build_parser()
    known = list(vars(parser.parse_args(["--checkpoint", "-"])))
    for key, value in final.items():
        if key not in known:
            raise ValueError(f"{where}: [final] unknown flag {key!r}: not a dtplib.evaluate flag"
                             f"{_close(key.replace('-', '_'), known)}")
        if key in FINAL_SET_BY_DRIVER:
            raise ValueError(f"{where}: [final] {key!r} is set by the driver (each run's last checkpoint)")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: [final] {key} must be a single value, got {value!r}")

    def error(message: str):
        raise ValueError(f"{where}: [final]: {message}")

    parser.error = error
    parser.parse_args(final_argv(final, "checkpoint.pt", "final.json"))
    return final


def check_timing(where: str, timing) -> dict:
    """A [timing] table: seed (whose runs are timed), warmup (>= 0), steps and batch_size (>= 1), integers."""
    if not isinstance(timing, dict):
        raise ValueError(f"{where}: [timing] must be a table ({', '.join(TIMING_KEYS)}), got {timing!r}")
    for key, value in timing.items():
        if key not in TIMING_KEYS:
            raise ValueError(f"{where}: [timing] unknown key {key!r}{_close(key, list(TIMING_KEYS))}; it takes "
                             f"{', '.join(TIMING_KEYS)}")
        least = 0 if key in ("seed", "warmup") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}: [timing] {key} must be an integer >= {least}, got {value!r}")
    return {**TIMING_KEYS, **timing}


def final_argv(final: dict, checkpoint: str | Path, output: str | Path) -> list[str]:
    """The `dtplib.evaluate` command line of a [final] table, paths as `resolved` gives them."""
    return flags(**resolved(final, FINAL_PATH_FLAGS), checkpoint=str(checkpoint), output=str(output))


def check_final_data(grid: Grid) -> None:
    """The [final] data exists (and class folders are not empty) before anything trains; paths inside the folder
    that [data.from_captions] writes are left to that step (a fresh clone has not made its shards yet)."""
    if grid.final:
        made = data_path(grid.data["from_captions"]["out"]).resolve() if grid.data else None
        paths = {key: path for key, path in resolved({k: v for k, v in grid.final.items() if k in FINAL_PATH_FLAGS},
                                                     FINAL_PATH_FLAGS).items()
                 if made is None or not Path(path).resolve().is_relative_to(made)}
        evaluate.check_data(paths.get("zeroshot_data"), paths.get("imagenet_val"), paths.get("val_data"),
                            bool(grid.final.get("zeroshot_skip_empty")), paths.get("probe_data"))


def shown_flags(options: dict) -> list[str]:
    """Flags as the grid writes them, paths unresolved (`$DTPLIB_DATA/...` stays), for the reports."""
    argv = []
    for key, value in options.items():
        if key in PATH_FLAGS and isinstance(value, str):
            argv += [f"--{key.replace('_', '-')}", value]
        else:
            argv += flags(**{key: value})
    return argv


def resolved(options: dict, path_flags: Sequence[str] = PATH_FLAGS) -> dict:
    """Path flags (dtplib.train's, or `path_flags`) with a leading $DTPLIB_DATA expanded, other relative paths
    from the repository root."""
    return {k: str(data_path(v)) if k in path_flags and isinstance(v, str) and "://" not in v else v
            for k, v in options.items()}


def parse_options(options: dict, where: str) -> TrainConfig:
    """The TrainConfig that `python -m dtplib.train` would parse from these options (a bad type or choice is a
    ValueError naming `where`); the model name and compression are checked too."""
    parser = TrainConfig.parser()

    def error(message: str):
        raise ValueError(f"{where}: {message}")

    parser.error = error  # argparse reports through error(): one line instead of exit 2
    config = TrainConfig(**vars(parser.parse_args(flags(**resolved(options)))))
    try:
        resolve_model(config.model, getattr(config, "target_compression", config.compression), config.upsample)
    except ValueError as problem:
        raise ValueError(f"{where}: {problem}") from None
    return config


# ----------------------------------------------------------------------------------------------------------
# 2. Running


def prepare_data(grid: Grid) -> None:
    """[data.from_captions]: the shards, written once (kept when their stats.json exists)."""
    if not grid.data:
        return
    options = dict(grid.data["from_captions"])
    for key in ("images", "captions", "out"):
        options[key] = data_path(options[key])
    stats_file = options["out"] / "stats.json"
    if stats_file.is_file():  # made before: by the same options, or refused
        made = json.loads(stats_file.read_text()).get("options", {})
        for key, value in options.items():
            if key in made and made[key] != value:
                raise ValueError(f"{stats_file.parent} holds shards made with {key}={made[key]!r}, the grid's "
                                 f"[data.from_captions] gives {value!r}: change its out, or delete the folder")
        return
    print(f"preparing shards in {options['out']}", flush=True)
    from_captions(options.pop("images"), options.pop("captions"), options.pop("out"), **options)


def run_argv(grid: Grid, arm: str, seed: int, runs_dir: Path) -> list[str]:
    return flags(**resolved(grid.options(arm, seed)), logs=runs_dir, name=run_label(arm, seed), resume="latest")


def check_runs(grid: Grid, runs: list[tuple[str, int]], runs_dir: Path) -> None:
    """`dtplib.train.check_args` on every run, in one child process (data paths, model names, flag combinations)."""
    batch = [(run_label(arm, seed), run_argv(grid, arm, seed, runs_dir)) for arm, seed in runs]
    result = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, json.dumps(batch), str(grid.nproc_per_node)],
                            cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ValueError(f"{grid.path.name}: {lines[-1] if lines else f'check exited {result.returncode}'}")


def epochs_done(run_dir: Path) -> int:
    """Rows of the run's epochs.csv (0 when it has none yet)."""
    path = run_dir / "epochs.csv"
    if not path.is_file():
        return 0
    with path.open() as f:
        return max(sum(1 for line in f if line.strip()) - 1, 0)


def check_same_run(grid: Grid, arm: str, seed: int, run_dir: Path) -> None:
    """A run folder that already holds a run must hold this one: the flags the grid gives now (paths and
    runtime flags such as --threads may differ)."""
    params_file = run_dir / "params.json"
    if not params_file.is_file():
        return
    stored = TrainConfig.from_dict(json.loads(params_file.read_text())).to_dict()
    wanted = parse_options(grid.options(arm, seed), run_label(arm, seed)).to_dict()
    changed = [k for k in wanted if k not in (*RUNTIME_FLAGS, "name", "resume") and stored.get(k) != wanted[k]]
    if changed:
        key = changed[0]
        raise ValueError(f"{run_dir} was trained with {key}={stored.get(key)!r}, the grid now gives "
                         f"{wanted[key]!r}: use another --out, or delete that run folder to retrain it")


def child_command(module: str, argv: list[str], nproc_per_node: int = 1) -> list[str]:
    """`python -m <module> argv`, or under torchrun with `nproc_per_node` > 1."""
    if nproc_per_node > 1:  # "--" ends torchrun's own flags (it would read --logs as its --logs-specs)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                "-m", module, "--", *argv]
    return [sys.executable, "-m", module, *argv]


def run_child(module: str, argv: list[str], label: str, nproc_per_node: int = 1) -> None:
    """`child_command` (dtplib.train, dtplib.evaluate) in a child process; its output passes through, and an error
    ends the grid with the child's last line."""
    child = subprocess.Popen(child_command(module, argv, nproc_per_node), cwd=REPO_ROOT, stderr=subprocess.PIPE)
    tail: deque[bytes] = deque(maxlen=64)
    try:
        while chunk := os.read(child.stderr.fileno(), 4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.append(chunk)
        code = child.wait()
    except BaseException:  # Ctrl-C or an error here: the child must not train on alone
        stop_process(child)
        raise
    finally:
        child.stderr.close()
    if code != 0:
        lines = [line.strip() for line in b"".join(tail).decode(errors="replace").replace("\r", "\n").splitlines()
                 if line.strip()]
        errors = [line for line in lines if "error:" in line]
        raise RunFailed(f"run {label}: {module} exited with status {code}: "
                        f"{(errors or lines or ['no output'])[-1]}")


def arm_epochs(grid: Grid) -> dict[str, int]:
    """Each arm's --epochs: the count that makes a run finished."""
    return {arm: parse_options(grid.options(arm, grid.seeds_of(arm)[0]), arm).epochs for arm in grid.arms}


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that [final], [timing] and [alignment] read: the run's epoch_latest.pt."""
    return run_dir / "checkpoints" / "epoch_latest.pt"


def run_grid(grid: Grid, out: Path, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
             max_runs: int | None = None) -> tuple[list[str], list[str]]:
    """Train the selected runs that are not finished (at most `max_runs` of them), each followed at once by its
    [final] evaluation (a session cut off later keeps it: checkpoints are not committed), then evaluate every other
    finished one without its final.json; returns the labels trained and evaluated. A finished run that still needs
    its evaluation but whose checkpoint is gone is refused before anything trains."""
    runs_dir = out / "runs"
    selected = grid.runs(arms, seeds)
    epochs = arm_epochs(grid)

    def final_due(arm: str, seed: int) -> bool:
        run_dir = runs_dir / run_label(arm, seed)
        return bool(grid.final) and epochs_done(run_dir) >= epochs[arm] and not (run_dir / FINAL_FILE).is_file()

    todo = []
    for arm, seed in selected:
        run_dir = runs_dir / run_label(arm, seed)
        check_same_run(grid, arm, seed, run_dir)
        if epochs_done(run_dir) < epochs[arm]:
            todo.append((arm, seed))
        elif final_due(arm, seed) and not last_checkpoint(run_dir).is_file():
            raise ValueError(f"{shown_path(run_dir)} is finished but has no {FINAL_FILE}, and the checkpoint its "
                             f"[final] evaluation reads is gone ({last_checkpoint(run_dir).relative_to(run_dir)}: "
                             "checkpoints are not committed): delete that run folder to retrain it")
    if max_runs is not None:
        todo = todo[:max_runs]
    trained, evaluated = [], []

    def evaluate_run(arm: str, seed: int) -> None:
        label = run_label(arm, seed)
        print(f"final evaluation of {label}", flush=True)
        run_child("dtplib.evaluate", final_argv(grid.final, last_checkpoint(runs_dir / label),
                                                runs_dir / label / FINAL_FILE), label)
        evaluated.append(label)

    if todo or any(final_due(arm, seed) for arm, seed in selected):  # [final] may read the shards it makes
        prepare_data(grid)
    if todo:
        check_runs(grid, todo, runs_dir)
        atomic_write_text(out / ".gitignore", "runs/*/checkpoints/\nruns/*/tensorboard/\n")
    for index, (arm, seed) in enumerate(todo):
        label = run_label(arm, seed)
        print(f"[{index + 1}/{len(todo)}] training {label}", flush=True)
        run_child("dtplib.train", run_argv(grid, arm, seed, runs_dir), label, grid.nproc_per_node)
        done = epochs_done(runs_dir / label)
        if done < epochs[arm]:
            raise RunFailed(f"run {label} ended with {done} of {epochs[arm]} epochs in its epochs.csv (its flags "
                            "stop it early, e.g. --max-steps?)")
        trained.append(label)
        if final_due(arm, seed):
            evaluate_run(arm, seed)
    for arm, seed in selected:  # finished earlier, their evaluation not (a grid killed while it evaluated)
        if final_due(arm, seed):
            evaluate_run(arm, seed)
    return trained, evaluated


def timed_runs(grid: Grid, out: Path) -> dict[str, Path]:
    """[timing]: arm -> last checkpoint of its run with the timing seed, when every such run is finished (else {})."""
    seed, epochs = grid.timing["seed"], arm_epochs(grid)
    runs = {arm: out / "runs" / run_label(arm, s) for arm, s in grid.runs() if s == seed}
    for arm, run_dir in runs.items():
        if epochs_done(run_dir) < epochs[arm]:
            return {}
    return {arm: last_checkpoint(run_dir) for arm, run_dir in runs.items()}


def time_runs(grid: Grid, out: Path) -> bool:
    """[timing]: the whole training step of every arm's final checkpoint (the timing seed), timed in turn in this
    process, into step_times.csv; once, when all of them are finished and the file does not cover them yet."""
    checkpoints = timed_runs(grid, out) if grid.timing else {}
    path = out / TIMING_FILE
    if not checkpoints or (path.is_file() and set(pd.read_csv(path)["arm"]) == set(checkpoints)):
        return False
    timing = grid.timing
    threads = grid.shared.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    batch_size = timing["batch_size"] or int(parse_options(grid.options(next(iter(checkpoints)), timing["seed"]),
                                                           "timing").batch_size)
    reference = grid.reference if grid.reference in checkpoints else None
    print(f"timing the final checkpoints of {len(checkpoints)} arms (seed {timing['seed']}, batch {batch_size})",
          flush=True)
    frame = bench.time_checkpoints(checkpoints, batch_size, timing["steps"], timing["warmup"], reference)
    frame.insert(0, "arm", frame.pop("model"))
    frame.insert(1, "seed", timing["seed"])
    atomic_write_text(path, frame.to_csv(index=False))
    return True


def check_alignment_data(grid: Grid) -> None:
    """[alignment]'s COCO folder (annotations/) and overlay photos exist before anything trains."""
    if not grid.alignment:
        return
    coco = data_path(grid.alignment["coco"])
    if not (coco / "annotations").is_dir():
        raise FileNotFoundError(f"[alignment] coco: {coco} has no annotations/ folder (a COCO folder with "
                                "annotations/instances_*.json and the image folders)")
    if grid.alignment["overlays"] and not data_path(grid.alignment["overlay_images"]).is_dir():
        raise FileNotFoundError(f"[alignment] overlay_images: folder not found: "
                                f"{data_path(grid.alignment['overlay_images'])}")


def alignment_due(grid: Grid, out: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """[alignment]'s work left: the finished runs of its arms without rows in alignment.csv, and the finished
    overlay runs without their overlays.png."""
    spec, epochs, path = grid.alignment, arm_epochs(grid), out / ALIGNMENT_FILE
    done = set(pd.read_csv(path)["run"]) if path.is_file() else set()
    finished = [(arm, seed) for arm, seed in grid.runs()
                if epochs_done(out / "runs" / run_label(arm, seed)) >= epochs[arm]]
    todo = [(a, s) for a, s in finished if a in spec["arms"] and run_label(a, s) not in done]
    drawn = [(a, s) for a, s in finished if a in spec["overlays"] and s == spec["overlay_seed"]
             and not (out / "overlays" / a / "overlays.png").is_file()]
    return todo, drawn


def check_alignment_checkpoints(grid: Grid, out: Path) -> None:
    """Every finished run that [alignment] still has to read keeps its last checkpoint (checked before training)."""
    if not grid.alignment:
        return
    todo, drawn = alignment_due(grid, out)
    for arm, seed in dict.fromkeys([*todo, *drawn]):
        run_dir = out / "runs" / run_label(arm, seed)
        if not last_checkpoint(run_dir).is_file():
            raise ValueError(f"{shown_path(run_dir)} is finished, but the checkpoint its [alignment] reads is gone "
                             f"({last_checkpoint(run_dir).relative_to(run_dir)}: checkpoints are not committed): "
                             "delete that run folder to retrain it")


def align_runs(grid: Grid, out: Path) -> list[str]:
    """[alignment]: each finished run of its arms without rows in alignment.csv gets them (`dtplib.viz.alignment`
    of its last checkpoint on the COCO folder, with arm, seed, run and provenance columns); each `overlays` arm's
    overlay_seed run, once finished, gets overlays/<arm>/ (`dtplib.viz.draw_overlays`). Returns the runs done."""
    if not grid.alignment:
        return []
    from dtplib import viz

    spec, path = grid.alignment, out / ALIGNMENT_FILE
    todo, drawn = alignment_due(grid, out)
    threads = grid.shared.get("threads")
    if (todo or drawn) and threads:
        torch.set_num_threads(int(threads))
    provenance = run_info("cpu", "fp32", spec["batch_size"])  # before the first append dirties alignment.csv
    for arm, seed in todo:
        label = run_label(arm, seed)
        print(f"boundary alignment of {label}", flush=True)
        model, preprocess, _ = evaluate.load_model(checkpoint=last_checkpoint(out / "runs" / label))
        table = viz.alignment(model, preprocess, data_path(spec["coco"]), spec["num_images"], spec["batch_size"],
                              spec["draws"])
        table = table.assign(arm=arm, seed=seed, run=label, **provenance)
        append_csv(path, table.to_dict("records"))
    for arm, seed in drawn:
        label = run_label(arm, seed)
        print(f"boundary overlays of {label}", flush=True)
        model, preprocess, _ = evaluate.load_model(checkpoint=last_checkpoint(out / "runs" / label))
        viz.draw_overlays(model, preprocess, data_path(spec["overlay_images"]), out / "overlays" / arm,
                          batch_size=spec["batch_size"])
    return [run_label(a, s) for a, s in todo]


# ----------------------------------------------------------------------------------------------------------
# 3. Reading the runs back


def cost_model(config: TrainConfig):
    """(image-tower MACs per image as a function of the realised compression, text MACs per pair)."""
    model = build_from_config(config)[0]
    tower = image_tower(model)
    patches = patch_count(tower)
    text = float(total(text_macs(model)))

    def image(compression: float) -> float:
        segments = patches / compression if math.isfinite(compression) and compression > 0 else None
        return float(total(analytic_macs(model, segments, patch_dropout=config.force_patch_dropout)))

    return image, text


def run_rows(grid: Grid, arm: str, seed: int, run_dir: Path, costs: dict) -> list[dict]:
    """runs.csv rows of one run folder (none when it has no finished epoch)."""
    if epochs_done(run_dir) == 0:
        return []
    epochs = pd.read_csv(run_dir / "epochs.csv")
    params = json.loads((run_dir / "params.json").read_text())
    config = TrainConfig.from_dict(params)
    if arm not in costs:
        costs[arm] = cost_model(config)
    image_macs, text = costs[arm]
    steps = pd.read_csv(run_dir / "steps.csv") if (run_dir / "steps.csv").is_file() else None
    per_step = config.batch_size * int(params.get("world_size", 1))
    provenance = {k: params.get(k) for k in ("commit", "hardware", "torch", "dtype", "batch_size")}
    arm_flags = " ".join(shown_flags(grid.arms[arm])) or "(shared flags)"
    final = final_metrics(run_dir) if len(epochs) >= config.epochs else {}
    rows, seen, gmacs, image_gmacs = [], 0, 0.0, 0.0
    for record in epochs.to_dict("records"):
        epoch = int(record["epoch"])
        samples = int(record["steps"]) * per_step
        seen += samples
        if steps is not None and "step_time_s" in steps:
            train_time = float(steps.loc[steps["epoch"] <= epoch, "step_time_s"].sum())
        else:
            train_time = float("nan")
        per_image = image_macs(float(record.get("compression", float("nan")))) / 1e9
        gmacs += (per_image + text / 1e9) * samples
        image_gmacs += per_image * samples
        metrics = {k: v for k, v in record.items() if k not in ("epoch", "first_epoch", "steps", "checkpoint")}
        rows.append({"arm": arm, "seed": seed, "model": trained_label(config), "epoch": epoch, "epochs_done": epoch + 1,
                     "complete": len(epochs) >= config.epochs, **metrics, "steps": int(record["steps"]),
                     "samples_seen": seen, "train_time_s": train_time, "gmacs_per_image": per_image,
                     "text_gmacs": text / 1e9, "train_gmacs": gmacs, "train_image_gmacs": image_gmacs,
                     **provenance, "flags": arm_flags, "run": shown_path(run_dir)})
    if final:
        rows[-1].update(final)  # the last epoch's checkpoint is the one [final] evaluated
    return rows


def final_metrics(run_dir: Path) -> dict:
    """A run's final.json metrics as `final_<metric>` (numbers only); empty when there is none."""
    path = run_dir / FINAL_FILE
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    return {f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(grid: Grid, out: Path) -> pd.DataFrame:
    """Every epoch of every run folder of the grid, as runs.csv's rows."""
    costs: dict = {}
    rows = [row for arm, seed in grid.runs() for row in run_rows(grid, arm, seed, out / "runs" / run_label(arm, seed),
                                                                  costs)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# 4. Intervals, summary, figure


def metric_columns(runs: pd.DataFrame, chosen: Sequence[str] | None = None) -> list[str]:
    """The summary's rows: `chosen`, else every numeric evaluation column (not training statistics, counts or
    per-run interval bounds) followed by the cost columns."""
    if chosen:
        missing = [c for c in chosen if c not in runs]
        if missing:
            raise ValueError(f"metric {missing[0]!r} is not a column of runs.csv{_close(missing[0], list(runs))}")
        return list(chosen)
    found = [c for c in runs.columns if c not in DRIVER_COLUMNS and c not in TRAINING_COLUMNS
             and c not in COST_COLUMNS and not NOT_A_METRIC.search(c) and pd.api.types.is_numeric_dtype(runs[c])
             and runs[c].notna().any()]
    return found + [c for c in COST_COLUMNS if c in runs]


def _cell(mean: float, low: float, high: float, marked: bool = False) -> str:
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:.4g}"
    if np.isfinite(low):
        text += f" [{low:.4g}, {high:.4g}]"
    return text + (" *" if marked and np.isfinite(low) and (low > 0 or high < 0) else "")


def status_lines(grid: Grid, runs: pd.DataFrame, out: Path) -> list[str]:
    wanted = [run_label(a, s) for a, s in grid.runs()]
    done = set() if runs.empty else {run_label(a, s) for a, s in plots.last_epochs(runs)[["arm", "seed"]].itertuples(
        index=False)}
    counts = {label: epochs_done(out / "runs" / label) for label in wanted if label not in done}
    partial = [f"{label} ({count} epochs)" for label, count in counts.items() if count]
    missing = [label for label, count in counts.items() if not count]
    lines = [f"Runs complete: {len(done)} of {len(wanted)}."]
    if partial:
        lines.append(f"Partial (resume with the same command): {', '.join(partial)}.")
    if missing:
        lines.append(f"Not started: {', '.join(missing)}.")
    return lines


def summary_markdown(grid: Grid, runs: pd.DataFrame, out: Path, command: str, info: dict | None = None) -> str:
    """summary.md's text; `info` is the provenance (`run_info()`), taken before any report file is rewritten."""
    info = info or run_info()
    lines = [f"# Experiment {grid.path.stem}", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [f"Grid: `{shown_path(grid.path)}`; seeds {grid.seeds}; shared flags: "
              f"`{' '.join(shown_flags(grid.shared))}`. Generated by `{command}` at commit {info['commit']} "
              f"(torch {info['torch']}); every run's own commit and hardware are in runs.csv.", ""]
    lines += markdown_table(["arm", "flags"], [
        [arm, f"`{' '.join(shown_flags(options)) or '(shared flags)'}`"
              f"{f' (seeds {grid.seeds_of(arm)})' if grid.seeds_of(arm) != grid.seeds else ''}"]
        for arm, options in grid.arms.items()])
    lines += ["", *status_lines(grid, runs, out), ""]
    if runs.empty:
        return "\n".join(lines + ["No epoch finished yet."]) + "\n"
    metrics = metric_columns(runs, grid.metrics)
    last = plots.last_epochs(runs)
    if last.empty:
        return "\n".join(lines + ["No run is complete yet."]) + "\n"
    arms = [arm for arm in grid.arms if arm in set(last["arm"])]
    lines += ["## Last epoch: mean [95% CI] over seeds", "",
              "Complete runs only. Interval: Student-t over seeds, mean ± t(0.975, n−1)·sd/√n (t = 12.7 with 2 "
              "seeds, 4.3 with 3: honest, and wide); none with one seed. Costs: compression is the realised "
              "training compression; gmacs_per_image the image tower's forward GMACs per image at it; "
              "train_time_s the summed training step times; train_gmacs the forward GMACs of both towers over "
              "the samples seen.", ""]
    seeds = {arm: len(last[last["arm"] == arm]) for arm in arms}
    lines += markdown_table(["metric", *(f"{arm} (n={seeds[arm]})" for arm in arms)], [
        [metric, *(_cell(*t_interval(last.loc[last["arm"] == arm, metric])[:3]) for arm in arms)]
        for metric in metrics])
    lines += timing_lines(grid, out)
    reference = grid.reference
    if reference and reference in arms and len(arms) > 1:
        others = [arm for arm in arms if arm != reference]
        ref = last[last["arm"] == reference].set_index("seed")
        lines += ["", f"## Paired differences against {reference} (same seed)", "",
                  f"arm − {reference} on each seed that both completed, mean [95% t-interval over those seeds]; "
                  "* marks an interval that excludes 0.", ""]
        pairs = {arm: sorted(set(last.loc[last["arm"] == arm, "seed"]) & set(ref.index)) for arm in others}
        own = {arm: last[last["arm"] == arm].set_index("seed") for arm in others}

        def paired(arm: str, metric: str) -> str:
            differences = [own[arm].at[s, metric] - ref.at[s, metric] for s in pairs[arm]]
            return _cell(*t_interval(differences)[:3], marked=True)

        lines += markdown_table(["metric", *(f"{arm} − {reference} (pairs={len(pairs[arm])})" for arm in others)],
                                [[metric, *(paired(arm, metric) for arm in others)] for metric in metrics])
    lines += contrast_lines(contrast_table(grid, runs))
    lines += alignment_lines(grid, out)
    return "\n".join(lines) + "\n"


def value_at(curve: pd.DataFrame, axis: str, metric: str, cost: float) -> float:
    """A run's per-epoch `metric` at `cost` along `axis` (a cumulative runs.csv column), linearly interpolated
    between its evaluations; NaN before the first evaluation or past the last."""
    points = curve[[axis, metric]].dropna().sort_values(axis)
    if points.empty or not points[axis].iloc[0] <= cost <= points[axis].iloc[-1]:
        return float("nan")
    return float(np.interp(cost, points[axis].to_numpy(float), points[metric].to_numpy(float)))


CONTRAST_COLUMNS = ("contrast", "arm", "against", "at", "cost", "metric", "pairs", "difference", "ci_low", "ci_high",
                    "excludes_zero")


def contrast_table(grid: Grid, runs: pd.DataFrame) -> pd.DataFrame:
    """contrasts.csv: for each `contrasts` pair (arm, against), arm − against on each seed both completed, mean and
    95% t-interval over those seeds (`dtplib.stats.t_interval`), for

    - at = "last epoch": every summary metric of the last epoch;
    - at = "equal <axis>" for each cost axis (cumulative training step time, training GMACs): the figure metrics
      (the per-epoch evaluations) of both runs read off their curves at the same cost, the smaller of the two
      runs' final costs (linear interpolation between epochs; `cost` is its mean over the seeds): the cheaper
      run's final value against what the dearer run had reached when it had spent as much.
    """
    if not grid.contrasts or runs.empty or not runs["complete"].astype(bool).any():
        return pd.DataFrame(columns=list(CONTRAST_COLUMNS))
    last = plots.last_epochs(runs)
    complete = runs[runs["complete"].astype(bool)]
    metrics, curves = metric_columns(runs, grid.metrics), figure_metrics(grid, runs)
    rows = []

    def add(base: dict, at: str, cost: float, metric: str, differences: list[float]) -> None:
        mean, low, high, n = t_interval(differences)
        rows.append({**base, "at": at, "cost": cost, "metric": metric, "pairs": n, "difference": mean, "ci_low": low,
                     "ci_high": high, "excludes_zero": bool(low > 0 or high < 0)})

    for arm, against in grid.contrasts:
        own, other = (last[last["arm"] == a].set_index("seed") for a in (arm, against))
        pairs = sorted(set(own.index) & set(other.index))
        base = {"contrast": f"{arm} − {against}", "arm": arm, "against": against}
        for metric in metrics:
            add(base, "last epoch", float("nan"), metric, [own.at[s, metric] - other.at[s, metric] for s in pairs])
        for axis in (a for a in COST_AXES if a in runs):
            for metric in curves:
                differences, costs = [], []
                for seed in pairs:
                    first, second = (complete[(complete["arm"] == a) & (complete["seed"] == seed)]
                                     for a in (arm, against))
                    cost = float(min(first[axis].max(), second[axis].max()))
                    differences.append(value_at(first, axis, metric, cost) - value_at(second, axis, metric, cost))
                    costs.append(cost)
                add(base, f"equal {axis}", float(np.mean(costs)) if costs else float("nan"), metric, differences)
    return pd.DataFrame(rows, columns=list(CONTRAST_COLUMNS))


def _contrast_cell(block: pd.DataFrame, contrast: str, metric: str) -> str:
    row = block[(block["contrast"] == contrast) & (block["metric"] == metric)]
    return _cell(*row[["difference", "ci_low", "ci_high"]].iloc[0], marked=True) if len(row) else "–"


def contrast_lines(table: pd.DataFrame) -> list[str]:
    """summary.md's contrast tables: one per `at`, a row per metric, a column per contrast."""
    if table.empty:
        return []
    lines = ["", "## Contrasts: paired differences over seeds", "",
             "arm − against on each seed that both completed, mean [95% t-interval over those seeds]; * marks an "
             "interval that excludes 0. At equal cost, both runs' per-epoch evaluations (validation split) are read "
             "off their curves where both had spent the same: the smaller of the two final costs (its mean over "
             "the seeds in the header), linear between epochs."]
    contrasts = list(dict.fromkeys(table["contrast"]))
    for at, block in table.groupby("at", sort=False):
        lines += ["", f"### At {at}", ""]
        heads = []
        for contrast in contrasts:
            rows = block[block["contrast"] == contrast]
            cost = rows["cost"].iloc[0] if len(rows) else float("nan")
            heads.append(f"{contrast} (pairs={int(rows['pairs'].max()) if len(rows) else 0}"
                         + (f", at {cost:.4g}" if np.isfinite(cost) else "") + ")")
        lines += markdown_table(["metric", *heads], [[metric, *(_contrast_cell(block, c, metric) for c in contrasts)]
                                                     for metric in dict.fromkeys(block["metric"])])
    return lines


def alignment_lines(grid: Grid, out: Path) -> list[str]:
    """summary.md's alignment table, from alignment.csv, and the overlay figures drawn."""
    path = out / ALIGNMENT_FILE
    if not grid.alignment or not path.is_file():
        return []
    frame = pd.read_csv(path)
    lines = ["", "## Boundary alignment with COCO object outlines", "",
             f"Each finished run's eval-time boundaries on `{grid.alignment['coco']}` (`dtplib.viz.alignment`): the "
             "share of an image's boundaries that fall between patches covered by different sets of objects, mean "
             "over images [95% bootstrap interval over images], next to uniform and random boundaries with the same "
             "count per image and the chance rate.", ""]
    kinds = ("learned", "uniform (same count)", "random (same count)")
    table = []
    for run, rows in frame.groupby("run", sort=False):
        by_kind = {r["boundaries"]: r for _, r in rows.iterrows()}
        cells = [_cell(k["alignment"], k["ci low"], k["ci high"]) if k is not None else "–"
                 for k in (by_kind.get(n) for n in kinds)]
        first = rows.iloc[0]
        table.append([run, *cells, f"{first['chance']:.4g}", f"{first['boundaries per image']:.3g}",
                      str(int(first["images"]))])
    lines += markdown_table(["run", *kinds, "chance", "boundaries per image", "images"], table)
    drawn = [arm for arm in grid.alignment["overlays"] if (out / "overlays" / arm / "overlays.png").is_file()]
    if drawn:
        lines += ["", "Overlays (seed " + str(grid.alignment["overlay_seed"]) + "): "
                  + ", ".join(f"`overlays/{arm}/overlays.png`" for arm in drawn) + "."]
    return lines


def timing_lines(grid: Grid, out: Path) -> list[str]:
    """summary.md's step-time table, from step_times.csv when [timing] wrote it."""
    path = out / TIMING_FILE
    if not grid.timing or not path.is_file():
        return []
    frame = pd.read_csv(path)
    first = frame.iloc[0]
    lines = ["", f"## Training step time: the final checkpoints (seed {first['seed']}), timed in turn", "",
             f"The whole CLIP step (forward, backward, AdamW) on one batch of {first['batch_size']} Flickr8k photos, "
             f"{first['steps']} timed steps per arm after a warm-up, interleaved; {first['hardware']}, "
             f"{first['dtype']}, commit {first['commit']}. Speed-up against {first['reference']}; the bound is the "
             "ratio of forward MACs at the measured segment counts.", ""]
    lines += markdown_table(["arm", "median step (s)", "p10–p90 (s)", "speed-up", "bound", "compression"], [
        [r["arm"], f"{r['median_s']:.3f}", f"{r['p10_s']:.3f}–{r['p90_s']:.3f}", f"{r['speedup']:.2f}",
         f"{r['analytic_bound']:.2f}", f"{r['realised_compression']:.2f}"] for _, r in frame.iterrows()])
    return lines


def figure_metrics(grid: Grid, runs: pd.DataFrame) -> list[str]:
    if grid.figure_metrics:
        return [m for m in grid.figure_metrics if m in runs and runs[m].notna().any()]
    found = [m for m in FIGURE_DEFAULTS if m in runs and runs[m].notna().any()]
    return found[:1]


def write_report(grid: Grid, out: Path, command: str) -> pd.DataFrame:
    """runs.csv, summary.md and the curves figures from the run folders as they are now."""
    from matplotlib import pyplot

    info = run_info()  # before runs.csv is rewritten: a report committed with the code is not "dirty" by itself
    runs = collect(grid, out)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(out / "summary.md", summary_markdown(grid, runs, out, command, info))
    if grid.contrasts:
        atomic_write_text(out / CONTRASTS_FILE, contrast_table(grid, runs).to_csv(index=False))
    for metric in figure_metrics(grid, runs) if not runs.empty else []:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_"))
        figure = plots.accuracy_curves(plots.metric_curves(runs, metric), metric)
        plots.save_figure(figure, out / f"curves_{name}.png")
        pyplot.close(figure)
    return runs


# ----------------------------------------------------------------------------------------------------------
# 5. Command line


def main(argv: Sequence[str] | None = None) -> dict:
    """Returns {"trained": labels of the runs trained by this call, "runs": runs.csv as a frame, "out": folder}."""
    parser = argparse.ArgumentParser(prog="python -m dtplib.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", required=True, help="grid file (TOML or JSON), e.g. experiments/smallrun.toml")
    parser.add_argument("--out", required=True, help="results folder: runs/, runs.csv, summary.md, figures")
    parser.add_argument("--arms", nargs="+", help="train only these arms (the report covers the whole grid)")
    parser.add_argument("--seeds", nargs="+", type=int, help="train only these seeds")
    parser.add_argument("--max-runs", type=int, help="train at most this many unfinished runs, then report")
    parser.add_argument("--report-only", action="store_true", help="train nothing: rewrite the report")
    parser.add_argument("--dry-run", action="store_true", help="print the training command of every selected run "
                        "and stop (nothing is checked against the data, nothing is written)")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    for arm in args.arms or []:
        if arm not in grid.arms:
            raise ValueError(f"--arms: {arm!r} is not an arm of {grid.path.name} ({', '.join(grid.arms)})")
    for seed in args.seeds or []:
        if not any(seed == s for _, s in grid.runs()):
            raise ValueError(f"--seeds: {seed} is not a seed of {grid.path.name} "
                             f"({sorted({s for _, s in grid.runs()})})")
    if args.max_runs is not None and args.max_runs < 0:
        raise ValueError(f"--max-runs must be >= 0, got {args.max_runs}")
    out = repo_path(args.out)
    if args.dry_run:  # as a user would type them: paths as the grid writes them, torchrun for torch.distributed.run
        commands = []
        for arm, seed in grid.runs(args.arms, args.seeds):
            argv = flags(**resolved(grid.options(arm, seed)), logs=f"{args.out}/runs", name=run_label(arm, seed),
                         resume="latest")
            command = child_command("dtplib.train", argv, grid.nproc_per_node)[1:]
            command = ["torchrun", *command[2:]] if command[1] == "torch.distributed.run" else ["python", *command]
            commands.append(shlex.join(command))
        print("\n".join(commands))
        return {"commands": commands}
    trained, evaluated, timed, aligned = [], [], False, []
    if not args.report_only:
        check_final_data(grid)
        check_alignment_data(grid)
        check_alignment_checkpoints(grid, out)
        trained, evaluated = run_grid(grid, out, args.arms, args.seeds, args.max_runs)
        timed = time_runs(grid, out)
        aligned = align_runs(grid, out)
    runs = write_report(grid, out, f"python -m dtplib.experiment --grid {shown_path(grid.path)} --out {args.out}")
    print(f"trained {len(trained)} runs and evaluated {len(evaluated)} this call; {out / 'runs.csv'}, "
          f"{out / 'summary.md'}")
    return {"trained": trained, "evaluated": evaluated, "timed": timed, "aligned": aligned, "runs": runs, "out": out}


if __name__ == "__main__":
    run_cli(main, errors=(ValueError, OSError, RunFailed), prog="python -m dtplib.experiment")
