"""Figures that compare models, in the style of `dtplib.figures.plots` (and saved with its `save_figure`).

Drawing only: every function takes data frames or CSV paths and returns a matplotlib Figure.
1. Efficiency (05 notebook, `python -m dtplib.bench`): `speedup_figures` / `speedup_plot` (one machine per figure),
   `accuracy_vs_gflops` (every arm, one point per model, error bars over seeds).
2. Experiment grids (`python -m dtplib.experiment`, 05 notebook): `accuracy_curves` / `experiment_curves` (a panel
   per arm, the reference in grey, bands clipped to the metric's range, chance dotted).
3. Finetuning (06 notebook): `plot_results`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..measure.tables import metric_curves, metric_unit, runs_chance
from .plots import (
    FAMILY_COLOURS,
    FAMILY_MARKERS,
    PAGE_WIDTH,
    REDUCTION_FAMILIES,
    REFERENCE_GREY,
    arm_family,
    interval_limits,
    styled,
)

# ----------------------------------------------------------------------------------------------------------
# 1. Efficiency (05 notebook): speed-up per machine, accuracy against compute, accuracy against training cost


MODE_TITLES = {"clip": "whole CLIP training step", "image": "image tower, fwd + bwd"}
EXECUTION_LINES = {"packed": "-", "static": "-", "padded": "--"}


def _machine_slug(hardware: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", hardware.lower()).strip("_") or "unknown"


def speedup_figures(bench_csvs: Sequence[str | Path]) -> dict[str, object]:
    """`speedup_plot` per machine: {machine slug ("nvidia_h100_80gb_hbm3", "amd_epyc_x2_cores"): figure}, the
    benchmark tables grouped by their `hardware` column, so no figure mixes machines."""
    machines: dict[str, list[Path]] = {}
    for csv in bench_csvs:
        hardware = pd.read_csv(csv, usecols=["hardware"])["hardware"].iloc[0]
        machines.setdefault(_machine_slug(str(hardware)), []).append(Path(csv))
    return {slug: speedup_plot(csvs) for slug, csvs in machines.items()}


def _series(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(family, label, rows) of the lines of one speed-up panel: DTP rows by boundaries and execution, the field's
    reductions by method (the `reduction` column; older tables have none), FLIP patch dropout, open_clip's ViT; the
    reference itself (1, 1) is left out (the line at 1 shows it)."""
    series = []
    blank = pd.Series("", index=rows.index)
    kinds = rows["boundaries"].fillna("") if "boundaries" in rows else blank
    reductions = rows["reduction"].fillna("") if "reduction" in rows else blank
    executions = rows["execution"].fillna("packed") if "execution" in rows else pd.Series("packed", index=rows.index)
    for (kind, execution), group in rows[kinds != ""].groupby([kinds[kinds != ""], executions[kinds != ""]],
                                                                 sort=False):
        family = "top-k" if "topk" in kind else kind
        series.append((family, f"{kind}, {execution}", group))
    for method, group in rows[reductions != ""].groupby(reductions[reductions != ""], sort=False):
        family = REDUCTION_FAMILIES.get(method, method)
        series.append((family, family, group))
    others = rows[(kinds == "") & (reductions == "")]
    dropout = others[others["model"].str.contains(r"\+pd")]
    plain = others[~others["model"].str.contains(r"\+pd") & (others["model"] != others["reference"])]
    series += [("patch dropout (FLIP)", "FLIP patch dropout", dropout), ("open_clip ViT", "open_clip ViT", plain)]
    return [entry for entry in series if len(entry[2])]


def _table_caption(frame: pd.DataFrame) -> str:
    """What tells one machine's benchmark tables apart: "ViT-B-32: batch 1024, bf16, compiled" (the tower from the
    reference label DTP-ViT-B-32-1x)."""
    first = frame.iloc[0]
    parts = [f"batch {first['batch_size']}" if "batch_size" in frame else "", str(first.get("dtype", "") or "")]
    if "compiled" in frame and frame["compiled"].fillna(False).astype(bool).any():
        parts.append("compiled")
    return f"{re.sub(r'^DTP-|-1x$', '', str(first['reference']))}: " + ", ".join(p for p in parts if p)


def _nominal_compression(row) -> float:
    """The compression a benchmark row aimed at: the N in a DTP label's -Nx, else the realised one."""
    found = re.search(r"-(\d+(?:\.\d+)?)x", str(row["model"]))
    return float(found.group(1)) if found and str(row["model"]).startswith("DTP-") else row["realised_compression"]


