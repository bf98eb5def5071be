"""The contrasts of a grid (contrasts.csv) and their summary.md sections: paired differences over seeds, the tests
of the [protocol]'s primary family, and the costs they are read at.

Read top to bottom:
1. Columns: which runs.csv columns are metrics (`metric_columns`), the derived ones (`add_derived_columns`: the mean
   R@10 over both retrieval directions) and the cost model (`add_model_time`: model_time_s, each run's samples times
   its arm's per-sample step time from one interleaved benchmark on one machine, [timing]'s step_times.csv).
2. The choice of the best mode on validation (`choose_best`) and the contrasts it resolves (`contrast_pairs`).
3. `contrast_table`: every pair, at the last epoch and at equal cost; t-interval, paired t-test, Holm over the
   primary family, two one-sided tests for equivalence, the bootstrap over seeds and test items where the runs'
   per-item scores exist (`<run>/final_items.npz`).
4. `contrast_lines`: summary.md's "Primary (decided before the runs)" and "Exploratory" sections.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..common.files import markdown_table
from ..measure import tables
from ..measure.evaluate import read_items
from ..measure.stats import degenerate, hierarchical_paired_ci, holm, paired_t_pvalue, t_interval, tost
from .spec import BEST, ITEMS_FILE, TIMING_FILE, Grid, close_names, run_label

# ----------------------------------------------------------------------------------------------------------
# 1. Columns

# epochs.csv columns that describe the training itself, not an evaluation (shown in runs.csv, not in the summary)
TRAINING_COLUMNS = ("epoch", "first_epoch", "steps", "loss", "contrastive_loss", "boundary_loss", "lr_end",
                    "step_time_s", "step_time_median_s", "data_time_s", "samples_per_s", "warmup_step_time_s",
                    "peak_memory_mb", "checkpoint", "capacity_bound_steps", "capacity_dropped")


NOT_A_METRIC = re.compile(r"skipped|_images$|_texts$|_count$|_items$|(_ci)?_(low|high|lo|hi)$|_ci$")


COST_COLUMNS = ("compression", "gmacs_per_image", "samples_seen", "train_time_s", "model_time_s", "train_gmacs")


DRIVER_COLUMNS = ("arm", "seed", "model", "stage", "epoch", "epochs_done", "complete", "steps", "samples_seen",
                  "train_time_s", "model_time_s", "gmacs_per_image", "text_gmacs", "train_gmacs", "train_image_gmacs",
                  "commit", "hardware", "torch", "dtype", "batch_size", "flags", "run")


FIGURE_DEFAULTS = ("zeroshot_top1", "text_to_image_R@10", "image_to_text_R@10", "imagenet_top1")


DERIVED = {"mean_R@10": ("image_to_text_R@10", "text_to_image_R@10")}  # the mean of both retrieval directions


def metric_columns(runs: pd.DataFrame, chosen: Sequence[str] | None = None) -> list[str]:
    """The summary's rows: `chosen`, else every numeric evaluation column (not training statistics, counts or
    per-run interval bounds) followed by the cost columns."""
    if chosen:
        missing = [c for c in chosen if c not in runs]
        if missing:
            raise ValueError(f"metric {missing[0]!r} is not a column of runs.csv{close_names(missing[0], list(runs))}")
        return list(chosen)
    found = [c for c in runs.columns if c not in DRIVER_COLUMNS and c not in TRAINING_COLUMNS
             and c not in COST_COLUMNS and not NOT_A_METRIC.search(c) and pd.api.types.is_numeric_dtype(runs[c])
             and runs[c].notna().any()]
    return found + [c for c in COST_COLUMNS if c in runs]


def figure_metrics(grid: Grid, runs: pd.DataFrame) -> list[str]:
    if grid.figure_metrics:
        return [m for m in grid.figure_metrics if m in runs and runs[m].notna().any()]
    found = [m for m in FIGURE_DEFAULTS if m in runs and runs[m].notna().any()]
    return found[:1]


def add_derived_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """`DERIVED` columns, per epoch (validation) and final (`final_`, test), where both their parts are columns."""
    for name, parts in DERIVED.items():
        for prefix in ("", "final_"):
            if all(f"{prefix}{part}" in runs for part in parts):
                runs[f"{prefix}{name}"] = runs[[f"{prefix}{part}" for part in parts]].mean(axis=1, skipna=False)
    return runs


def add_model_time(runs: pd.DataFrame, out: Path) -> pd.DataFrame:
    """model_time_s: the cost model of training time, from one machine. Each epoch's samples times its arm's
    per-sample step time in step_times.csv ([timing]: every arm's step timed in turn, in one process), so that
    arms trained on different machines are compared at the same clock; a [finish] epoch's samples at that time
    scaled by the ratio of the finish's forward GMACs per pair to the main run's (the benchmark timed the main run).
    NaN for an arm the benchmark has not timed (yet)."""
    path = out / TIMING_FILE
    if runs.empty:
        return runs
    timed = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["arm", "median_s", "batch_size"])
    per_sample = dict(zip(timed["arm"], timed["median_s"] / timed["batch_size"], strict=True))
    model_time = pd.Series(np.nan, index=runs.index)
    for (arm, _), rows in runs.groupby(["arm", "seed"], sort=False):
        if arm not in per_sample:
            continue
        stage = rows["stage"] if "stage" in rows else pd.Series("main", index=rows.index)
        samples = rows["samples_seen"].diff().fillna(rows["samples_seen"])  # each epoch's own samples
        pair_gmacs = rows["gmacs_per_image"] + rows["text_gmacs"]
        main = pair_gmacs[stage == "main"]
        scale = np.where(stage == "main", 1.0, pair_gmacs / (main.iloc[-1] if len(main) else np.nan))
        model_time[rows.index] = np.cumsum(samples.to_numpy(float) * per_sample[arm] * scale)
    runs["model_time_s"] = model_time
    return runs


# ----------------------------------------------------------------------------------------------------------
# 2. The best mode, chosen on validation, and the pairs


def choose_best(grid: Grid, last: pd.DataFrame) -> tuple[str | None, dict[str, float], str]:
    """The [protocol]'s best_of arm that "best" stands for: the best mean over seeds of `choose_on` (a validation
    column) at the last epoch, the lowest for a loss, else the highest (a tie: the first in best_of). Made only when
    every run of every best_of arm is complete. Returns (arm or None, {arm: its mean}, a line for the summary)."""
    protocol = grid.protocol or {}
    arms, metric = protocol.get("best_of") or [], protocol.get("choose_on")
    if not arms:
        return None, {}, ""
    done = {arm: set(last.loc[last["arm"] == arm, "seed"]) for arm in arms}
    missing = sum(len(set(grid.seeds_of(arm)) - done[arm]) for arm in arms)
    if missing or metric not in last:
        why = f"{missing} of their runs are not complete" if missing else f"runs.csv has no column {metric!r}"
        return None, {}, f"The best of {', '.join(arms)} is not chosen yet: {why}."
    values = {arm: float(last.loc[last["arm"] == arm, metric].mean()) for arm in arms}
    lower = "loss" in metric
    best = (min if lower else max)(arms, key=lambda arm: values[arm])
    line = (f"Best of {', '.join(arms)}: **{best}**, chosen on the validation split only: the "
            f"{'lowest' if lower else 'highest'} mean over seeds of `{metric}` at the last epoch ("
            + ", ".join(f"{arm} {values[arm]:.4g}" for arm in arms) + ").")
    return best, values, line


def contrast_pairs(grid: Grid, best: str | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(the primary family with "best" resolved, left out while it is not chosen or where it meets itself; every
    other `contrasts` pair, exploratory)."""
    family = []
    for pair in (grid.protocol or {}).get("family", []):
        resolved = tuple(best if arm == BEST else arm for arm in pair)
        if None not in resolved and resolved[0] != resolved[1] and resolved not in family:
            family.append(resolved)
    return family, [pair for pair in grid.contrasts or [] if pair not in family]


