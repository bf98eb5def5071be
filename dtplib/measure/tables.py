"""The tables behind the figures: tower variants and their costs, token flow through a tower, prior fits, a
run's logs, efficiency and accuracy tables from results/, metric curves of a grid. Data frames only: drawing is
`dtplib.figures.plots`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import open_clip
import pandas as pd
import torch

from ..common.paths import repo_path
from ..data.imagefolder import class_folders
from ..data.loader import iter_samples
from ..tower.clip import ARCHS, create_model_and_transforms, parse_dtp_name
from ..tower.control import dtp_towers, fit_boundary_prior, get_tower, realised_compression, trace
from .flops import analytic_macs, image_tower, patch_count, total
from .specs import create_spec_model, parse_spec
from .stats import t_interval

EVAL_COLUMNS = ("zeroshot_top1", "zeroshot_top5", "imagenet_top1", "imagenet_top5", "image_to_text_R@1",
                "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1", "text_to_image_R@5",
                "text_to_image_R@10")


PERCENT_METRIC = re.compile(r"(top\d+|R@\d+)$")  # proportions (hits over items): shown in percent, in [0, 100]
METRIC_WORDS = (("text_to_image_", "text→image "), ("image_to_text_", "image→text "), ("zeroshot_", "zero-shot "),
                ("imagenet_", "ImageNet "), ("probe_", "linear probe "), ("val_loss", "validation loss"),
                ("top1", "top-1"), ("top5", "top-5"))


def metric_unit(metric: str) -> tuple[float, str, tuple[float, float]]:
    """(factor, label, range) of a metric column as shown: a proportion (top-k, R@k) times 100, labelled "(%)",
    in [0, 100]; anything else (a loss, a compression, a count) as it is, at least 0."""
    label = metric
    for raw, shown in METRIC_WORDS:
        label = label.replace(raw, shown)
    label = label.replace("_", " ")
    if PERCENT_METRIC.search(metric):
        return 100.0, f"{label} (%)", (0.0, 100.0)
    return 1.0, label, (0.0, math.inf)


def chance_level(metric: str, sizes: dict) -> float | None:
    """What random scores reach on `metric`, as a proportion, from the evaluation's sizes (a runs.csv or epochs.csv
    row; `zeroshot_classes` where the caller knows it): zero-shot top-k k / classes; text→image R@k k / images (one
    matching image); image→text R@k 1 - C(T - P, k) / C(T, k) for T texts, P = T / images captions per image. None
    when the sizes are missing or the metric has no chance level (a loss)."""
    k = re.search(r"(?:top|R@)(\d+)$", metric)
    k = int(k.group(1)) if k else None
    value = lambda key: float(sizes.get(key) or "nan")  # noqa: E731
    if k and metric.startswith("zeroshot_") and value("zeroshot_classes") > 0:
        return min(1.0, k / value("zeroshot_classes"))
    images, texts = value("retrieval_images"), value("retrieval_texts")
    if k and metric.startswith("text_to_image_R@") and images > 0:
        return min(1.0, k / images)
    if k and metric.startswith("image_to_text_R@") and images > 0 and texts >= images:
        positives = round(texts / images)
        return 1.0 - math.prod((texts - positives - i) / (texts - i) for i in range(k))
    return None


def _parameter_count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def variant_table(arch: str, compressions: list[float], upsample: bool = False) -> pd.DataFrame:
    """Parameters (millions) of each variant's image tower, predictor and text tower."""
    rows = []
    for c in compressions:
        model, _, _ = create_model_and_transforms(arch, compression=c, upsample=upsample and c > 1)
        tower = get_tower(model)
        rows.append({"compression": c, "layers (pre/short/post)":
                     f"{tower.dtp.pre_layers}/{tower.dtp.short_layers}/{tower.dtp.post_layers}",
                     "image tower (M)": _parameter_count(model.visual) / 1e6,
                     "predictor (M)": _parameter_count(tower.predictor) / 1e6,
                     "text tower (M)": (_parameter_count(model) - _parameter_count(model.visual)) / 1e6,
                     "patches": tower.num_patches})
    return pd.DataFrame(rows)