def _speedup_panel(ax, rows: pd.DataFrame, x_limit: float) -> None:
    """One table's rows of one mode: measured speed-ups (filled markers) and their analytic bounds (hollow, dotted),
    one colour per family; a row past `x_limit` (a failed prior fit) is drawn at the edge and labelled."""
    for family, label, group in _series(rows):
        group = group.sort_values("realised_compression")
        colour, execution = FAMILY_COLOURS.get(family, "black"), label.rpartition(", ")[2]
        inside = group[group["realised_compression"] <= x_limit]
        bound = inside["padded_bound"] if execution == "padded" else inside["analytic_bound"]
        marker = "s" if execution == "padded" else "v" if label.startswith("batch-topk") else \
            "D" if family == "patch dropout (FLIP)" else "o"
        ax.plot(inside["realised_compression"], inside["speedup"], marker=marker, ms=4.5, color=colour,
                ls=EXECUTION_LINES.get(execution, "-"), lw=1.2, label=label)
        ax.plot(inside["realised_compression"], bound, marker=marker, ms=4.5, mfc="white", color=colour, ls=":",
                lw=1, alpha=0.8)
        for _, outlier in group[group["realised_compression"] > x_limit].iterrows():
            ax.plot([x_limit], [outlier["speedup"]], marker=">", ms=6, color=colour, clip_on=False, ls="none",
                    label=label)
            ax.annotate(f"{outlier['model']}: realised {outlier['realised_compression']:.0f}x\n"
                        f"(target {_nominal_compression(outlier):g}x), bound {outlier['analytic_bound']:.2f}x",
                        (x_limit, outlier["speedup"]), xytext=(-4, 10), textcoords="offset points", ha="right",
                        fontsize=6, color=colour)
    ax.axhline(1, color=REFERENCE_GREY, lw=0.8)
    ax.set_xlim(0.8, x_limit)
    ax.set_ylim(bottom=min(0.7, float(rows["speedup"].min()) - 0.05))