# ----------------------------------------------------------------------------------------------------------
# 3. contrasts.csv

COST_AXES = ("model_time_s", "train_time_s", "train_gmacs")  # the equal-cost axes; time: `time_axis` picks one


CONTRAST_COLUMNS = ("contrast", "arm", "against", "family", "at", "cost", "metric", "pairs", "difference", "ci_low",
                    "ci_high", "excludes_zero", "degenerate", "p_value", "p_holm", "tost_p", "equivalent",
                    "hb_low", "hb_high", "hb_pairs")


def value_at(curve: pd.DataFrame, axis: str, metric: str, cost: float) -> float:
    """A run's per-epoch `metric` at `cost` along `axis` (a cumulative runs.csv column), linearly interpolated
    between its evaluations; NaN before the first evaluation or past the last."""
    points = curve[[axis, metric]].dropna().sort_values(axis)
    if points.empty or not points[axis].iloc[0] <= cost <= points[axis].iloc[-1]:
        return float("nan")
    return float(np.interp(cost, points[axis].to_numpy(float), points[metric].to_numpy(float)))


def time_axis(grid: Grid, last: pd.DataFrame, pairs: list[tuple[str, str]]) -> str:
    """The equal-time axis: model_time_s (the cost model) when the grid has [timing]; else the runs' own summed step
    times, refused in one line for a pair of runs trained on different hardware."""
    if grid.timing:
        return "model_time_s"
    if "hardware" in last:
        hardware = last.set_index(["arm", "seed"])["hardware"]
        for arm, against in pairs:
            for seed in sorted(set(last.loc[last["arm"] == arm, "seed"]) & set(last.loc[last["arm"] == against,
                                                                                      "seed"])):
                machines = hardware[(arm, seed)], hardware[(against, seed)]
                if pd.notna(machines[0]) and pd.notna(machines[1]) and machines[0] != machines[1]:
                    raise ValueError(f"contrast {arm} − {against} at equal training time: seed {seed}'s runs were "
                                     f"trained on different hardware ({hardware[(arm, seed)]}, "
                                     f"{hardware[(against, seed)]}) and the grid has no [timing] cost model: add "
                                     "[timing] (one benchmark of every arm on one machine)")
    return "train_time_s"


