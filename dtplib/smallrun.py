"""The committed small run: DTP-ViT-Ti-8-64-1x against -4x on Flickr8k, same samples seen, several seeds, on a CPU.

`python -m dtplib.smallrun` makes Flickr8k shards from $DTPLIB_DATA (6091 / 1000 / 1000 images, seeded split),
trains every (compression, seed) pair with `dtplib.train`, evaluates retrieval on the Flickr8k test split and
zero-shot on CIFAR-10 test, and writes results/small_run.csv (one row per run) and results/small_run.md (means over
seeds next to chance). Finished runs are skipped and a killed one resumes, so the command can be repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch

from dtplib import bench, evaluate
from dtplib.flops import realised_segments
from dtplib.loader import iter_samples
from dtplib.model import dtp_towers, get_tower, token_budget
from dtplib.shards import from_captions, split_shards
from dtplib.utils import REPO_ROOT, atomic_write_text, data_root, flags, repo_path, run_cli, run_info

RETRIEVAL = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
ZEROSHOT = ["zeroshot_top1", "zeroshot_top5"]


def make_shards(work: Path) -> Path:
    """Flickr8k to train/val/test shards at 64 px (the Ti input size), once."""
    out = work / "flickr8k"
    if not (out / "stats.json").is_file():
        flickr = data_root() / "flickr8k"
        from_captions(flickr / "images", flickr / "captions.tsv", out, image_size=64, val_size=1000,
                      test_size=1000, seed=0, processes=2, overwrite=True)
    return out


def chance(test_shards: str, num_classes: int = 10) -> dict:
    """Expected value of each metric for a model that ranks at random."""
    captions = [len(s["captions"]) for s in iter_samples(test_shards)]
    images, texts = len(captions), sum(captions)
    levels = {}
    for k in (1, 5, 10):  # an image hits when any of its m captions is among k of the texts
        miss = sum(math.comb(texts - m, k) / math.comb(texts, k) for m in captions) / images
        levels[f"image_to_text_R@{k}"] = 1 - miss
        levels[f"text_to_image_R@{k}"] = k / images
    levels |= {"zeroshot_top1": 1 / num_classes, "zeroshot_top5": 5 / num_classes}
    return levels


def eval_segments(checkpoint: Path, test_shards: str) -> dict:
    """Realised compression in eval mode (deterministic boundaries) over the test images: the budget N / mean
    segments, and how the segment count spreads between images."""
    model, preprocess, _ = evaluate.load_model(checkpoint=checkpoint)
    images = torch.stack([preprocess(s["image"]) for s in iter_samples(test_shards)])  # B x 3 x 64 x 64
    segments = realised_segments(model, images).float()  # B
    return {"eval_compression": token_budget(get_tower(model).num_patches, segments),
            "eval_segments_mean": segments.mean().item(), "eval_segments_std": segments.std().item(),
            "eval_segments_min": segments.min().item(), "eval_segments_max": segments.max().item()}


def clean_step_times(run_dirs: dict[str, Path], shards: Path, batch_size: int, steps: int = 10,
                     warmup: int = 3) -> dict[str, float]:
    """Median training-step time of each trained model, all in this process, interleaved step by step on one batch
    of real training pairs: the training runs' own step times are only as clean as the machine was quiet."""
    _, preprocess_train, _ = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    samples = list(iter_samples(split_shards(shards, "train"), limit=batch_size))
    images = torch.stack([preprocess_train(s["image"]) for s in samples])  # B x 3 x 64 x 64
    texts = open_clip.get_tokenizer("ViT-Ti-8-64")([s["captions"][0] for s in samples])  # B x 32
    subjects = {}
    for label, run_dir in run_dirs.items():
        model, _, _ = evaluate.load_model(checkpoint=run_dir / "checkpoints" / "epoch_latest.pt")
        model.train()
        pools = bool(dtp_towers(model)) and get_tower(model).predictor is not None
        subjects[label] = bench.Subject(bench.Spec(label, boundaries="learned" if pools else ""), model, images,
                                        texts, torch.optim.AdamW(model.parameters(), lr=1e-5), source="checkpoint")
    bench.time_interleaved(list(subjects.values()), modes=("clip",), steps=steps, warmup=warmup)
    return {label: float(np.median(s.times["clip"])) for label, s in subjects.items()}


