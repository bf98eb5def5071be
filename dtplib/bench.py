"""`python -m dtplib.bench`: step time and memory of models side by side (`dtplib.measure.bench`), written to
results/ as CSV, markdown and a speed-up figure (`dtplib.figures.compare.speedup_plot`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import pandas as pd
import torch

from .common.cli import run_cli
from .common.files import atomic_write_text
from .common.paths import repo_path
from .common.runtime import default_device
from .figures import compare
from .figures.plots import save_figure
from .measure.bench import MODES, bench, device_slug, markdown, memory_probe, parse_checkpoints, reference_index
from .measure.specs import parse_spec
from .tower.config import EXECUTIONS
from .training.config import ADAMW_IMPLS, TrainConfig


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(prog="python -m dtplib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ViT-Ti-8-64,DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-2x,DTP-ViT-Ti-8-64-4x,"
                                       "DTP-ViT-Ti-8-64-4x+packed,DTP-ViT-Ti-8-64-4x+padded,"
                                       "DTP-ViT-Ti-8-64-4x+batch-topk,DTP-ViT-Ti-8-64-4x+uniform,"
                                       "DTP-ViT-Ti-8-64-4x+topk,DTP-ViT-Ti-8-64-10x,DTP-ViT-Ti-8-64-10x+padded,"
                                       "ViT-Ti-8-64+pd0.5,ViT-Ti-8-64+pd0.75",
                   help="comma-separated open_clip names with modifiers: +pxSIZE input size (low resolution), "
                        "+pdRATE patch dropout; for DTP towers that pool +static, +packed, +padded (execution) and "
                        "+uniform, +topk, +batch-topk (boundaries), or one of +tome, +evit, +tokenlearner, +kmeans, "
                        "+prune alone (a reduction of the field at the same budget, docs/reductions.md)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--steps", type=int, default=30, help="timed steps per model and mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model and mode")
    p.add_argument("--execution", choices=EXECUTIONS, default="static",
                   help="execution of DTP towers without a +static/+packed/+padded modifier")
    p.add_argument("--torchcompile", action="store_true",
                   help="torch.compile every model (static shapes; one graph but for the host-planned packed and "
                        "padded executions); each model's first step compiles and is reported apart (compile_s); "
                        "needs --warmup >= 1. On a CPU the peak-RSS probes are skipped (they would measure the "
                        "eager step)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="learned boundaries from the trained runs (python -m dtplib.train folders) under this folder")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="learned boundaries of model NAME from this checkpoint (repeatable; over --checkpoint-dir); "
                        "a reduction's trained weights by its label, e.g. DTP-ViT-Ti-8-64-4x+tome=PATH")
    p.add_argument("--prior-steps", type=int, default=200, help="prior-only fit of models without a checkpoint")
    p.add_argument("--reference", default=None, help="model label that speed-ups are over; default: the first "
                                                     "DTP-...-1x, else the first model")
    p.add_argument("--modes", default="clip,image")
    p.add_argument("--device", default=None)
    p.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default=TrainConfig.adamw_impl,
                   help="the AdamW kernel of the timed update (as dtplib.train's --adamw-impl); every row uses it")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--no-memory", action="store_true",
                   help="CPU: skip the per-model peak-RSS processes (always skipped with --torchcompile)")
    p.add_argument("--out", default=None, help="CSV/markdown stem; default results/efficiency_<device>_<tag>")
    p.add_argument("--tag", default="", help="suffix of the default output name, e.g. ti or b32")
    p.add_argument("--plot", nargs="+", default=None, metavar="CSV",
                   help="only draw speed-up against compression (with the bounds) for these CSVs of one machine "
                        "into --out .png and .pdf")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-mode", default="clip", help=argparse.SUPPRESS)
    p.add_argument("--probe-state", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(parse_spec(args.memory_probe, args.execution), args.batch_size, args.precision,
                                      args.probe_mode, args.probe_state, args.adamw_impl)))
        return pd.DataFrame()
    if args.plot:
        if not args.out:
            p.error("--plot needs --out (the figure is written to <out>.png)")
        save_figure(compare.speedup_plot([repo_path(c) for c in args.plot]), repo_path(args.out).with_suffix(".png"),
                    pdf=True)
        return pd.DataFrame()
    modes = [m.strip() for m in args.modes.split(",")]
    if any(m not in MODES for m in modes) or args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
        p.error(f"need modes in {MODES}, --batch-size >= 2, --steps >= 1, --warmup >= 0")
    if args.torchcompile and args.warmup < 1:
        p.error("--torchcompile needs --warmup >= 1: the first step compiles")
    try:
        specs = [parse_spec(s, args.execution) for s in args.models.split(",") if s.strip()]
        if not specs:
            raise ValueError("--models is empty")
        checkpoints = parse_checkpoints(args.checkpoint, args.checkpoint_dir)
        reference_index(specs, args.reference)
    except (ValueError, FileNotFoundError) as exn:
        p.error(str(exn))
    frame = bench(specs, args.batch_size, args.precision, args.steps, args.warmup, args.device, args.prior_steps,
                  modes, measure_memory=not args.no_memory, checkpoints=checkpoints, reference=args.reference,
                  adamw_impl=args.adamw_impl, compiled=args.torchcompile)
    device = default_device(args.device)
    stem = repo_path(args.out) if args.out else repo_path("results") / (
        f"efficiency_{device_slug(device)}" + (f"_{args.tag}" if args.tag else ""))
    atomic_write_text(stem.with_suffix(".csv"), frame.to_csv(index=False))
    atomic_write_text(stem.with_suffix(".md"), markdown(frame))
    save_figure(compare.speedup_plot([stem.with_suffix(".csv")]), stem.with_suffix(".png"), pdf=True)
    print(markdown(frame))
    print(f"wrote {stem.with_suffix('.csv')}, .md and .png")
    return frame


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.bench")

