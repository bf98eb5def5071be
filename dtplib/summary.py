"""Tables and figures for the notebooks: DTP-ViT variants, tokens through the network, prior fits (02), and the
curves and tables of a training run (03)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .clip import create_model_and_transforms
from .model import fit_boundary_prior, get_tower, realised_compression, trace


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
