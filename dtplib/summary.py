"""Tables and figures for the notebooks: DTP-ViT variants, tokens through the network, prior fits (02), and the
curves and tables of a training run (03)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pandas as pd
import torch

from .clip import ARCHS, create_model_and_transforms, parse_dtp_name
from .flops import analytic_macs, image_tower, patch_count, total
from .model import dtp_towers, fit_boundary_prior, get_tower, realised_compression, trace


def count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def variant_table(arch: str, compressions: list[float], upsample: bool = False) -> pd.DataFrame:
    """Parameters (millions) of each variant's image tower, predictor and text tower."""
    rows = []
    for c in compressions:
        model, _, _ = create_model_and_transforms(arch, compression=c, upsample=upsample and c > 1)
        tower = get_tower(model)
        rows.append({"compression": c, "layers (pre/short/post)":
                     f"{tower.dtp.pre_layers}/{tower.dtp.short_layers}/{tower.dtp.post_layers}",
                     "image tower (M)": count(model.visual) / 1e6, "predictor (M)": count(tower.predictor) / 1e6,
                     "text tower (M)": (count(model) - count(model.visual)) / 1e6, "patches": tower.num_patches})
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


# ----------------------------------------------------------------------------------------------------------
# Training runs (03 notebook): everything is read back from the run folder's CSVs


def run_tables(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, epochs) of a `python -m dtplib.train` run folder."""
    run_dir = Path(run_dir)
    return pd.read_csv(run_dir / "steps.csv"), pd.read_csv(run_dir / "epochs.csv")


EVAL_COLUMNS = ("zeroshot_top1", "zeroshot_top5", "imagenet_top1", "imagenet_top5", "image_to_text_R@1",
                "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1", "text_to_image_R@5",
                "text_to_image_R@10")


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


def epoch_report(run_dir: str | Path) -> pd.DataFrame:
    """The per-epoch table, with the columns a reader compares first."""
    _, epochs = run_tables(run_dir)
    first = ["epoch", "first_epoch", "loss", "compression", "step_time_s", "samples_per_s", "peak_memory_mb"]
    shown = [c for c in first if c in epochs] + [c for c in EVAL_COLUMNS if c in epochs]
    return epochs[shown]


# ----------------------------------------------------------------------------------------------------------
# Efficiency (05 notebook): FLOPs, benchmark rows and accuracy from results/, side by side


def _geometry(name: str) -> tuple[int, int]:
    parsed = parse_dtp_name(name)
    if parsed is not None:
        return ARCHS[parsed[0]].image_size, ARCHS[parsed[0]].patch_size
    vision = open_clip.get_model_config(name)["vision_cfg"]
    return vision["image_size"], vision["patch_size"]


def efficiency_csvs(folders: list[str | Path]) -> list[Path]:
    return [p for folder in folders for p in sorted(Path(folder).glob("efficiency_*.csv"))]


def efficiency_table(folders: list[str | Path], accuracy_csv: str | Path = "results/small_run.csv") -> pd.DataFrame:
    """The seed's table: model, image-tower GMACs and GFLOPs (at the benchmark's realised compression), resolution,
    patch, zero-shot top-1/top-5 (from training runs when present), peak memory and step time (clip step), from
    every efficiency_*.csv that `python -m dtplib.bench` wrote into the folders."""
    frames = [pd.read_csv(p).assign(source=p.name) for p in efficiency_csvs(folders)]
    if not frames:
        raise FileNotFoundError(f"no efficiency_*.csv in {folders}: run python -m dtplib.bench first")
    bench_rows = pd.concat(frames)
    bench_rows = bench_rows[bench_rows["mode"] == "clip"]
    accuracy = pd.DataFrame()
    accuracy_csv = Path(accuracy_csv)
    if accuracy_csv.is_file():
        accuracy = pd.read_csv(accuracy_csv).groupby("model")[["zeroshot_top1", "zeroshot_top5"]].mean()
    rows, models = [], {}
    from .bench import parse_spec  # bench imports this module for its figure

    for _, r in bench_rows.iterrows():
        spec = parse_spec(r["model"])
        name, dropout = spec.name, spec.patch_dropout
        size, patch = _geometry(name)
        if name not in models:  # one build per name: the GPU tables repeat B-16 and B-32 rows
            models[name] = open_clip.create_model(name)
        model = models[name]
        towers = dtp_towers(model)
        if towers and towers[0].predictor is not None:  # at the benchmark's mean segment count
            macs = float(total(analytic_macs(model, patch_count(image_tower(model)) / r["realised_compression"])))
        else:
            macs = float(total(analytic_macs(model, patch_dropout=dropout)))
        top = accuracy.loc[name] if name in accuracy.index and not dropout else None
        rows.append({"model": r["model"], "execution": r.get("execution", ""), "image GMACs": macs / 1e9,
                     "image GFLOPs": 2 * macs / 1e9,
                     "resolution": size, "patch": patch, "compression": r["realised_compression"],
                     "zero-shot top-1": top["zeroshot_top1"] if top is not None else float("nan"),
                     "zero-shot top-5": top["zeroshot_top5"] if top is not None else float("nan"),
                     "peak memory (MiB)": r["peak_memory_mb"], "step time (s)": r["median_s"],
                     "speed-up": r["speedup"], "bound": r["analytic_bound"], "hardware": r["hardware"],
                     "batch": r["batch_size"], "dtype": r["dtype"], "source": r["source"]})
    return pd.DataFrame(rows)


def speedup_plot(bench_csvs: list[str | Path]):
    """Measured speed-up against realised compression, beside the analytic bound of each execution: one row of
    panels per timed mode (whole CLIP step, image tower), one column per kind of boundaries (learned, uniform,
    topk); patch-dropout peers in every panel. The legend sits outside the panels."""
    import matplotlib.pyplot as plt

    frames = [(Path(c).stem, pd.read_csv(c)) for c in bench_csvs]
    kinds = [k for k in ("learned", "uniform", "topk")
             if any((f.get("boundaries", pd.Series(dtype=str)) == k).any() for _, f in frames)] or ["learned"]
    modes = [m for m in ("clip", "image") if any((f["mode"] == m).any() for _, f in frames)]
    figure, axes = plt.subplots(len(modes), len(kinds), figsize=(4.2 * len(kinds) + 2.6, 3.6 * len(modes)),
                                squeeze=False, sharey="row")
    styles = {"packed": ("o", "-"), "padded": ("s", "--")}
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