@styled
def speedup_plot(bench_csvs: Sequence[str | Path]):
    """Measured speed-up against realised compression beside the analytic bound, for the benchmark tables of ONE
    machine (`speedup_figures` splits several): a row of panels per table, a panel per timed mode (whole CLIP step,
    image tower), each labelled with its own reference model, batch and dtype. Colour: kind of boundaries / peer;
    filled markers and solid (packed, static) or dashed (padded) lines: measured; hollow markers, dotted: bound.
    The compression axis spans the targets: a row realised beyond twice its target is marked at the edge."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    frames = [(Path(c).stem, pd.read_csv(c)) for c in bench_csvs]
    machines = sorted({str(h) for _, f in frames for h in f["hardware"].dropna().unique()})
    if len(machines) > 1:
        raise ValueError(f"one machine per speed-up figure, got {machines}: draw them with speedup_figures")
    modes = [m for m in MODE_TITLES if any((f["mode"] == m).any() for _, f in frames)]
    figure, axes = plt.subplots(len(frames), len(modes), figsize=(PAGE_WIDTH, 2.5 * len(frames) + 0.4),
                                squeeze=False)
    for row, (_, frame) in enumerate(frames):
        nominal = frame.apply(_nominal_compression, axis=1)
        regular = frame["realised_compression"] <= 2 * nominal
        x_limit = 1.12 * max(float(nominal.max()), float(frame.loc[regular, "realised_compression"].max()))
        reference = str(frame["reference"].iloc[0])
        for column, mode in enumerate(modes):
            ax, timed = axes[row, column], frame[frame["mode"] == mode]
            if timed.empty:  # this table did not time this mode: say so instead of an empty axis
                ax.axis("off")
                ax.text(0.5, 0.5, f"{MODE_TITLES[mode]}:\nnot timed in this table\n({_table_caption(frame)})",
                        ha="center", va="center", transform=ax.transAxes, fontsize=7.5, color="#555555")
                continue
            _speedup_panel(ax, timed, x_limit)
            ax.set_title(f"{MODE_TITLES[mode]}\n{_table_caption(frame)}", fontsize=7.5)
            ax.set_ylabel(f"speed-up over {reference}", fontsize=7.5)
            ax.set_xlabel("realised compression (patches per token)" if row == len(frames) - 1 else "")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    grey = {"marker": "o", "color": "#555555", "ms": 4.5}
    handles["measured"] = Line2D([], [], ls="-", **grey)
    handles["analytic bound"] = Line2D([], [], ls=":", mfc="white", **grey)
    figure.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=7)
    figure.suptitle(f"{machines[0] if machines else 'unknown machine'}", fontsize=9)
    return figure


def _arm_looks(arms: Sequence[str], models: Sequence[str] | None = None) -> dict[str, dict]:
    """{arm: colour and marker}: colour by family (`arm_family` of the arm's model label where given, else of its
    name), a marker per arm within its family."""
    looks, seen = {}, {}
    for arm, model in zip(arms, models or arms, strict=True):
        family = arm_family(str(model))
        index = seen[family] = seen.get(family, -1) + 1
        looks[arm] = {"color": FAMILY_COLOURS[family], "marker": FAMILY_MARKERS[index % len(FAMILY_MARKERS)]}
    return looks


@styled
def accuracy_vs_gflops(table: pd.DataFrame):
    """Every arm of an experiment at its image-tower GFLOPs per image, one point per trained model, mean over seeds
    with 95% t-interval bars clipped to the metric's range, chance dotted; a panel per metric. `table` is
    `tables.arm_accuracy(runs_csv, metrics)`; the legend (colour: family, marker: arm) sits outside the panels.
    Arms at the same compute are spread apart a little along x, so their bars do not cover each other."""
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(table["metric"]))
    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(PAGE_WIDTH, 2.9), squeeze=False)
    first = table.drop_duplicates("arm")
    looks = _arm_looks(list(first["arm"]), list(first["model"]))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        rows = table[table["metric"] == metric].reset_index(drop=True)
        x = _spread(rows["image GFLOPs"].to_numpy(float))
        low, high = interval_limits(_raw_metric(metric), rows["low"], rows["high"])
        error = np.nan_to_num(np.stack([rows["mean"] - low, high - rows["mean"]]), nan=0.0)
        for i, r in rows.iterrows():
            look = looks[r["arm"]]
            ax.errorbar(x[i], r["mean"], yerr=error[:, i:i + 1], capsize=2.5, ms=5, ls="none", **look,
                        label=f"{r['arm']} (n={r['seeds']})")
        if rows["chance"].notna().any():
            ax.axhline(rows["chance"].iloc[0], color=REFERENCE_GREY, ls=":", lw=1, label="chance")
        ax.set(xlabel="image tower GFLOPs per image", ylabel=metric, title=metric.split(" (")[0])
        ax.set_ylim(bottom=0)
    if not metrics:
        axes[0, 0].set_title("accuracy against compute (no complete runs yet)")
    handles = dict(zip(*reversed(axes[0, 0].get_legend_handles_labels()), strict=True))
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=7)
    figure.suptitle("mean over seeds, bars: 95% t-interval over seeds (clipped to the metric's range)", fontsize=8)
    return figure


def _spread(x: np.ndarray, gap: float = 0.035) -> np.ndarray:
    """Positions a little apart: points closer than `gap` of the axis' span are one cluster, and a cluster's
    points are laid out `gap` apart around their mean, in their order (drawn bars then do not cover each other)."""
    if len(x) < 2:
        return x
    step = gap * max(float(np.ptp(x)), 1e-9)
    order = np.argsort(x, kind="stable")
    spread, cluster = x.astype(float).copy(), [order[0]]
    for index in [*order[1:], None]:
        if index is not None and x[index] - x[cluster[-1]] < step:
            cluster.append(index)
            continue
        centre = x[cluster].mean()
        spread[cluster] = centre + step * (np.arange(len(cluster)) - (len(cluster) - 1) / 2)
        cluster = [index]
    return spread


def _raw_metric(label: str) -> str:
    """A shown metric label back to a name `metric_unit` reads as a percentage or not."""
    return "top1" if label.endswith("(%)") else label


def experiment_curves(runs_csv: str | Path, metric: str, cost: str = "train_gmacs", reference: str | None = None):
    """`accuracy_curves` of an experiment's runs.csv (`python -m dtplib.experiment`): the metric against a training
    cost (train_gmacs or train_time_s), a panel per arm with `reference` (default: the first arm) in grey."""
    runs_csv = Path(runs_csv)
    if not runs_csv.is_file():
        raise FileNotFoundError(f"{runs_csv}: no runs.csv (run python -m dtplib.experiment --grid ... first)")
    runs = pd.read_csv(runs_csv)
    if metric not in runs or runs[metric].isna().all():
        raise ValueError(f"{runs_csv} has no values of {metric!r}")
    return accuracy_curves(metric_curves(runs, metric), metric, cost, reference or runs["arm"].iloc[0],
                           runs_chance(runs, metric))


COSTS = {"train_gmacs": "training compute (forward, both towers)", "train_time_s": "cumulative training step time"}


def _cost_unit(cost: str, largest: float) -> tuple[str, float]:
    """(unit, divisor) that keeps a cost axis's numbers short."""
    if cost == "train_time_s":
        return ("h", 3600) if largest > 7200 else ("min", 60) if largest > 120 else ("s", 1)
    return ("PMACs", 1e6) if largest > 1e6 else ("TMACs", 1e3) if largest > 1e3 else ("GMACs", 1)


