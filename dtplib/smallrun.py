"""The committed small run: DTP-ViT-Ti-8-64-1x against -4x on Flickr8k, same samples seen, several seeds, on a CPU.

`python -m dtplib.smallrun` makes Flickr8k shards from ../shared/data (6091 / 1000 / 1000 images, seeded split),
trains every (compression, seed) pair with `dtplib.train`, evaluates retrieval on the Flickr8k test split and
zero-shot on CIFAR-10 test, and writes results/small_run.csv (one row per run) and results/small_run.md (means over
seeds next to chance). Finished runs are skipped and a killed one resumes, so the command can be repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pandas as pd

from dtplib import data, train
from dtplib.utils import REPO_ROOT, SHARED_DATA, atomic_write_text, repo_path, run_info

RETRIEVAL = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
ZEROSHOT = ["zeroshot_top1", "zeroshot_top5"]


def make_shards(work: Path) -> Path:
    """Flickr8k to train/val/test shards at 64 px (the Ti input size), once."""
    out = work / "flickr8k"
    if not (out / "stats.json").is_file():
        flickr = SHARED_DATA / "flickr8k"
        data.from_captions(flickr / "images", flickr / "captions.tsv", out, image_size=64, val_size=1000,
                           test_size=1000, seed=0, processes=2, overwrite=True)
    return out


def chance(test_shards: str, num_classes: int = 10) -> dict:
    """Expected value of each metric for a model that ranks at random."""
    captions = [len(s["captions"]) for s in data.iter_samples(test_shards)]
    images, texts = len(captions), sum(captions)
    levels = {}
    for k in (1, 5, 10):  # an image hits when any of its m captions is among k of the texts
        miss = sum(math.comb(texts - m, k) / math.comb(texts, k) for m in captions) / images
        levels[f"image_to_text_R@{k}"] = 1 - miss
        levels[f"text_to_image_R@{k}"] = k / images
    levels |= {"zeroshot_top1": 1 / num_classes, "zeroshot_top5": 5 / num_classes}
    return levels


def run_one(shards: Path, compression: int, seed: int, args: argparse.Namespace) -> dict:
    name = f"Ti-8-64-{compression}x-seed{seed}"
    argv = train.flags(model="ViT-Ti-8-64", compression=compression, seed=seed,
                       train_data=data.split_shards(shards, "train"), val_data=data.split_shards(shards, "test"),
                       zeroshot_data=SHARED_DATA / "cifar10-test", epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, warmup=args.warmup, workers=args.workers, threads=args.threads,
                       zeroshot_frequency=args.epochs, val_frequency=args.epochs, save_frequency=args.epochs,
                       logs=repo_path(args.work) / "runs", name=name, resume="latest")
    run_dir = repo_path(args.work) / "runs" / name
    epochs_csv = run_dir / "epochs.csv"
    done = epochs_csv.is_file() and len(pd.read_csv(epochs_csv)) == args.epochs
    if not done:
        train.run(argv)
    epochs = pd.read_csv(epochs_csv)
    params = json.loads((run_dir / "params.json").read_text())
    last = epochs.iloc[-1]
    later = epochs[~epochs["first_epoch"]]  # the first epoch's slower steps are reported apart
    return {"model": f"DTP-ViT-Ti-8-64-{compression}x", "compression_target": compression, "seed": seed,
            "epochs": args.epochs, "samples_seen": params["total_steps"] * args.batch_size,
            "realised_compression_last_epoch": last["compression"],
            **{m: last[m] for m in RETRIEVAL + ZEROSHOT},
            "step_time_s": later["step_time_s"].mean(), "first_epoch_step_time_s": epochs.iloc[0]["step_time_s"],
            "peak_rss_mb": epochs["peak_memory_mb"].max(), "run": os.path.relpath(run_dir, REPO_ROOT),
            **run_info("cpu", "fp32", args.batch_size)}


def report(rows: pd.DataFrame, levels: dict) -> str:
    """Markdown: per model the mean (min..max over seeds) of each metric, chance, and the step-time ratio."""
    metrics = RETRIEVAL + ZEROSHOT
    lines = ["| model | seeds | " + " | ".join(metrics) + " | step time (s) |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for model, group in rows.groupby("model", sort=False):
        cells = [f"{100 * group[m].mean():.1f} ({100 * group[m].min():.1f}..{100 * group[m].max():.1f})"
                 for m in metrics]
        lines.append(f"| {model} | {len(group)} | " + " | ".join(cells) + f" | {group['step_time_s'].mean():.3f} |")
    lines.append("| chance | | " + " | ".join(f"{100 * levels[m]:.1f}" for m in metrics) + " | |")
    times = rows.groupby("model", sort=False)["step_time_s"].mean()
    ratio = times.iloc[0] / times.iloc[-1] if len(times) > 1 else float("nan")
    first = rows.iloc[0]
    return "\n".join([
        "# Small run: DTP-ViT-Ti-8-64, 1x against 4x, on Flickr8k (CPU)",
        "",
        f"Train: Flickr8k train split ({rows['samples_seen'].iloc[0] // rows['epochs'].iloc[0]} samples an epoch), "
        f"{first['epochs']} epochs, batch {first['batch_size']}, the same samples seen by every run. Retrieval: "
        "Flickr8k test split (1000 images, 5 captions each, all counted). Zero-shot: CIFAR-10 test (10000 images, "
        "CLIP's 18 prompts). Numbers in %, mean (min..max) over seeds; step time: mean over epochs after the first.",
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
    out = repo_path(args.out)
    atomic_write_text(out / "small_run.csv", rows.to_csv(index=False))
    atomic_write_text(out / "small_run.md", report(rows, chance(data.split_shards(shards, "test"))))
    print((out / "small_run.md").read_text())
    return rows


if __name__ == "__main__":
    main()