def _item_arrays(out: Path | None, metric: str, arm: str, against: str, seeds: list[int], cache: dict):
    """(a, b, weights, pairs) for the bootstrap over seeds and items of a final_ metric: K x S x N per-item scores of
    the seed pairs where both runs have them (K: the metric's parts, e.g. both directions of mean_R@10); None when
    no pair has them or their items differ."""
    if out is None or not metric.startswith("final_"):
        return None
    name = metric[len("final_"):]
    parts = DERIVED.get(name, (name,))

    def items(label: str):
        if label not in cache:
            path = out / "runs" / label / ITEMS_FILE
            cache[label] = read_items(path) if path.is_file() else None
        return cache[label]

    def has_parts(label: str) -> bool:
        return items(label) is not None and all(part in items(label) for part in parts)

    usable = [s for s in seeds if has_parts(run_label(arm, s)) and has_parts(run_label(against, s))]
    if not usable:
        return None
    runs = {a: [items(run_label(a, s)) for s in usable] for a in (arm, against)}
    first = runs[arm][0]
    weights = np.stack([np.ones(len(first[p].scores)) if first[p].weights is None else first[p].weights
                        for p in parts])  # K x N
    for scored in (*runs[arm], *runs[against]):
        for k, part in enumerate(parts):
            own = scored[part]
            if len(own.scores) != weights.shape[1] or (own.weights is not None and
                                                       not np.array_equal(own.weights, weights[k])):
                return None  # not the same test items
    a, b = (np.stack([np.stack([r[p].scores for r in runs[x]]) for p in parts]) for x in (arm, against))
    return a, b, weights, len(usable)