@styled
def accuracy_curves(curves: pd.DataFrame, metric: str, cost: str = "train_gmacs", reference: str | None = None,
                    chance: float | None = None):
    """A metric against a cumulative training cost, small multiples: a panel per arm (seaborn FacetGrid), its
    mean over seeds in its family's colour with the 95% t-interval as a band clipped to the metric's range, the
    `reference` arm in grey in every other panel, chance (a proportion) dotted. `curves` is
    `metric_curves(runs, metric)`; `cost` is train_gmacs (iso-compute) or train_time_s."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    factor, label, _ = metric_unit(metric)
    unit, divisor = _cost_unit(cost, float(curves[cost].max()) if len(curves) else 0.0)
    frame = curves.assign(x=curves[cost] / divisor, y=factor * curves["mean"])
    frame["low"], frame["high"] = interval_limits(metric, factor * curves["low"], factor * curves["high"])
    first = frame.drop_duplicates("arm")
    arms = list(first["arm"])
    looks = _arm_looks(arms, list(first["model"]) if "model" in frame else None)
    with plt.rc_context({"figure.constrained_layout.use": False}):  # FacetGrid lays itself out (tight_layout)
        grid = sns.FacetGrid(frame, col="arm", col_order=arms, col_wrap=min(4, max(1, len(arms))), sharex=True,
                             sharey=True, height=1.55 if len(arms) > 3 else 2.4, aspect=1.15, despine=False)
    base = frame[frame["arm"] == reference].sort_values("x") if reference in arms else None
    for arm, ax in grid.axes_dict.items():
        if base is not None and arm != reference:
            ax.plot(base["x"], base["y"], color=REFERENCE_GREY, lw=1.2, label=f"reference: {reference}")
            ax.fill_between(base["x"], base["low"], base["high"], color=REFERENCE_GREY, alpha=0.15, lw=0)
        rows = frame[frame["arm"] == arm].sort_values("x")
        ax.fill_between(rows["x"], rows["low"], rows["high"], color=looks[arm]["color"], alpha=0.2, lw=0)
        ax.plot(rows["x"], rows["y"], ms=3, lw=1.4, **looks[arm])
        seeds = sorted(set(rows["seeds"]))
        ax.set_title(f"{arm} (n={seeds[-1] if len(seeds) == 1 else f'{seeds[0]}-{seeds[-1]}'})", fontsize=8)
        if chance is not None:
            ax.axhline(factor * chance, color="black", ls=":", lw=0.9,
                       label=f"chance ({factor * chance:.3g}{'%' if factor == 100 else ''})")
    top = np.nanmax([frame["y"].max(), frame["high"].max()]) if len(frame) else 1.0
    grid.set(ylim=(0, 1.05 * top))
    grid.set_axis_labels("", "")
    height = grid.figure.get_figheight()
    grid.tight_layout(rect=(0.03, 0.4 / height, 1, 1 - 0.45 / height))  # room for the shared labels and the title
    grid.figure.supxlabel(f"{COSTS[cost].split(' (')[0]} ({unit})", y=0.02, fontsize=8.5)
    grid.figure.supylabel(label, x=0.0, fontsize=8.5)
    handles = {}
    for ax in grid.axes.flat:
        handles.update(dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True)))
    grid.figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                       fontsize=7)
    grid.figure.suptitle(f"{label} against {COSTS[cost]}\nmean over seeds, band: 95% t-interval over seeds, "
                         "clipped to the metric's range", fontsize=8.5, y=0.995, va="top")
    return grid.figure


# ----------------------------------------------------------------------------------------------------------
# 3. Finetuning (06 notebook)


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
