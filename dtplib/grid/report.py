"""Reading a grid's runs back: `runs.csv`, the contrasts, `summary.md` and the curves figures.

Outputs in `<out>`:
- `runs.csv`: one row per run and epoch: arm, seed, model (`dtplib.measure.specs.trained_label`: what the run trained,
  in the benchmark's spec labels), epoch (0-based, as epochs.csv) and epochs_done, complete, every
  column of the run's epochs.csv (its evaluations included), steps, samples_seen, train_time_s (cumulative sum of
  steps.csv's step times: data loading and evaluation excluded), gmacs_per_image (analytic image-tower forward
  MACs per image at the epoch's realised training compression, and with --force-patch-dropout its kept tokens),
  text_gmacs, train_gmacs (cumulative forward MACs of both towers over the samples seen; a backward pass costs about
  twice a forward, not counted), train_image_gmacs (the image tower's share), the run's provenance from its
  params.json (commit, hardware, torch, dtype, batch_size) and the arm's flags. With a [finish] table, each run's
  rows go on with its finish's epochs (`stage` "main" or "finish"; epoch and every cumulative cost counting on, each
  epoch's GMACs at its own input size and patch dropout), and a run is complete when its finish is.
  With a [final] table, the last epoch's row also has `final_<metric>` columns from the run's final.json (with
  --bootstrap their per-run intervals, `final_<metric>_ci_low/_ci_high`). Derived: mean_R@10 and final_mean_R@10,
  the mean of both retrieval directions' R@10; with [timing]'s step_times.csv, model_time_s, the cost model of
  training time (`contrasts.add_model_time`: every arm's step timed on one machine), beside the runs' own
  train_time_s and hardware.
- `summary.md`: per arm the last epoch's metrics of the complete runs, mean and 95% Student-t interval over seeds
  (mean +- t(0.975, n-1) sd / sqrt(n): with 2 seeds t = 12.7, wide as it should be), paired differences against
  the reference arm (same seed), which runs are complete, partial or missing, and the contrasts
  (`contrasts.contrast_lines`): with a [protocol], its primary family first ("Primary (decided before the runs)"),
  then everything else as "Exploratory".
- `step_times.csv` ([timing]): per arm, the median, p10 and p90 of the whole training step of its main run's
  last checkpoint (its own AdamW kernel, fp32, one batch of real photos, `steps` timed steps after `warmup`, all arms
  interleaved), the speed-up against the reference arm and the analytic bound; summary.md shows it.
- `contrasts.csv` (`contrasts` or [protocol]): `contrasts.contrast_table`: paired differences at the last epoch
  and at equal cost, with p-values, Holm over the primary family, equivalence tests and the bootstrap over seeds
  and test items.
- `alignment.csv`, `overlays/<arm>/` ([alignment]): `align_runs`, once per finished run.
- `curves_<metric>.png` and `curves_<metric>_time.png`: the metric against training compute (forward MACs) and
  against cumulative training step time, a panel per arm with the reference arm in grey, mean over seeds with its
  95% t-interval band clipped to the metric's range, chance dotted (`dtplib.figures.compare.accuracy_curves`).
- `.gitignore`: the runs' checkpoints, TensorBoard events and lock files (`run.lock`: a PID and host) stay out of
  git; their CSVs and params.json do not.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from ..common.files import atomic_write_text, markdown_table
from ..common.provenance import run_info
from ..figures import compare, plots
from ..measure import tables
from ..measure.flops import analytic_macs, image_tower, patch_count, text_macs, total
from ..measure.specs import trained_label
from ..measure.stats import degenerate, t_interval
from ..training.checkpoint import build_from_config
from ..training.config import TrainConfig
from .contrasts import (
    DEGENERATE_NOTE,
    add_derived_columns,
    add_model_time,
    cell,
    contrast_lines,
    contrast_table,
    figure_metrics,
    metric_columns,
)
from .spec import (
    ALIGNMENT_FILE,
    CONTRASTS_FILE,
    FINAL_FILE,
    TIMING_FILE,
    Grid,
    epochs_done,
    finish_dir,
    run_label,
    shown_flags,
    shown_path,
)


def _cost_model(config: TrainConfig):
    """(image-tower MACs per image as a function of the realised compression, text MACs per pair)."""
    model = build_from_config(config)[0]
    tower = image_tower(model)
    patches = patch_count(tower)
    text = float(total(text_macs(model)))

    def image(compression: float) -> float:
        segments = patches / compression if math.isfinite(compression) and compression > 0 else None
        return float(total(analytic_macs(model, segments, patch_dropout=config.force_patch_dropout)))

    return image, text


def _run_rows(grid: Grid, arm: str, seed: int, run_dir: Path, costs: dict) -> list[dict]:
    """runs.csv rows of one run folder (none when it has no finished epoch): the main run's epochs, then its
    [finish]'s (stage "finish", epochs counted on), the cumulative costs running on over both."""
    if epochs_done(run_dir) == 0:
        return []
    stages = [("main", run_dir)] + ([("finish", finish_dir(run_dir))] if grid.finish_flags(arm) is not None else [])
    trained = [(stage, folder, TrainConfig.from_dict(json.loads((folder / "params.json").read_text())))
               for stage, folder in stages if epochs_done(folder) > 0]
    complete = len(trained) == len(stages) and all(epochs_done(folder) >= config.epochs
                                                   for _, folder, config in trained)
    label = trained_label(trained[0][2])  # what the arm trains; a finish only tunes it
    arm_flags = " ".join(shown_flags(grid.arms[arm])) or "(shared flags)"
    rows, totals = [], {"epochs": 0, "samples_seen": 0, "train_time_s": 0.0, "train_gmacs": 0.0,
                        "train_image_gmacs": 0.0}
    staged = any(grid.finish_flags(a) is not None for a in grid.arms)  # a stage column only where there are two
    for stage, folder, config in trained:
        if (arm, stage) not in costs:
            costs[(arm, stage)] = _cost_model(config)
        head = {"arm": arm, "seed": seed, "model": label, **({"stage": stage} if staged else {})}
        rows += _stage_rows(folder, config, costs[(arm, stage)], totals, head, complete,
                            {"flags": arm_flags, "run": shown_path(run_dir)})
    final = _final_metrics(run_dir) if complete else {}
    if final:
        rows[-1].update(final)  # the last epoch's checkpoint is the one [final] evaluated
    return rows