def contrast_table(grid: Grid, runs: pd.DataFrame, out: Path | None = None) -> pd.DataFrame:
    """contrasts.csv: for each pair (arm, against) of the primary family and of `contrasts`, arm − against on each
    seed both completed: mean, 95% t-interval over those seeds and the paired t-test's p-value, for

    - at = "last epoch": every summary metric and the [protocol]'s metrics of the last epoch; where both runs of a
      seed pair have per-item scores (under `out`), the 95% interval of the bootstrap over seed pairs and test items
      (hb_low, hb_high over hb_pairs pairs, `stats.hierarchical_paired_ci`);
    - at = "equal <axis>" for the time axis (`time_axis`) and training GMACs: the figure metrics (the per-epoch
      evaluations) of both runs read off their curves at the same cost, the smaller of the two runs' final costs
      (linear interpolation between epochs; `cost` is its mean over the seeds).

    family: "primary" for the primary metric of the family's contrasts at the last epoch (p_holm: Holm over them;
    tost_p and equivalent: two one-sided tests within ±equivalence_margin), "secondary" for its secondary metrics,
    "exploratory" for everything else. A degenerate interval (zero width) never excludes 0.
    """
    protocol = grid.protocol or {}
    if (not grid.contrasts and not protocol) or runs.empty or not runs["complete"].astype(bool).any():
        return pd.DataFrame(columns=list(CONTRAST_COLUMNS))
    last = tables.last_epochs(runs)
    complete = runs[runs["complete"].astype(bool)]
    family, exploratory = contrast_pairs(grid, choose_best(grid, last)[0])
    primary, secondary = protocol.get("primary_metric"), protocol.get("secondary_metrics", [])
    metrics = list(dict.fromkeys([*metric_columns(runs, grid.metrics), *(m for m in [primary, *secondary]
                                                                         if m and m in runs)]))
    axes = (time_axis(grid, last, family + exploratory), "train_gmacs")
    curves, resamples, cache, rows = figure_metrics(grid, runs), protocol.get("bootstrap", 2000), {}, []

    def add(base: dict, at: str, cost: float, metric: str, differences: list[float], kind: str = "exploratory"):
        mean, low, high, n = t_interval(differences)
        flat = degenerate(differences)
        rows.append({**base, "family": kind, "at": at, "cost": cost, "metric": metric, "pairs": n,
                     "difference": mean, "ci_low": low, "ci_high": high,
                     "excludes_zero": bool(not flat and (low > 0 or high < 0)), "degenerate": flat,
                     "p_value": paired_t_pvalue(differences)})

    for arm, against in family + exploratory:
        own, other = (last[last["arm"] == a].set_index("seed") for a in (arm, against))
        pairs = sorted(set(own.index) & set(other.index))
        base = {"contrast": f"{arm} − {against}", "arm": arm, "against": against}
        for metric in metrics:
            kind = "exploratory" if (arm, against) not in family else (
                "primary" if metric == primary else "secondary" if metric in secondary else "exploratory")
            add(base, "last epoch", float("nan"), metric, [own.at[s, metric] - other.at[s, metric] for s in pairs],
                kind)
            arrays = _item_arrays(out, metric, arm, against, pairs, cache)
            if arrays is not None:
                interval = hierarchical_paired_ci(*arrays[:3], resamples=resamples)
                rows[-1].update(hb_low=interval.low, hb_high=interval.high, hb_pairs=arrays[3])
        for axis in axes:
            for metric in curves:
                differences, costs = [], []
                for seed in pairs:
                    first, second = (complete[(complete["arm"] == a) & (complete["seed"] == seed)]
                                     for a in (arm, against))
                    if axis not in first or first[axis].isna().all() or second[axis].isna().all():
                        continue  # the cost model has not timed this arm yet
                    cost = float(min(first[axis].max(), second[axis].max()))
                    differences.append(value_at(first, axis, metric, cost) - value_at(second, axis, metric, cost))
                    costs.append(cost)
                add(base, f"equal {axis}", float(np.mean(costs)) if costs else float("nan"), metric, differences)
    table = pd.DataFrame(rows, columns=list(CONTRAST_COLUMNS))
    table["equivalent"] = table["equivalent"].astype(object)
    _primary_tests(table, protocol, last)
    return table