def token_flow(model: torch.nn.Module, images: torch.Tensor) -> pd.DataFrame:
    """Tokens (CLS included) that each stage of the tower processes on `images`: mean, min, max per image."""
    tower = get_tower(model)
    with torch.no_grad(), trace(model) as t:
        model.encode_image(images)
    full = torch.full_like(t.tokens, tower.num_patches) + 1  # B, CLS + patches
    short = t.tokens + 1  # B, CLS + segments
    stages = [("patch embedding", full, 1), ("pre-layers", full, tower.dtp.pre_layers),
              ("shortened layers", short, tower.dtp.short_layers)]
    if tower.dtp.upsample:
        stages.append(("post-layers", full, tower.dtp.post_layers))
    return pd.DataFrame([{"stage": name, "layers": layers, "tokens (mean)": tokens.float().mean().item(),
                          "tokens (min)": tokens.min().item(), "tokens (max)": tokens.max().item()}
                         for name, tokens, layers in stages])


def prior_fit_table(arch: str, compressions: list[float], images: torch.Tensor, steps: int = 300) -> pd.DataFrame:
    """Realised compression (eval and train mode) before and after fitting the predictor to the prior alone."""
    rows = []
    for c in compressions:
        if c <= 1:
            continue
        model, _, _ = create_model_and_transforms(arch, compression=c)
        row = {"target": c}
        for when in ("before", "after"):
            if when == "after":
                fit_boundary_prior(model, images, steps=steps)
            model.eval()
            row[f"eval {when}"] = realised_compression(model, images)
            model.train()
            row[f"train {when}"] = realised_compression(model, images)
        rows.append(row)
    return pd.DataFrame(rows)


def run_tables(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, epochs) of a `python -m dtplib.train` run folder."""
    run_dir = Path(run_dir)
    return pd.read_csv(run_dir / "steps.csv"), pd.read_csv(run_dir / "epochs.csv")


def run_params(run_dir: str | Path) -> dict:
    """A run folder's params.json (the resolved `TrainConfig` and the run's provenance)."""
    return json.loads((Path(run_dir) / "params.json").read_text())


def zeroshot_class_count(params: dict) -> int | None:
    """Classes of a run's zero-shot ImageFolder (`zeroshot_data` in its params.json) with images, for the chance
    level; None when the run had none or the folder is not on this machine."""
    folder = params.get("zeroshot_data")
    if not folder or not Path(folder).is_dir():
        return None
    return len(class_folders(Path(folder))[0]) or None


def runs_chance(runs: pd.DataFrame, metric: str) -> float | None:
    """`chance_level` of `metric` for an experiment's runs.csv, from its first row's evaluation sizes and the
    zero-shot classes of that row's run folder (`run` column, from the repository root) where it is on this
    machine; a proportion, or None."""
    if runs.empty:
        return None
    first = runs.iloc[0].to_dict()
    params = Path(repo_path(str(first.get("run", "")))) / "params.json"
    classes = zeroshot_class_count(json.loads(params.read_text())) if first.get("run") and params.is_file() else None
    return chance_level(metric, {**first, "zeroshot_classes": classes})


EPOCH_COLUMNS = {"epoch": "epoch", "first_epoch": "first epoch", "loss": "loss", "contrastive_loss": "contrastive loss",
                 "boundary_loss": "boundary loss", "compression": "compression (patches/token)",
                 "step_time_s": "step time (s)", "samples_per_s": "samples/s", "peak_memory_mb": "peak memory (MiB)"}


def epoch_report(run_dir: str | Path) -> pd.DataFrame:
    """The per-epoch table with the columns a reader compares first, named with their units; evaluations that ran
    in percent ("text→image R@10 (%)"). Epochs count from 1."""
    _, epochs = run_tables(run_dir)
    table = pd.DataFrame({shown: epochs[raw] for raw, shown in EPOCH_COLUMNS.items() if raw in epochs})
    if "epoch" in table:
        table["epoch"] = table["epoch"] + 1
    for metric in (c for c in EVAL_COLUMNS if c in epochs and epochs[c].notna().any()):
        factor, label, _ = metric_unit(metric)
        table[label] = factor * epochs[metric]
    return table


def _geometry(name: str) -> tuple[int, int]:
    parsed = parse_dtp_name(name)
    if parsed is not None:
        return ARCHS[parsed[0]].image_size, ARCHS[parsed[0]].patch_size
    vision = open_clip.get_model_config(name)["vision_cfg"]
    return vision["image_size"], vision["patch_size"]


def efficiency_csvs(folders: list[str | Path]) -> list[Path]:
    return [p for folder in folders for p in sorted(Path(folder).glob("efficiency_*.csv"))]


def last_epochs(runs: pd.DataFrame) -> pd.DataFrame:
    """The last row of each complete run of an experiment's runs.csv."""
    complete = runs[runs["complete"].astype(bool)]
    return complete.sort_values("epoch").groupby(["arm", "seed"], sort=False).tail(1)