def _stage_rows(folder: Path, config: TrainConfig, costs: tuple, totals: dict, head: dict, complete: bool,
                tail: dict) -> list[dict]:
    """The rows of one training of a run (its main run or its finish), its costs added to `totals`, the running sums
    over the run's trainings so far (updated in place)."""
    epochs = pd.read_csv(folder / "epochs.csv")
    params = json.loads((folder / "params.json").read_text())
    image_macs, text = costs
    steps = pd.read_csv(folder / "steps.csv") if (folder / "steps.csv").is_file() else None
    per_step = config.batch_size * int(params.get("world_size", 1))
    provenance = {k: params.get(k) for k in ("commit", "hardware", "torch", "dtype", "batch_size")}
    rows, start = [], dict(totals)
    for record in epochs.to_dict("records"):
        epoch = int(record["epoch"])
        samples = int(record["steps"]) * per_step
        totals["samples_seen"] += samples
        if steps is not None and "step_time_s" in steps:
            train_time = start["train_time_s"] + float(steps.loc[steps["epoch"] <= epoch, "step_time_s"].sum())
        else:
            train_time = float("nan")
        per_image = image_macs(float(record.get("compression", float("nan")))) / 1e9
        totals["train_gmacs"] += (per_image + text / 1e9) * samples
        totals["train_image_gmacs"] += per_image * samples
        metrics = {k: v for k, v in record.items() if k not in ("epoch", "first_epoch", "steps", "checkpoint")}
        rows.append({**head, "epoch": start["epochs"] + epoch, "epochs_done": start["epochs"] + epoch + 1,
                     "complete": complete, **metrics,
                     "steps": int(record["steps"]), "samples_seen": totals["samples_seen"], "train_time_s": train_time,
                     "gmacs_per_image": per_image, "text_gmacs": text / 1e9, "train_gmacs": totals["train_gmacs"],
                     "train_image_gmacs": totals["train_image_gmacs"], **provenance, **tail})
    totals["epochs"] += len(rows)
    totals["train_time_s"] = rows[-1]["train_time_s"] if rows else totals["train_time_s"]
    return rows