def _primary_tests(table: pd.DataFrame, protocol: dict, last: pd.DataFrame) -> None:
    """Holm's adjustment over the primary rows' p-values, and their two one-sided tests (in place)."""
    primary = table["family"] == "primary"
    if not primary.any():
        return
    table.loc[primary, "p_holm"] = holm(table.loc[primary, "p_value"].to_numpy(float))
    margin = protocol.get("equivalence_margin")
    for index in table.index[primary]:
        row = table.loc[index]
        own, other = (last[last["arm"] == a].set_index("seed") for a in (row["arm"], row["against"]))
        differences = [own.at[s, row["metric"]] - other.at[s, row["metric"]]
                       for s in sorted(set(own.index) & set(other.index))]
        if margin is not None:
            table.loc[index, ["tost_p", "equivalent"]] = tost(differences, margin, protocol["alpha"])


# ----------------------------------------------------------------------------------------------------------
# 4. summary.md


def cell(mean: float, low: float, high: float, marked: bool = False, flat: bool = False) -> str:
    """"mean [low, high]", with * where `marked` and the interval excludes 0, ° (never *) where it is degenerate."""
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:.4g}"
    if np.isfinite(low):
        text += f" [{low:.4g}, {high:.4g}]"
    if flat and np.isfinite(low):
        return text + " °"
    return text + (" *" if marked and np.isfinite(low) and (low > 0 or high < 0) else "")


DEGENERATE_NOTE = ("° marks a degenerate interval: zero width, every pair moved alike (e.g. two seeds with the same "
                   "difference); it says nothing about the spread and is never starred.")


def _reading(row: pd.Series, alpha: float, margin: float | None) -> str:
    if row["degenerate"]:
        return "degenerate (no spread): no decision"
    if np.isfinite(row["p_holm"]) and row["p_holm"] < alpha:
        return f"{'higher' if row['difference'] > 0 else 'lower'}: the interval excludes 0 after Holm"
    if margin is not None and pd.notna(row["equivalent"]) and bool(row["equivalent"]):
        return f"within ±{margin:g} (TOST)"
    return "no decision: the interval includes 0 after Holm" + ("" if margin is None else f", ±{margin:g} not passed")