def _trained_accuracy(runs_csv: str | Path) -> pd.DataFrame:
    """Mean zero-shot top-1/top-5 of the complete runs of an experiment's runs.csv, by what they trained (the
    `model` column, `dtplib.measure.specs.trained_label`): the [final] scores (`final_zeroshot_*`, the whole test set)
    where a run has them, else its last epoch's evaluation; empty when the file or its zero-shot columns are missing."""
    runs_csv = Path(runs_csv)
    columns = ["zeroshot_top1", "zeroshot_top5"]
    if not runs_csv.is_file():
        return pd.DataFrame(columns=columns)
    runs = pd.read_csv(runs_csv)
    if not {"model", *columns} <= set(runs.columns):
        return pd.DataFrame(columns=columns)
    last = last_epochs(runs)
    for column in columns:
        if f"final_{column}" in last:
            last[column] = last[f"final_{column}"].fillna(last[column])
    return last.groupby("model")[columns].mean()


def efficiency_table(folders: list[str | Path],
                     accuracy_runs: str | Path = "results/flickr8k_ti/runs.csv") -> pd.DataFrame:
    """The seed's table: model, image-tower GMACs and GFLOPs (at the benchmark's realised compression), resolution,
    patch, zero-shot top-1/top-5 in percent (mean over the complete runs of an experiment that trained that tower, from
    its runs.csv), peak memory and step time (clip step), from every efficiency_*.csv that `python -m dtplib.bench`
    wrote into the folders."""
    frames = [pd.read_csv(p).assign(source=p.name) for p in efficiency_csvs(folders)]
    if not frames:
        raise FileNotFoundError(f"no efficiency_*.csv in {folders}: run python -m dtplib.bench first")
    bench_rows = pd.concat(frames)
    bench_rows = bench_rows[bench_rows["mode"] == "clip"]
    accuracy = _trained_accuracy(accuracy_runs)
    rows, models = [], {}
    for _, r in bench_rows.iterrows():
        spec = parse_spec(r["model"])
        name, dropout = spec.name, spec.patch_dropout
        size, patch = _geometry(name)
        key = (name, spec.reduction)
        if key not in models:  # one build per name (and reduction): the GPU tables repeat B-16 and B-32 rows
            models[key] = create_spec_model(replace(spec, patch_dropout=None))[0]
        model = models[key]
        towers = dtp_towers(model)
        if spec.reduction:  # every image at the budget (ToMe: its MAC-matched schedule)
            macs = float(total(analytic_macs(model)))
        elif towers and towers[0].pools:  # at the benchmark's mean segment count
            macs = float(total(analytic_macs(model, patch_count(image_tower(model)) / r["realised_compression"])))
        else:
            macs = float(total(analytic_macs(model, patch_dropout=dropout)))
        trained = spec.trained.label  # the execution does not change what is learned
        top = accuracy.loc[trained] if trained in accuracy.index else None
        rows.append({"model": r["model"], "execution": r.get("execution", ""), "image GMACs": macs / 1e9,
                     "image GFLOPs": 2 * macs / 1e9,
                     "resolution": size, "patch": patch, "compression": r["realised_compression"],
                     "zero-shot top-1 (%)": 100 * top["zeroshot_top1"] if top is not None else float("nan"),
                     "zero-shot top-5 (%)": 100 * top["zeroshot_top5"] if top is not None else float("nan"),
                     "peak memory (MiB)": r["peak_memory_mb"], "step time (s)": r["median_s"],
                     "speed-up": r["speedup"], "bound": r["analytic_bound"], "hardware": r["hardware"],
                     "batch": r["batch_size"], "dtype": r["dtype"], "source": r["source"]})
    return pd.DataFrame(rows)


