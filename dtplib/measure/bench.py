"""Side-by-side step time and memory: `python -m dtplib.bench --models A,B,... --batch-size N --precision P`.

Read top to bottom:
1. `parse_spec`: a model is an open_clip name (dtplib's DTP-ViT names included) with optional modifiers:
   `+px32` the input size (open_clip's `force_image_size`: CLIPA's low resolution), `+pd0.5` FLIP-style patch
   dropout (open_clip's `force_patch_dropout`), and for a DTP tower that pools `+packed`
   (host-planned) or `+padded` (the reference; `--execution` sets the default, the static-capacity path), and
   `+uniform` (a boundary every c patches), `+topk` (exactly ceil(N / c) segments per image) or `+batch-topk`
   (B * ceil(N / c) over the batch); without these the threshold rule with the capacity cap. Or `+tome`, `+evit`,
   `+tokenlearner`, `+kmeans`, `+prune`: that method of the field in place of the boundaries, at DTP's budget
   (docs/reductions.md). E.g. `DTP-ViT-B-32-4x+padded`, `DTP-ViT-B-32-4x+batch-topk`, `DTP-ViT-B-32-4x+tome`,
   `ViT-B-32+pd0.75`.
2. `Subject`: one model with its real input batch (Flickr8k photos and captions), optimiser and loss. Learned
   boundaries come from a trained checkpoint when one is given (`--checkpoint NAME=PATH`, or `--checkpoint-dir`
   holding `python -m dtplib.train` run folders), else from a short prior-only fit on the photos; every row of
   one model name uses the same weights, for timing and for memory alike. A reduction's row is at its seeded
   initialisation (the same trunk as its name's), or a trained run's weights by its label
   (`--checkpoint DTP-ViT-Ti-8-64-4x+tome=PATH`, or a `--checkpoint-dir` run trained with `--reduction tome`).
3. `bench`: every model in one process, interleaved step by step, warm-up steps dropped, device synchronised;
   the whole CLIP training step (forward, backward, and training's AdamW update with the `--adamw-impl` kernel,
   fused by default) and the image tower alone (forward and backward). `--torchcompile` wraps every model (and
   its image tower) in `torch.compile` with static shapes, one graph but where a tower reads its segment counts
   on the host (packed, padded);
   each model's first step compiles and is reported apart as `compile_s`, and the speed-ups are then compiled
   against compiled.
   Peak memory is CUDA's max allocated per model; on a CPU each model's peak RSS growth is measured in a fresh
   process that loads the same weights.
4. The table: median and p10..p90 of step time, images/s, peak memory, realised compression, forward GMACs, the
   speed-up over the reference (the same-code `DTP-...-1x` when it is in the list) and the analytic bound that
   `dtplib.flops` gives for the row's execution (static and packed: each image at its own count; padded: each
   batch at its largest), with efficiency = speed-up / bound; CSV, markdown and a figure in results/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
from open_clip.loss import ClipLoss

from ..common.files import markdown_table
from ..common.images import load_images
from ..common.paths import data_root, repo_path
from ..common.progress import progress
from ..common.provenance import run_info
from ..common.runtime import (
    autocast,
    check_precision,
    default_device,
    process_memory_mb,
    seed_everything,
    start_timer,
    synchronize,
)
from ..data.shards import read_captions
from ..tower.clip import parse_dtp_name, read_state_dict
from ..tower.control import fit_boundary_prior, forced_boundaries, get_tower, last_boundary_loss
from ..tower.model import token_budget
from ..training.checkpoint import load_state_dict, load_trained
from ..training.config import TrainConfig
from ..training.optim import make_optimizer
from ..training.runfolder import newest_checkpoint
from . import flops as dtp_flops
from .specs import Spec, create_spec_model, trained_label, trained_spec

MODES = ("clip", "image")  # whole CLIP training step; image tower forward + backward
FLICKR = data_root() / "flickr8k"  # DTPLIB_DATA as set when dtplib.bench is imported


# ----------------------------------------------------------------------------------------------------------
# 1. Model specs: `Spec`, `parse_spec` (dtplib.measure.specs)


def find_checkpoints(folder: str | Path) -> dict[str, Path]:
    """Model name -> latest checkpoint of the first (sorted) `python -m dtplib.train` run under `folder` that
    trained it, read from each run's params.json (--model, --compression, --upsample); a run trained with a
    reduction of the field is found by its label instead (`DTP-ViT-Ti-8-64-4x+tome`), as `bench` looks it up."""
    found = {}
    for params_file in sorted(Path(folder).glob("**/params.json")):
        params = json.loads(params_file.read_text())
        checkpoint = newest_checkpoint(params_file.parent)
        if checkpoint is None or "model" not in params:
            continue
        config = TrainConfig.from_dict(params)
        if config.dtp is not None and config.dtp.reduction != "dtp":
            found.setdefault(trained_label(config), checkpoint)
            continue
        if config.dtp is not None and (config.dtp.forced_boundaries is not None or config.dtp.patch_order != "raster"):
            continue  # not the registered tower: no predictor, or another reading order
        if config.force_image_size is not None:
            continue  # another input size: the spec's +pxSIZE, not the name alone
        found.setdefault(config.model_name, checkpoint)
    return found


def parse_checkpoints(pairs: Sequence[str], folder: str | None) -> dict[str, Path]:
    """--checkpoint NAME=PATH pairs over what --checkpoint-dir finds; every file must exist."""
    checkpoints = find_checkpoints(repo_path(folder)) if folder else {}
    if folder and not repo_path(folder).is_dir():
        raise FileNotFoundError(f"--checkpoint-dir {folder}: no such folder")
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise ValueError(f"--checkpoint {pair!r}: expected NAME=PATH")
        if not repo_path(path).is_file():
            raise FileNotFoundError(f"--checkpoint {pair!r}: no such file")
        checkpoints[name] = repo_path(path)
    return checkpoints


# ----------------------------------------------------------------------------------------------------------
# 2. One model with its inputs


PHOTOS: dict[tuple[str, int], tuple[torch.Tensor, list[str]]] = {}  # (preprocess, batch) -> photos and captions


def _real_batch(preprocess, tokenizer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch_size` Flickr8k photos (repeated if fewer) and their first captions. Decoded once per
    preprocessing and batch size: every model of a run reads the same photos (1024 of them take seconds)."""
    key = (repr(preprocess), batch_size)
    if key not in PHOTOS:
        files = sorted((FLICKR / "images").glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no photos under {FLICKR / 'images'} (DTPLIB_DATA, default ../shared/data)")
        captions = read_captions(FLICKR / "captions.tsv")
        chosen = [files[i % len(files)] for i in range(batch_size)]
        first = [captions[f.name].captions[0] if f.name in captions else "a photo" for f in chosen]
        PHOTOS[key] = load_images(chosen, preprocess), first  # B x 3 x H x W
    images, first = PHOTOS[key]
    return images, tokenizer(first)  # B x context


def _step_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.AdamW:
    """The update that training runs (`dtplib.training.optim.make_optimizer`: its parameter groups, the `impl` kernel)
    at a tiny learning rate, so that the timed steps barely move the weights and so the boundaries."""
    return make_optimizer(model, lr=1e-5, wd=TrainConfig.wd, impl=impl)


def adamw_impl_of(optimizer: torch.optim.Optimizer) -> str:
    return "fused" if optimizer.defaults.get("fused") else "torch"


@dataclass
class Subject:
    spec: Spec
    model: torch.nn.Module
    images: torch.Tensor
    texts: torch.Tensor
    optimizer: torch.optim.Optimizer
    source: str = ""  # where a pooling tower's weights (and so its learned boundaries or scores) come from
    label: str = ""  # the row's name when it is not the spec's (a trained run's arm)
    times: dict = field(default_factory=lambda: {m: [] for m in MODES})
    counts: list = field(default_factory=list)  # per step, the segments of every image (B,)
    peak_memory_mb: dict = field(default_factory=dict)
    compiled: bool = False  # each mode's callable wrapped in torch.compile (`runner`)
    compile_s: dict = field(default_factory=dict)  # mode -> wall time of its first step, which compiles
    runners: dict = field(default_factory=dict)  # mode -> what its steps call

    @property
    def fullgraph(self) -> bool:
        """One graph, as training compiles (`compile_for_training`): all but a DTP tower that plans on the host."""
        if not self.spec.pools:
            return True
        with self.boundary_context():  # uniform: forced boundaries, equal counts
            return not get_tower(self.model).plans_on_host()

    def runner(self, mode: str):
        """What a step of `mode` calls: the CLIP model, or its image tower (open_clip's encode_image, unnormalised);
        compiled, a torch.compile wrapper with static shapes, which compiles at its first call."""
        if mode not in self.runners:
            module = self.model if mode == "clip" else self.model.visual
            self.runners[mode] = torch.compile(module, fullgraph=self.fullgraph, dynamic=False) if self.compiled \
                else module
        return self.runners[mode]

    @property
    def compression(self) -> float:
        """Patches per token of the image tower: the token budget over the timed steps for DTP, 1 / (1 - rate) for
        patch dropout."""
        if self.counts:
            return token_budget(get_tower(self.model).num_patches, torch.stack(self.counts))
        return 1 / (1 - self.spec.patch_dropout) if self.spec.patch_dropout else 1.0

    def boundary_context(self):
        if self.spec.boundaries == "uniform":
            return forced_boundaries(self.model, max(1, round(get_tower(self.model).dtp.compression)))
        return contextlib.nullcontext()


def build_spec_model(spec: Spec, checkpoint: Path | None):
    """(model, preprocess_val) of a spec (`create_spec_model`), with a checkpoint's weights when one is given."""
    model, preprocess = create_spec_model(spec)
    if checkpoint is not None:
        load_state_dict(model, read_state_dict(checkpoint), source=checkpoint, name=spec.label)  # one line if foreign
    if spec.boundaries:
        tower = get_tower(model)
        tower.dtp.execution = spec.execution
        tower.dtp.boundaries = spec.boundaries if spec.boundaries in ("topk", "batch-topk") else "threshold"
    return model, preprocess


def make_subject(spec: Spec, batch_size: int, device: torch.device, prior_steps: int,
                 checkpoint: Path | None = None, fitted: dict | None = None,
                 adamw_impl: str = TrainConfig.adamw_impl, compiled: bool = False) -> Subject:
    """A spec's model on `device` with its batch (`compiled`: its steps run under torch.compile). Learned boundaries:
    the checkpoint's, or a prior-only fit (seeded; the fitted predictor is kept in `fitted` by name). The initial
    weights are seeded too, so every row of one name has the same tower and the same predictor, and so the same
    boundaries (before, an unseeded trunk gave a B/32 4x row 3.8x and its padded row 1.7x under one fitted
    predictor)."""
    seed_everything(0)
    model, preprocess = build_spec_model(spec, checkpoint)
    images, texts = _real_batch(preprocess, open_clip.get_tokenizer(spec.name), batch_size)
    model.to(device)
    source = ""
    if checkpoint is not None and spec.pools:
        source = f"checkpoint {os.path.relpath(checkpoint, repo_path('.'))}"
    elif spec.reduction:
        source = "seeded init"
    elif spec.pools:
        predictor = get_tower(model).predictor
        if fitted is not None and spec.name in fitted:
            predictor.load_state_dict(fitted[spec.name])
            source = f"prior-only fit, {prior_steps} steps"
        else:  # on at least 64 photos: a fit on a batch of 8 can drive every logit below zero
            seed_everything(0)
            photos = _real_batch(preprocess, open_clip.get_tokenizer(spec.name), max(64, batch_size))[0]
            fit_boundary_prior(model, photos.to(device), steps=prior_steps, batch_size=64)
            if fitted is not None:
                fitted[spec.name] = {k: v.detach().clone() for k, v in predictor.state_dict().items()}
            source = f"prior-only fit, {prior_steps} steps"
    model.train()
    return Subject(spec, model, images.to(device), texts.to(device), _step_optimizer(model, adamw_impl), source,
                   compiled=compiled)


def trained_subject(label: str, checkpoint: Path, batch_size: int, device: torch.device,
                    adamw_impl: str | None = None) -> Subject:
    """A `dtplib.train` checkpoint as it was trained (forced boundaries, reading order, boundary mode, patch dropout,
    execution and, unless `adamw_impl` is given, the AdamW kernel from its TrainConfig), with its weights, so its
    learned boundaries are the ones timed."""
    model, preprocess, tokenizer, config = load_trained(checkpoint, device)
    spec = trained_spec(config)
    images, texts = _real_batch(preprocess, tokenizer, batch_size)
    model.train()
    return Subject(spec, model, images.to(device), texts.to(device),
                   _step_optimizer(model, adamw_impl or config.adamw_impl),
                   f"checkpoint {os.path.relpath(checkpoint, repo_path('.'))}", label=label)


def time_checkpoints(checkpoints: dict[str, Path], batch_size: int, steps: int = 30, warmup: int = 5,
                     reference: str | None = None, device: str | None = None) -> pd.DataFrame:
    """The whole CLIP training step of trained checkpoints (label -> path), each with the AdamW kernel it was
    trained with, timed in turn in one process (fp32), as `table` rows named by label; speed-ups against
    `reference` (a label; default the first)."""
    device = default_device(device)
    subjects = [trained_subject(label, Path(path), batch_size, device) for label, path in checkpoints.items()]
    _time_interleaved(subjects, ("clip",), steps, warmup, "fp32", device)
    return table(subjects, batch_size, "fp32", device, ("clip",), reference)


def step(subject: Subject, mode: str, precision: str, device: torch.device, loss_fn: ClipLoss,
         peak: bool = True) -> float:
    """One timed step; returns seconds. Records the segment counts of DTP towers that pool (the tower's
    `last_segments`, read after the step: a trace would append inside a compiled forward) and, on CUDA, the peak
    memory unless `peak` is False (a compiling step's)."""
    model, run = subject.model, subject.runner(mode)
    start = start_timer(device)
    with subject.boundary_context(), autocast(precision, device):
        if mode == "clip":
            image_features, text_features, logit_scale = run(subject.images, subject.texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            boundary = last_boundary_loss(model)
            loss = loss + boundary if boundary is not None and subject.spec.boundaries != "uniform" else loss
        else:
            loss = run(subject.images).float().square().mean()
    loss.backward()
    if mode == "clip":
        subject.optimizer.step()
    subject.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda" and peak:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        subject.peak_memory_mb[mode] = max(subject.peak_memory_mb.get(mode, 0.0), peak_mb)
    if subject.spec.pools:
        subject.counts.append(get_tower(model).last_segments.detach().cpu())  # B
    return elapsed


# ----------------------------------------------------------------------------------------------------------
# 3. The interleaved benchmark


def _time_interleaved(subjects: Sequence[Subject], modes: Sequence[str] = MODES, steps: int = 30, warmup: int = 5,
                     precision: str = "fp32", device: str | torch.device = "cpu") -> None:
    """Time the subjects step by step in turn, so that drift in clocks or load hits every model alike; the times
    after `warmup` steps are appended to each subject's `times[mode]`. A compiled subject's first step (a warm-up
    step) builds its graphs: its wall time is `compile_s[mode]`."""
    device, loss_fn = torch.device(device), ClipLoss()
    compiled = [s for s in subjects if s.compiled]
    if compiled and warmup < 1:
        raise ValueError("compiled models need --warmup >= 1: the first step compiles")
    # every model's forward is one code object (CLIP.forward, or its tower's): each further model recompiles it,
    # and past dynamo's recompile limit (8) the rest would run eager without a word
    limit = max(torch._dynamo.config.recompile_limit, 2 * len(compiled) + 8)
    with torch._dynamo.config.patch(recompile_limit=limit):
        for mode in modes:
            for index in progress(range(warmup + steps), desc=f"bench {mode}"):
                for subject in subjects:
                    compiling = subject.compiled and index == 0
                    elapsed = step(subject, mode, precision, device, loss_fn, peak=not compiling)
                    if compiling:
                        subject.compile_s[mode] = elapsed
                    if index >= warmup:
                        subject.times[mode].append(elapsed)


def bench(specs: Sequence[Spec], batch_size: int, precision: str = "fp32", steps: int = 30, warmup: int = 5,
          device: str | None = None, prior_steps: int = 200, modes: Sequence[str] = MODES,
          measure_memory: bool = True, checkpoints: dict[str, Path] | None = None,
          reference: str | None = None, adamw_impl: str = TrainConfig.adamw_impl,
          compiled: bool = False) -> pd.DataFrame:
    """Time every model in one process, step by step in turn, and return one row per model and mode. `compiled`:
    every model under torch.compile; a CPU's peak-RSS probes are then skipped (they would measure the eager step)."""
    device = default_device(device)
    check_precision(precision, device)
    checkpoints = checkpoints or {}
    fitted = {}
    subjects = [make_subject(s, batch_size, device, prior_steps, checkpoints.get(s.label if s.reduction else s.name),
                             fitted, adamw_impl, compiled) for s in specs]
    _time_interleaved(subjects, modes, steps, warmup, precision, device)
    if measure_memory and device.type == "cpu" and not compiled:
        with tempfile.TemporaryDirectory() as folder:
            for index, subject in enumerate(subjects):
                state = Path(folder) / f"{index}.pt"
                torch.save(subject.model.state_dict(), state)  # the same weights, so the same boundaries
                for mode in modes:
                    subject.peak_memory_mb[mode] = _cpu_peak_rss(subject.spec, batch_size, precision, mode, state,
                                                                adamw_impl)
    return table(subjects, batch_size, precision, device, modes, reference)


def _cpu_peak_rss(spec: Spec, batch_size: int, precision: str, mode: str, state: Path,
                 adamw_impl: str = TrainConfig.adamw_impl) -> float:
    """Peak RSS growth (MiB) of a fresh process over 3 steps of one model: a CPU has no per-model allocator peak."""
    command = [sys.executable, "-m", "dtplib.bench", "--memory-probe", spec.label, "--batch-size", str(batch_size),
               "--precision", precision, "--probe-mode", mode, "--probe-state", str(state), "--adamw-impl", adamw_impl]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def memory_probe(spec: Spec, batch_size: int, precision: str, mode: str, state: str,
                 adamw_impl: str = TrainConfig.adamw_impl) -> dict:
    model, preprocess = build_spec_model(spec, None)
    model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
    images, texts = _real_batch(preprocess, open_clip.get_tokenizer(spec.name), batch_size)
    subject = Subject(spec, model.train(), images, texts, _step_optimizer(model, adamw_impl))
    baseline = process_memory_mb("VmRSS")  # model, optimizer, inputs: what is not the step's own memory
    for _ in range(3):
        step(subject, mode, precision, torch.device("cpu"), ClipLoss())
    return {"peak_mb": process_memory_mb("VmHWM") - baseline}


# ----------------------------------------------------------------------------------------------------------
# 4. The table


def _forward_macs(subject: Subject, mode: str, execution: str = "packed") -> float:
    """Forward MACs per image (image tower, plus the text tower for clip) at the measured segment counts: packed
    (and static), the mean over images of each image's own cost; padded, every image at its step's largest count."""
    segments = None
    if subject.counts:
        counts = torch.stack(subject.counts).double()  # steps x B
        segments = counts.amax(1, keepdim=True).expand_as(counts) if execution == "padded" else counts
        segments = segments.flatten()
    costs = dtp_flops.clip_macs_at(subject.model, segments=segments, patch_dropout=subject.spec.patch_dropout,
                                   execution=execution)
    return costs["image"] + (costs["text"] if mode == "clip" else 0.0)


def reference_index(specs: Sequence[Spec], reference: str | None) -> int:
    """The row that speed-ups are taken against: `reference`, else the first same-code DTP-...-1x at its own input
    size, else the first."""
    labels = [s.label for s in specs]
    if reference is not None:
        if reference not in labels:
            raise ValueError(f"--reference {reference!r} is not one of --models: {labels}")
        return labels.index(reference)
    same_code = [i for i, s in enumerate(specs) if (parse_dtp_name(s.name) or ("", 0, False))[1] == 1
                 and s.image_size is None]
    return same_code[0] if same_code else 0


def table(subjects: Sequence[Subject], batch_size: int, precision: str, device: torch.device,
          modes: Sequence[str], reference: str | None = None) -> pd.DataFrame:
    rows = []
    if any(s.label for s in subjects):  # trained runs: the reference is a label, else the first
        labels = [s.label for s in subjects]
        if reference is not None and reference not in labels:
            raise ValueError(f"reference {reference!r} is not one of the timed runs: {labels}")
        base = subjects[labels.index(reference) if reference is not None else 0]
    else:
        base = subjects[reference_index([s.spec for s in subjects], reference)]
    for mode in modes:
        base_time, base_macs = float(np.median(base.times[mode])), _forward_macs(base, mode)
        for subject in subjects:
            times = np.array(subject.times[mode])
            median = float(np.median(times))
            macs, padded_macs = _forward_macs(subject, mode), _forward_macs(subject, mode, "padded")
            counts = torch.stack(subject.counts).double() if subject.counts else None
            bound, padded_bound = base_macs / macs, base_macs / padded_macs
            own_bound = padded_bound if subject.spec.execution == "padded" else bound
            rows.append({
                "model": subject.label or subject.spec.label, "mode": mode, "execution": subject.spec.execution,
                "boundaries": subject.spec.boundaries, "reduction": subject.spec.reduction,
                "boundary_source": subject.source,
                "median_s": median, "p10_s": float(np.percentile(times, 10)), "p90_s": float(np.percentile(times, 90)),
                "images_per_s": batch_size / median, "peak_memory_mb": subject.peak_memory_mb.get(mode),
                "realised_compression": subject.compression,
                "segments_mean": counts.mean().item() if counts is not None else float("nan"),
                "segments_std": counts.std().item() if counts is not None else float("nan"),
                "max_segments": counts.amax(1).mean().item() if counts is not None else float("nan"),
                "forward_gmacs": macs / 1e9, "speedup": base_time / median,
                "analytic_bound": bound, "padded_bound": padded_bound, "efficiency": base_time / median / own_bound,
                "reference": base.label or base.spec.label, "steps": len(times),
                "adamw": adamw_impl_of(subject.optimizer), "compiled": subject.compiled,
                "compile_s": subject.compile_s.get(mode, float("nan")),
                **run_info(device, precision, batch_size)})
    frame = pd.DataFrame(rows)
    frame["memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
    return frame


def _tokens_source(row) -> str:
    """Where a pooling row's tokens come from, for the markdown: "learned (prior fit)", "uniform", "tome (checkpoint)",
    "kmeans (seeded init)"; "" for a tower that does not pool. CSVs from before the reductions have no `reduction`."""
    reduction = row.get("reduction", "")
    kind = reduction if isinstance(reduction, str) and reduction else row["boundaries"]
    if not isinstance(kind, str) or not kind:
        return ""
    if str(row["boundary_source"]).startswith("checkpoint"):
        return f"{kind} (checkpoint)"
    return f"{kind} (seeded init)" if kind == reduction else f"{kind} (prior fit)" if kind in (
        "learned", "topk", "batch-topk") else kind


def _has_reductions(frame: pd.DataFrame) -> bool:
    return "reduction" in frame and bool(frame["reduction"].fillna("").astype(str).ne("").any())


def markdown(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    compiled = bool(frame["compiled"].any())
    lines = [f"Hardware: {first['hardware']}; {first['dtype']}; batch {first['batch_size']}; torch {first['torch']}; "
             f"commit {first['commit']}; {first['steps']} timed steps after warm-up, models interleaved; "
             f"AdamW {' / '.join(frame['adamw'].unique())}"
             + ("; compiled (torch.compile, static shapes), the first step's wall time reported as the compile "
                "time, apart from the step statistics." if compiled else "."),
             f"Memory: {first['memory_kind']}. Speed-ups are over {first['reference']}. A bound is the ratio of "
             "forward GMACs (image tower, plus the text tower for the clip step) to the reference's: packed (and "
             "static), each image at its own segment count; padded, each batch at its largest. Efficiency is the "
             "speed-up over the bound of the row's own execution."
             + (" A reduction of the field (docs/reductions.md) runs every image at DTP's budget, CLS + ceil(N / c) "
                "tokens in the shortened layers (ToMe: its MAC-matched schedule); its own work (matching, "
                "clustering, scoring) is in its GMACs and its step." if _has_reductions(frame) else ""), ""]
    rows = []
    for _, r in frame.iterrows():
        memory = "" if pd.isna(r["peak_memory_mb"]) else f"{r['peak_memory_mb']:.0f}"
        segments = "" if pd.isna(r["max_segments"]) else f"{r['segments_mean']:.1f} / {r['max_segments']:.1f}"
        source = _tokens_source(r)
        compile_s = [f"{r['compile_s']:.1f}" if r["compiled"] else ""] if compiled else []
        rows.append([r["mode"], r["model"], source, *compile_s, f"{r['median_s']:.4f}",
                     f"{r['p10_s']:.4f}..{r['p90_s']:.4f}", f"{r['images_per_s']:.1f}", memory,
                     f"{r['realised_compression']:.2f}", segments, f"{r['forward_gmacs']:.3f}", f"{r['speedup']:.2f}x",
                     f"{r['analytic_bound']:.2f}x", f"{r['padded_bound']:.2f}x", f"{100 * r['efficiency']:.0f}%"])
    lines += markdown_table(["mode", "model", "boundaries / reduction", *(["compile (s)"] if compiled else []),
                             "median step (s)", "p10..p90 (s)", "images/s", "peak memory (MiB)", "compression",
                             "segments mean / batch max", "forward GMACs", "speed-up", "bound, packed",
                             "bound, padded", "efficiency"], rows)
    return "\n".join(lines) + "\n"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")