def _primary_lines(grid: Grid, table: pd.DataFrame, last: pd.DataFrame) -> list[str]:
    protocol = grid.protocol
    alpha, margin = protocol["alpha"], protocol["equivalence_margin"]
    family = ", ".join(f"{a} − {b}" for a, b in protocol["family"])
    lines = ["", "## Primary (decided before the runs)", "",
             f"The grid's [protocol], written before the runs: primary metric `{protocol['primary_metric']}` at the "
             f"last epoch; the family {family}; each a paired t-test over seeds, Holm's correction over the family at "
             f"alpha {alpha:g}" + (f"; a \"within ±{margin:g}\" reading needs two one-sided tests (TOST) to pass at "
                                    f"alpha {alpha:g}" if margin is not None else "; no equivalence margin: no "
                                    "\"matches\" reading") + ". The bootstrap interval resamples seed pairs and test "
             "items (the per-item scores of [final]) together, over the pairs that have them. "
             + choose_best(grid, last)[2], ""]
    rows = table[table["family"] == "primary"]
    if rows.empty:
        return lines + ["No contrast of the family has complete runs yet."]
    lines += markdown_table(
        ["contrast", "pairs", "difference [95% t]", "p", "p (Holm)", "bootstrap seeds × items [95%] (pairs)",
         f"TOST p (±{margin:g})" if margin is not None else "TOST p", "reading"],
        [[r["contrast"], str(r["pairs"]), cell(r["difference"], r["ci_low"], r["ci_high"], flat=r["degenerate"]),
          f"{r['p_value']:.3g}", f"{r['p_holm']:.3g}",
          f"[{r['hb_low']:.4g}, {r['hb_high']:.4g}] ({int(r['hb_pairs'])})" if np.isfinite(r["hb_low"]) else "–",
          f"{r['tost_p']:.3g}" if np.isfinite(r["tost_p"]) else "–", _reading(r, alpha, margin)]
         for _, r in rows.iterrows()])
    second = table[table["family"] == "secondary"]
    if not second.empty:
        contrasts = list(dict.fromkeys(second["contrast"]))
        lines += ["", "Secondary metrics, declared before the runs, not corrected: mean [95% t-interval] (p); * marks "
                  "an interval that excludes 0. " + DEGENERATE_NOTE, ""]
        lines += markdown_table(["metric", *contrasts], [
            [metric, *(_cell_of(second, c, metric, with_p=True) for c in contrasts)]
            for metric in dict.fromkeys(second["metric"])])
    return lines


def _cell_of(block: pd.DataFrame, contrast: str, metric: str, with_p: bool = False) -> str:
    row = block[(block["contrast"] == contrast) & (block["metric"] == metric)]
    if not len(row):
        return "–"
    r = row.iloc[0]
    text = cell(r["difference"], r["ci_low"], r["ci_high"], marked=True, flat=bool(r["degenerate"]))
    return text + (f" (p {r['p_value']:.2g})" if with_p and np.isfinite(r["p_value"]) else "")


def contrast_lines(grid: Grid, table: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """summary.md's contrast sections: with a [protocol], "Primary (decided before the runs)"; then "Exploratory",
    one table per `at` of every other row (a row per metric, a column per contrast)."""
    if table.empty:
        return []
    lines = _primary_lines(grid, table, tables.last_epochs(runs)) if grid.protocol else []
    rest = table[table["family"] == "exploratory"]
    if rest.empty:
        return lines
    lines += ["", "## Exploratory: paired differences over seeds", "",
              ("Every contrast and metric outside the primary family" if grid.protocol else
               "This grid has no [protocol], so every contrast is exploratory") + ": no correction for the many "
              "intervals, so read them as hypotheses. arm − against on each seed that both completed, mean [95% "
              "t-interval over those seeds]; * marks an interval that excludes 0. " + DEGENERATE_NOTE + " At equal "
              "cost, both runs' per-epoch evaluations (validation split) are read off their curves where both had "
              "spent the same: the smaller of the two final costs (its mean over the seeds in the header), linear "
              "between epochs; model_time_s is the cost model (every arm's step timed on one machine, [timing]). "
              "contrasts.csv also has each row's p-value and, where per-item scores exist, the bootstrap over seeds "
              "and test items (hb_low, hb_high)."]
    contrasts = list(dict.fromkeys(rest["contrast"]))
    for at, block in rest.groupby("at", sort=False):
        lines += ["", f"### At {at}", ""]
        heads = []
        for contrast in contrasts:
            rows = block[block["contrast"] == contrast]
            cost = rows["cost"].iloc[0] if len(rows) else float("nan")
            heads.append(f"{contrast} (pairs={int(rows['pairs'].max()) if len(rows) else 0}"
                         + (f", at {cost:.4g}" if np.isfinite(cost) else "") + ")")
        lines += markdown_table(["metric", *heads], [[metric, *(_cell_of(block, c, metric) for c in contrasts)]
                                                     for metric in dict.fromkeys(block["metric"])])
    return lines