def _final_metrics(run_dir: Path) -> dict:
    """A run's final.json metrics as `final_<metric>` (numbers only); empty when there is none."""
    path = run_dir / FINAL_FILE
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    return {f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _collect(grid: Grid, out: Path) -> pd.DataFrame:
    """Every epoch of every run folder of the grid, as runs.csv's rows."""
    costs: dict = {}
    rows = [row for arm, seed in grid.runs() for row in _run_rows(grid, arm, seed, out / "runs" / run_label(arm, seed),
                                                                  costs)]
    runs = add_derived_columns(pd.DataFrame(rows))
    return add_model_time(runs, out) if grid.timing else runs


def _status_lines(grid: Grid, runs: pd.DataFrame, out: Path) -> list[str]:
    wanted = {run_label(a, s): a for a, s in grid.runs()}
    done = set() if runs.empty else {run_label(a, s) for a, s in tables.last_epochs(runs)[["arm", "seed"]].itertuples(
        index=False)}
    counts = {label: epochs_done(out / "runs" / label) for label in wanted if label not in done}
    finishing = {label: epochs_done(finish_dir(out / "runs" / label)) for label in counts
                 if grid.finish_flags(wanted[label]) is not None}
    partial = [f"{label} ({count} epochs" + (f", finish {finishing[label]} epochs" if label in finishing else "") + ")"
               for label, count in counts.items() if count]
    missing = [label for label, count in counts.items() if not count]
    lines = [f"Runs complete: {len(done)} of {len(wanted)}."]
    if partial:
        lines.append(f"Partial (resume with the same command): {', '.join(partial)}.")
    if missing:
        lines.append(f"Not started: {', '.join(missing)}.")
    return lines


def _summary_markdown(grid: Grid, runs: pd.DataFrame, out: Path, command: str, info: dict | None = None,
                      contrasts: pd.DataFrame | None = None) -> str:
    """summary.md's text; `info` is the provenance (`run_info()`), taken before any report file is rewritten;
    `contrasts` the contrast table (`contrast_table`, computed here when None)."""
    info = info or run_info()
    lines = [f"# Experiment {grid.path.stem}", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [f"Grid: `{shown_path(grid.path)}`; seeds {grid.seeds}; shared flags: "
              f"`{' '.join(shown_flags(grid.shared))}`. Generated by `{command}` at commit {info['commit']} "
              f"(torch {info['torch']}); every run's own commit and hardware are in runs.csv.", ""]
    finishes = {arm: grid.finish_flags(arm) for arm in grid.arms}
    lines += markdown_table(["arm", "flags", *(["finish"] if any(f is not None for f in finishes.values()) else [])], [
        [arm, f"`{' '.join(shown_flags(options)) or '(shared flags)'}`"
              f"{f' (seeds {grid.seeds_of(arm)})' if grid.seeds_of(arm) != grid.seeds else ''}",
         *([] if not any(f is not None for f in finishes.values()) else
           ["–" if finishes[arm] is None else f"`{' '.join(shown_flags(finishes[arm]))}`"])]
        for arm, options in grid.arms.items()])
    if any(f is not None for f in finishes.values()):
        lines += ["", "Finish: after its main run, each run of an arm with finish flags trains on from its last "
                  "weights with them (a new optimizer and schedule); its last epoch, [final] and every cost below "
                  "include the finish."]
    lines += ["", *_status_lines(grid, runs, out), ""]
    if runs.empty:
        return "\n".join(lines + ["No epoch finished yet."]) + "\n"
    metrics = metric_columns(runs, grid.metrics)
    last = tables.last_epochs(runs)
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
        [metric, *(cell(*t_interval(last.loc[last["arm"] == arm, metric])[:3]) for arm in arms)]
        for metric in metrics])
    lines += _timing_lines(grid, out)
    reference = grid.reference
    if reference and reference in arms and len(arms) > 1:
        others = [arm for arm in arms if arm != reference]
        ref = last[last["arm"] == reference].set_index("seed")
        lines += ["", f"## Exploratory: paired differences against {reference} (same seed)", "",
                  f"arm − {reference} on each seed that both completed, mean [95% t-interval over those seeds], no "
                  "correction for the many intervals; * marks an interval that excludes 0. " + DEGENERATE_NOTE, ""]
        pairs = {arm: sorted(set(last.loc[last["arm"] == arm, "seed"]) & set(ref.index)) for arm in others}
        own = {arm: last[last["arm"] == arm].set_index("seed") for arm in others}

        def paired(arm: str, metric: str) -> str:
            differences = [own[arm].at[s, metric] - ref.at[s, metric] for s in pairs[arm]]
            return cell(*t_interval(differences)[:3], marked=True, flat=degenerate(differences))

        lines += markdown_table(["metric", *(f"{arm} − {reference} (pairs={len(pairs[arm])})" for arm in others)],
                                [[metric, *(paired(arm, metric) for arm in others)] for metric in metrics])
    lines += contrast_lines(grid, contrast_table(grid, runs, out) if contrasts is None else contrasts, runs)
    lines += _alignment_lines(grid, out)
    return "\n".join(lines) + "\n"


def _alignment_lines(grid: Grid, out: Path) -> list[str]:
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
        cells = [cell(k["alignment"], k["ci low"], k["ci high"]) if k is not None else "–"
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


def _timing_lines(grid: Grid, out: Path) -> list[str]:
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


def write_report(grid: Grid, out: Path, command: str) -> pd.DataFrame:
    """runs.csv, summary.md and the curves figures from the run folders as they are now."""
    from matplotlib import pyplot

    info = run_info()  # before runs.csv is rewritten: a report committed with the code is not "dirty" by itself
    runs = _collect(grid, out)
    contrasts = contrast_table(grid, runs, out)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(out / "summary.md", _summary_markdown(grid, runs, out, command, info, contrasts))
    if grid.contrasts or grid.protocol:
        atomic_write_text(out / CONTRASTS_FILE, contrasts.to_csv(index=False))
    for metric in figure_metrics(grid, runs) if not runs.empty else []:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_"))
        curves, chance = tables.metric_curves(runs, metric), tables.runs_chance(runs, metric)
        for cost, suffix in (("train_gmacs", ""), ("train_time_s", "_time")):
            figure = compare.accuracy_curves(curves, metric, cost, grid.reference, chance)
            plots.save_figure(figure, out / f"curves_{name}{suffix}.png")
            pyplot.close(figure)
    return runs