def run_one(shards: Path, compression: int, seed: int, args: argparse.Namespace) -> dict:
    name = f"Ti-8-64-{compression}x-seed{seed}"
    argv = flags(model="ViT-Ti-8-64", compression=compression, seed=seed,
                       train_data=split_shards(shards, "train"), val_data=split_shards(shards, "test"),
                       zeroshot_data=data_root() / "cifar10-test", epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, warmup=args.warmup, workers=args.workers, threads=args.threads,
                       zeroshot_frequency=args.epochs, val_frequency=args.epochs, save_frequency=args.epochs,
                       logs=repo_path(args.work) / "runs", name=name, resume="latest")
    run_dir = repo_path(args.work) / "runs" / name
    epochs_csv = run_dir / "epochs.csv"
    done = epochs_csv.is_file() and len(pd.read_csv(epochs_csv)) == args.epochs
    if not done:  # in a process of its own, as a user runs it
        subprocess.run([sys.executable, "-m", "dtplib.train", *argv], check=True)
    epochs = pd.read_csv(epochs_csv)
    params = json.loads((run_dir / "params.json").read_text())
    last = epochs.iloc[-1]
    later = epochs[~epochs["first_epoch"]]  # the first epoch's slower steps are reported apart
    return {"model": f"DTP-ViT-Ti-8-64-{compression}x", "compression_target": compression, "seed": seed,
            "epochs": args.epochs, "samples_seen": params["total_steps"] * args.batch_size,
            **eval_segments(run_dir / "checkpoints" / "epoch_latest.pt", split_shards(shards, "test")),
            **{m: last[m] for m in RETRIEVAL + ZEROSHOT},
            "step_time_s": later["step_time_median_s"].mean(), "first_epoch_step_time_s": epochs.iloc[0]["step_time_s"],
            "peak_rss_mb": epochs["peak_memory_mb"].max(), "run": os.path.relpath(run_dir, REPO_ROOT),
            **run_info("cpu", "fp32", args.batch_size)}


def markdown_report(rows: pd.DataFrame, levels: dict) -> str:
    """Markdown: per model the mean (min..max over seeds) of each metric, chance, and the step-time ratio."""
    metrics = RETRIEVAL + ZEROSHOT
    lines = ["| model | seeds | " + " | ".join(metrics) + " | step time (s) | compression (eval) | segments "
             "(mean, std, min..max) |", "|---|---|" + "---|" * (len(metrics) + 3)]
    for model, group in rows.groupby("model", sort=False):
        cells = [f"{100 * group[m].mean():.1f} ({100 * group[m].min():.1f}..{100 * group[m].max():.1f})"
                 for m in metrics]
        segments = (f"{group['eval_segments_mean'].mean():.1f}, {group['eval_segments_std'].mean():.1f}, "
                    f"{group['eval_segments_min'].min():.0f}..{group['eval_segments_max'].max():.0f}")
        step_time = group["clean_step_time_s"].mean()
        lines.append(f"| {model} | {len(group)} | " + " | ".join(cells) + f" | {step_time:.3f} | "
                     f"{group['eval_compression'].mean():.2f} | {segments} |")
    lines.append("| chance | | " + " | ".join(f"{100 * levels[m]:.1f}" for m in metrics) + " | | | |")
    times = rows.groupby("model", sort=False)["clean_step_time_s"].mean()
    ratio = times.iloc[0] / times.iloc[-1] if len(times) > 1 else float("nan")
    first = rows.iloc[0]
    return "\n".join([
        "# Small run: DTP-ViT-Ti-8-64, 1x against 4x, on Flickr8k (CPU)",
        "",
        f"Train: Flickr8k train split ({rows['samples_seen'].iloc[0] // rows['epochs'].iloc[0]} samples an epoch), "
        f"{first['epochs']} epochs, batch {first['batch_size']}, the same samples seen by every run. Retrieval: "
        "Flickr8k test split (1000 images, 5 captions each, all counted). Zero-shot: CIFAR-10 test (10000 images, "
        "CLIP's 18 prompts). Numbers in %, mean (min..max) over seeds. Step time: the median of 10 training steps "
        "(forward, backward, AdamW; batch of real training pairs) of each trained model, all timed in one process "
        "and interleaved after 3 warm-up steps, averaged over seeds. The runs' own step times (step_time_s in the "
        "CSV, per-epoch medians) were taken while other jobs shared the 2 cores and are not comparable.",
        f"Hardware: {first['hardware']}, {first['dtype']}, torch {first['torch']}, commit {first['commit']}.",
        "",
        *lines,
        "",
        f"Step-time ratio (first model / last model): {ratio:.2f}x.",
        "",
        "Generated by `python -m dtplib.smallrun`; rows in small_run.csv.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compressions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="logs/small_run", help="shards and run folders (not committed)")
    parser.add_argument("--out", default="results", help="small_run.csv and small_run.md go here")
    args = parser.parse_args(argv)
    shards = make_shards(repo_path(args.work))
    rows = pd.DataFrame([run_one(shards, c, seed, args) for seed in args.seeds for c in args.compressions])
    run_dirs = {f"{r.model}-seed{r.seed}": REPO_ROOT / r.run for r in rows.itertuples()}
    times = clean_step_times(run_dirs, shards, args.batch_size)
    rows["clean_step_time_s"] = [times[f"{r.model}-seed{r.seed}"] for r in rows.itertuples()]
    out = repo_path(args.out)
    atomic_write_text(out / "small_run.csv", rows.to_csv(index=False))
    atomic_write_text(out / "small_run.md", markdown_report(rows, chance(split_shards(shards, "test"))))
    print((out / "small_run.md").read_text())
    return rows


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.smallrun")
