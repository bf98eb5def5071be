"""Side-by-side step time and memory: `python -m dtplib.bench --models A,B,... --batch-size N --precision P`.

Read top to bottom:
1. `parse_spec`: a model is an open_clip name (dtplib's DTP-ViT names included), with `+pd0.5` for FLIP-style
   patch dropout (open_clip's `force_patch_dropout`), e.g. `ViT-B-32+pd0.75`.
2. `Subject`: one model with its real input batch (Flickr8k photos and captions), optimiser and loss; DTP towers
   get their boundaries either from a short prior-only fit (`--boundaries prior`, the default: realised, content-
   dependent counts) or forced uniform at the target ratio (`--boundaries forced`: the exact simulated budget).
3. `bench`: every model in one process, interleaved step by step, warm-up steps dropped, device synchronised;
   the whole CLIP training step (forward, backward, AdamW) and the image tower alone (forward and backward).
   Peak memory is CUDA's max allocated per model; on a CPU each model's peak RSS is measured in a fresh process.
4. The table: median and spread of step time, images/s, peak memory, realised compression, the analytic speed-up
   bound from `dtplib.flops` and each model's measured ratio to the first; CSV and markdown in results/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import open_clip
import pandas as pd
import torch
from open_clip.loss import ClipLoss
from PIL import Image

from dtplib import flops as dtp_flops
from dtplib import summary
from dtplib.data import read_captions
from dtplib.model import dtp_towers, fit_boundary_prior, forced_boundaries, get_tower, last_boundary_loss, trace
from dtplib.utils import (
    SHARED_DATA,
    atomic_write_bytes,
    atomic_write_text,
    autocast,
    process_memory_mb,
    repo_path,
    run_info,
    synchronize,
)

MODES = ("clip", "image")  # whole CLIP training step; image tower forward + backward
FLICKR = SHARED_DATA / "flickr8k"


# ----------------------------------------------------------------------------------------------------------
# 1. Model specs


@dataclass(frozen=True)
class Spec:
    """An open_clip model name and an optional patch-dropout rate (a FLIP-style peer)."""

    name: str
    patch_dropout: float | None = None

    @property
    def label(self) -> str:
        return self.name + (f"+pd{self.patch_dropout:g}" if self.patch_dropout else "")


def parse_spec(text: str) -> Spec:
    match = re.fullmatch(r"([^+]+)(?:\+pd([0-9.]+))?", text.strip())
    if not match:
        raise ValueError(f"model spec {text!r}: expected NAME or NAME+pdRATE (e.g. ViT-B-32+pd0.5)")
    name, rate = match.group(1), match.group(2)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r} in --models (see open_clip.list_models())")
    if rate is not None and not 0 < float(rate) < 1:
        raise ValueError(f"patch dropout in {text!r} must be in (0, 1)")
    return Spec(name, float(rate) if rate is not None else None)


# ----------------------------------------------------------------------------------------------------------
# 2. One model with its inputs


def real_batch(preprocess, tokenizer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch_size` Flickr8k photos (repeated if fewer) and their first captions."""
    files = sorted((FLICKR / "images").glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no photos under {FLICKR / 'images'} (../shared/data beside the repository)")
    captions = read_captions(FLICKR / "captions.tsv")
    chosen = [files[i % len(files)] for i in range(batch_size)]
    images = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in chosen])  # B x 3 x H x W
    first = [captions[f.name].captions[0] if f.name in captions else "a photo" for f in chosen]
    return images, tokenizer(first)  # B x context


@dataclass
class Subject:
    spec: Spec
    model: torch.nn.Module
    images: torch.Tensor
    texts: torch.Tensor
    optimizer: torch.optim.Optimizer
    boundaries: str
    times: dict = field(default_factory=lambda: {m: [] for m in MODES})
    compression: list = field(default_factory=list)
    segments: list = field(default_factory=list)
    max_segments: list = field(default_factory=list)
    peak_memory_mb: dict = field(default_factory=dict)

    @property
    def is_dtp(self) -> bool:
        return bool(dtp_towers(self.model)) and get_tower(self.model).predictor is not None

    def boundary_context(self):
        if self.is_dtp and self.boundaries == "forced":
            return forced_boundaries(self.model, max(1, round(get_tower(self.model).dtp.compression)))
        return contextlib.nullcontext()


def make_subject(spec: Spec, batch_size: int, device: torch.device, boundaries: str, prior_steps: int) -> Subject:
    options = {"force_patch_dropout": spec.patch_dropout} if spec.patch_dropout else {}
    model, _, preprocess = open_clip.create_model_and_transforms(spec.name, **options)
    images, texts = real_batch(preprocess, open_clip.get_tokenizer(spec.name), batch_size)
    model.to(device)
    subject = Subject(spec, model, images.to(device), texts.to(device),
                      torch.optim.AdamW(model.parameters(), lr=1e-5), boundaries)
    if subject.is_dtp and boundaries == "prior":  # realised boundaries at the intended budget, not a random net's
        fit_boundary_prior(model, images.to(device), steps=prior_steps, batch_size=min(64, batch_size))
    model.train()
    return subject