def arm_accuracy(runs_csv: str | Path, metrics: Sequence[str] = ("zeroshot_top1", "text_to_image_R@10"),
                 classes: int | None = None) -> pd.DataFrame:
    """One row per arm of an experiment's runs.csv and metric: the model it trained, its image-tower GFLOPs per image
    at its realised training compression (mean over seeds), and the metric over its complete runs, mean and 95%
    t-interval over seeds in the metric's unit (`metric_unit`: percent for proportions), with its chance level
    (`chance_level`; zero-shot classes: `classes`, else counted as `runs_chance` does). The [final] score (whole
    test set) where a run has one, else its last epoch's evaluation. Arms in the grid's order."""
    runs = pd.read_csv(runs_csv)
    last = last_epochs(runs)
    rows = []
    for metric in metrics:
        if metric not in last:
            raise ValueError(f"{runs_csv} has no column {metric!r}")
        factor, label, _ = metric_unit(metric)
        scores = last[f"final_{metric}"].fillna(last[metric]) if f"final_{metric}" in last else last[metric]
        chance = chance_level(metric, {**last.iloc[0].to_dict(), "zeroshot_classes": classes}) if classes else \
            runs_chance(runs, metric)
        for arm in pd.unique(runs["arm"]):
            group = last[last["arm"] == arm]
            if group.empty:
                continue
            mean, low, high, n = t_interval(factor * scores[group.index])
            rows.append({"arm": arm, "model": group["model"].iloc[0], "seeds": n,
                         "image GFLOPs": 2 * group["gmacs_per_image"].mean(), "metric": label, "mean": mean,
                         "low": low, "high": high, "chance": factor * chance if chance is not None else float("nan")})
    return pd.DataFrame(rows, columns=["arm", "model", "seeds", "image GFLOPs", "metric", "mean", "low", "high",
                                       "chance"])


def metric_curves(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per arm and epoch: the model it trained (runs.csv's `model`, else the arm), mean over seeds of the cumulative
    costs, and the metric's mean and 95% t-interval."""
    rows = []
    present = runs.dropna(subset=[metric])
    for (arm, epoch), group in present.groupby(["arm", "epochs_done"], sort=False):
        mean, low, high, n = t_interval(group[metric])
        rows.append({"arm": arm, "model": group["model"].iloc[0] if "model" in group else arm, "epochs_done": epoch,
                     "seeds": n, "train_time_s": group["train_time_s"].mean(),
                     "train_gmacs": group["train_gmacs"].mean(), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows, columns=["arm", "model", "epochs_done", "seeds", "train_time_s", "train_gmacs", "mean",
                                       "low", "high"])


def caption_lengths(shards: str | Sequence[str]) -> list[int]:
    """Words per caption, over every caption of every sample."""
    return [len(c.split()) for sample in iter_samples(shards) for c in sample["captions"]]