def step(subject: Subject, mode: str, precision: str, device: torch.device, loss_fn: ClipLoss) -> float:
    """One timed step; returns seconds. Records realised compression of DTP towers."""
    model = subject.model
    traced = trace(model) if subject.is_dtp else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    with subject.boundary_context(), traced as record, autocast(precision, device):
        if mode == "clip":
            image_features, text_features, logit_scale = model(subject.images, subject.texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            boundary = last_boundary_loss(model)
            loss = loss + boundary if boundary is not None and subject.boundaries == "prior" else loss
        else:
            loss = model.encode_image(subject.images).float().square().mean()
    loss.backward()
    if mode == "clip":
        subject.optimizer.step()
    subject.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        subject.peak_memory_mb[mode] = max(subject.peak_memory_mb.get(mode, 0.0), peak)
    if subject.is_dtp:
        subject.compression.append(record.boundaries.shape[1] / record.tokens.float().mean().item())  # budget
        subject.segments.append(record.tokens.float().mean().item())
        subject.max_segments.append(record.tokens.max().item())  # what the padded batch pays
    return elapsed


# ----------------------------------------------------------------------------------------------------------
# 3. The interleaved benchmark


def bench(specs: Sequence[Spec], batch_size: int, precision: str = "fp32", steps: int = 20, warmup: int = 5,
          device: str | None = None, boundaries: str = "prior", prior_steps: int = 200,
          modes: Sequence[str] = MODES, measure_memory: bool = True) -> pd.DataFrame:
    """Time every model in one process, step by step in turn, and return one row per model and mode."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast on a CPU is about 17x slower than fp32; use fp32 or bf16")
    subjects = [make_subject(s, batch_size, device, boundaries, prior_steps) for s in specs]
    loss_fn = ClipLoss()
    for mode in modes:
        for index in range(warmup + steps):
            for subject in subjects:  # interleaved: drift in clocks or load hits every model alike
                elapsed = step(subject, mode, precision, device, loss_fn)
                if index >= warmup:
                    subject.times[mode].append(elapsed)
    if measure_memory and device.type == "cpu":
        for subject in subjects:
            for mode in modes:
                subject.peak_memory_mb[mode] = cpu_peak_rss(subject.spec, batch_size, precision, mode, boundaries)
    return table(subjects, batch_size, precision, device, modes)


def cpu_peak_rss(spec: Spec, batch_size: int, precision: str, mode: str, boundaries: str) -> float:
    """Peak RSS growth (MiB) of a fresh process over 3 steps of one model: a CPU has no per-model allocator peak."""
    command = [sys.executable, "-m", "dtplib.bench", "--memory-probe", spec.label, "--batch-size", str(batch_size),
               "--precision", precision, "--probe-mode", mode, "--boundaries", boundaries]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def memory_probe(spec: Spec, batch_size: int, precision: str, mode: str, boundaries: str) -> dict:
    subject = make_subject(spec, batch_size, torch.device("cpu"), boundaries, prior_steps=20)
    baseline = process_memory_mb("VmRSS")  # model, optimizer, inputs: what is not the step's own memory
    for _ in range(3):
        step(subject, mode, precision, torch.device("cpu"), ClipLoss())
    return {"peak_mb": process_memory_mb("VmHWM") - baseline}



# ----------------------------------------------------------------------------------------------------------
# 4. The table


def analytic_macs(subject: Subject, mode: str, padded: bool = False) -> float:
    """Forward MACs of the model at its measured mean segment count (packed: each image at its own count) or, with
    `padded`, at each batch's largest count (what the padded implementation computes); image + text for clip."""
    counts = subject.max_segments if padded else subject.segments
    segments = float(np.mean(counts)) if counts else None
    costs = dtp_flops.clip_macs_at(subject.model, segments=segments, patch_dropout=subject.spec.patch_dropout)
    return costs["image"] + (costs["text"] if mode == "clip" else 0.0)


def realised_compression(subject: Subject) -> float:
    """Patches per token of the image tower: N / mean segments for DTP, 1 / (1 - rate) for patch dropout."""
    if subject.compression:
        return float(np.mean(subject.compression))
    return 1 / (1 - subject.spec.patch_dropout) if subject.spec.patch_dropout else 1.0


def table(subjects: Sequence[Subject], batch_size: int, precision: str, device: torch.device,
          modes: Sequence[str]) -> pd.DataFrame:
    rows = []
    for mode in modes:
        first_time = float(np.median(subjects[0].times[mode]))
        first_macs = analytic_macs(subjects[0], mode)
        for subject in subjects:
            times = np.array(subject.times[mode])
            median = float(np.median(times))
            macs = analytic_macs(subject, mode)
            padded_macs = analytic_macs(subject, mode, padded=True)
            rows.append({
                "model": subject.spec.label, "mode": mode, "boundaries": subject.boundaries if subject.is_dtp else "",
                "median_s": median, "p10_s": float(np.percentile(times, 10)), "p90_s": float(np.percentile(times, 90)),
                "images_per_s": batch_size / median, "peak_memory_mb": subject.peak_memory_mb.get(mode),
                "realised_compression": realised_compression(subject),
                "forward_gmacs": macs / 1e9, "speedup": first_time / median,
                "analytic_bound": first_macs / macs, "padded_bound": first_macs / padded_macs,
                "max_segments": float(np.mean(subject.max_segments)) if subject.max_segments else float("nan"),
                "steps": len(times),
                **run_info(device, precision, batch_size)})
    frame = pd.DataFrame(rows)
    frame["memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
    return frame


def markdown(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    lines = [f"Hardware: {first['hardware']}; {first['dtype']}; batch {first['batch_size']}; torch {first['torch']}; "
             f"commit {first['commit']}; {first['steps']} timed steps after warm-up, models interleaved.",
             f"Memory: {first['memory_kind']}. Speed-up and bounds are relative to the first model of each mode; a "
             "bound is the ratio of forward GMACs (image tower, plus the text tower for the clip step): packed at the "
             "mean segment count, padded at each batch's largest count (what this implementation computes).", "",
             "| mode | model | median step (s) | p10..p90 (s) | images/s | peak memory (MiB) | compression | "
             "max segments | forward GMACs | speed-up | bound, packed | bound, padded |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        memory = "" if pd.isna(r["peak_memory_mb"]) else f"{r['peak_memory_mb']:.0f}"
        max_segments = "" if pd.isna(r["max_segments"]) else f"{r['max_segments']:.1f}"
        lines.append(f"| {r['mode']} | {r['model']} | {r['median_s']:.4f} | {r['p10_s']:.4f}..{r['p90_s']:.4f} | "
                     f"{r['images_per_s']:.1f} | {memory} | {r['realised_compression']:.2f} | "
                     f"{max_segments} | "
                     f"{r['forward_gmacs']:.3f} | {r['speedup']:.2f}x | {r['analytic_bound']:.2f}x | "
                     f"{r['padded_bound']:.2f}x |")
    return "\n".join(lines) + "\n"


def save_figure(figure, path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(prog="python -m dtplib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ViT-Ti-8-64,DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-2x,DTP-ViT-Ti-8-64-4x,"
                                       "DTP-ViT-Ti-8-64-10x,ViT-Ti-8-64+pd0.5,ViT-Ti-8-64+pd0.75",
                   help="comma-separated open_clip names, NAME+pdRATE for patch dropout; ratios are to the first")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model and mode")
    p.add_argument("--boundaries", choices=("prior", "forced"), default="prior",
                   help="DTP boundaries: after a prior-only fit (realised) or forced uniform at the target ratio")
    p.add_argument("--prior-steps", type=int, default=200)
    p.add_argument("--modes", default="clip,image")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-model peak-RSS processes")
    p.add_argument("--out", default=None, help="CSV/markdown stem; default results/efficiency_<device>_<tag>")
    p.add_argument("--tag", default="", help="suffix of the default output name, e.g. ti or b32")
    p.add_argument("--plot", nargs="+", default=None, metavar="CSV",
                   help="only draw speed-up against compression (with the bounds) for these CSVs into --out .png")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-mode", default="clip", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(parse_spec(args.memory_probe), args.batch_size, args.precision,
                                      args.probe_mode, args.boundaries)))
        return pd.DataFrame()
    if args.plot:
        if not args.out:
            raise SystemExit("--plot needs --out (the figure is written to <out>.png)")
        save_figure(summary.speedup_plot([repo_path(c) for c in args.plot]), repo_path(args.out).with_suffix(".png"))
        return pd.DataFrame()
    specs = [parse_spec(s) for s in args.models.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",")]
    if not specs or any(m not in MODES for m in modes) or args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"need models, modes in {MODES}, --batch-size >= 2, --steps >= 1, --warmup >= 0")
    frame = bench(specs, args.batch_size, args.precision, args.steps, args.warmup, args.device, args.boundaries,
                  args.prior_steps, modes, measure_memory=not args.no_memory)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stem = repo_path(args.out) if args.out else repo_path("results") / (
        f"efficiency_{device_slug(device)}" + (f"_{args.tag}" if args.tag else ""))
    atomic_write_text(stem.with_suffix(".csv"), frame.to_csv(index=False))
    atomic_write_text(stem.with_suffix(".md"), markdown(frame))
    save_figure(summary.speedup_plot([stem.with_suffix(".csv")]), stem.with_suffix(".png"))
    print(markdown(frame))
    print(f"wrote {stem.with_suffix('.csv')}, .md and .png")
    return frame


if __name__ == "__main__":
    main()
