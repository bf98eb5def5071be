"""Beyond contrastive pretraining: zero-shot of open_clip's pretrained CLIPs, linear probes and finetuning.

Read top to bottom:
1. `pretrained_zeroshot`: zero-shot top-1/top-5 of pretrained CLIPs ("RN50x16/openai", "ViT-B-16", ...) whose
   weights are on disk, one row per model; a model whose weights are missing gets a status and the message of
   `dtplib.evaluate` (how to fetch them) instead of an exception.
2-3. `imagefolder_split` (a deterministic, disjoint train / test split of an ImageFolder), `extract_features` and
   `linear_probe` (frozen CLIP image embeddings, then an L2-regularised logistic regression fitted with L-BFGS) live
   in `dtplib.evaluate`, which also scores the probe (`probe_eval`); they are imported here, so
   `finetune.linear_probe` and the others still work.
4. `zeroshot_head`, `finetune`: the whole image tower and a linear head, trained with cross-entropy, AdamW and a
   cosine schedule on open_clip's training augmentation; a DTP tower adds its boundary prior so that the token
   budget holds. The head starts as the zero-shot classifier (WiSE-FT's convention) or as a linear probe (LP-FT).
5. `dtp_from_vit`: a DTP-ViT CLIP initialised from a plain CLIP ViT (`load_vit_weights`), its boundary predictor
   fitted to the prior on a few real images so that finetuning starts at the target token budget.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common.images import load_images
from .common.paths import repo_path
from .common.provenance import run_info
from .common.runtime import eval_mode, seed_everything, unwrap
from .data.imagefolder import ImageFolderSplit, Sample, image_loader, zeroshot_classes
from .measure import evaluate as ev
from .measure.evaluate import ProbeResult, extract_features, head_accuracy, linear_probe
from .tower.clip import (
    LoadReport,
    check_model_name,
    check_pretrained,
    create_model_and_transforms,
    load_dtp_weights,
    load_vit_weights,
    read_state_dict,
)
from .tower.control import dtp_towers, fit_boundary_prior, get_tower, trace, use_config
from .tower.model import token_budget
from .training.optim import NonFiniteLoss, lr_at, make_optimizer, train_step

# ----------------------------------------------------------------------------------------------------------
# 1. Zero-shot of pretrained open_clip models


def _parse_pretrained(spec: str | tuple[str, str | None]) -> tuple[str, str]:
    """("RN50x16", "openai") from "RN50x16/openai" or a (name, tag) pair; the tag may also be a weights file.

    A name without a tag ("ViT-B-16") means open_clip's first tag for that model (`list_pretrained_tags_by_model`,
    OpenAI's weights where they exist). Everything after the first "/" is the tag, so "ViT-B-32//data/w.pt" names
    a file. Unknown names and tags raise ValueError.
    """
    if isinstance(spec, tuple):
        name, tag = spec
    else:
        name, _, tag = spec.strip().partition("/")
    check_model_name(name)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tag:
        if not tags:
            raise ValueError(f"{name} has no open_clip pretrained tags; give weights as {name}/<file>")
        tag = tags[0]
    if not os.path.isfile(tag) and tag not in tags:
        raise ValueError(f"pretrained {tag!r} is neither a file nor a tag of {name} (tags: {tags or 'none'})")
    return name, tag


def pretrained_zeroshot(specs: str | Sequence[str | tuple[str, str]], data_dir: str | Path, *,
                        max_per_class: int | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
                        workers: int = 0) -> pd.DataFrame:
    """Zero-shot top-1/top-5 on an ImageFolder for each pretrained CLIP, one row per spec, in the given order.

    `specs`: "NAME/TAG" strings (or one comma-separated string, or (name, tag) pairs), see `_parse_pretrained`. All
    specs are checked before any model is loaded. Weights come from disk (open_clip's Hugging Face cache, or a file);
    where HF_HUB_OFFLINE is unset, missing ones are fetched, as `python -m dtplib.evaluate` does. A model whose
    weights cannot be had gets status "weights not on disk" and the reason in `message`; the others "ok".
    """
    if isinstance(specs, str):
        specs = [spec for spec in specs.split(",") if spec.strip()]
    parsed = [_parse_pretrained(spec) for spec in specs]
    data_dir = repo_path(data_dir)
    zeroshot_classes(data_dir)  # a missing or empty folder fails before any model work
    rows = []
    for name, tag in parsed:
        row = {"model": name, "pretrained": tag, "status": "ok", "top1": float("nan"), "top5": float("nan"),
               "images": 0, "message": ""}
        try:
            check_pretrained(name, tag)
        except RuntimeError as exn:
            rows.append({**row, "status": "weights not on disk", "message": str(exn)})
            continue
        start = time.perf_counter()
        model, preprocess, tokenizer = ev.load_model(name, pretrained=tag, device=device)
        metrics = ev.zero_shot_eval(model, preprocess, tokenizer, data_dir, batch_size=batch_size, device=device,
                                    max_per_class=max_per_class, workers=workers)
        del model
        rows.append({**row, "top1": metrics["zeroshot_top1"], "top5": metrics["zeroshot_top5"],
                     "images": metrics["zeroshot_images"], "seconds": time.perf_counter() - start})
    return pd.DataFrame([{**row, "data": str(data_dir), "max_per_class": max_per_class,
                          **run_info(device, "fp32", batch_size)} for row in rows])


# ----------------------------------------------------------------------------------------------------------
# 2. Finetuning the image tower with a linear head


def zeroshot_head(model: nn.Module, tokenizer, classnames: Sequence[str], layout: str = "names",
                  templates: Sequence | None = None, device: str | torch.device = "cpu") -> nn.Linear:
    """CLIP's zero-shot classifier as a linear layer on normalised image embeddings (WiSE-FT's head).

    weight = exp(logit_scale) x the mean prompt embedding of each class (unit rows), bias 0: its logits are
    CLIP's zero-shot logits. `templates` default to `evaluate.templates_for(layout)`.
    """
    model = unwrap(model)
    with eval_mode(model):
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, list(classnames), templates or ev.templates_for(layout), device=device).float()  # D x C
        scale = model.logit_scale.exp().float().item() if hasattr(model, "logit_scale") else 1.0
    head = nn.Linear(classifier.shape[0], classifier.shape[1]).to(device)
    with torch.no_grad():
        head.weight.copy_(scale * classifier.T)
        head.bias.zero_()
    return head


class ImageClassifier(nn.Module):
    """A CLIP image tower and a linear head on its normalised embedding (the text tower is left out)."""

    def __init__(self, visual: nn.Module, head: nn.Linear):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(F.normalize(self.visual(images), dim=-1))  # B x C


def _segments_per_image(model: nn.Module, samples: Sequence[Sample], preprocess, batch_size: int,
                        device) -> Tensor | None:
    """Segments of every image in eval mode (None for a tower that is not DTP's)."""
    if not dtp_towers(model):
        return None
    with trace(model) as traced:
        extract_features(model, preprocess, samples, batch_size, device)
    return torch.cat([record.tokens.cpu() for record in traced.records])  # N


def finetune(model: nn.Module, split: ImageFolderSplit, *, preprocess_train, preprocess_val, epochs: int = 5,
             lr: float = 1e-4, batch_size: int = 64, tokenizer=None, head: nn.Linear | str | None = None,
             weight_decay: float = 0.1, warmup: int | None = None, grad_clip_norm: float | None = 1.0,
             boundary_loss_weight: float = 10.0, device: str | torch.device = "cpu", seed: int = 0,
             workers: int = 0) -> dict:
    """Finetune the image tower and a linear head on `split.train`; test top-1/top-5 and compression after.

    The head starts as `head`: "zeroshot", CLIP's zero-shot classifier (`zeroshot_head`, needs the `tokenizer`;
    WiSE-FT's convention, and what makes a short finetune of a good CLIP work), "probe", a linear probe on the
    frozen features (LP-FT, Kumar et al. 2022), or a given layer (copied). Default: "zeroshot" when a tokenizer is
    given, else "probe". Cross-entropy, AdamW (open_clip's groups: no decay on gains and biases), linear warm-up
    (default: the first epoch, at most 500 steps) then cosine decay, `preprocess_train` augmentation. A DTP tower
    adds `boundary_loss_weight` x the boundary prior. The default, 10 (pretraining uses 1), holds the token budget
    on a small labelled set, where cross-entropy pulls harder for more tokens: finetuning Ti-4x on 500 CIFAR-10
    images for 5 epochs ended at 3.3x with weight 1 and at 3.9x with 10. `model` is changed in place; its text
    tower is not trained.

    Returns top1, top5 (test), compression (realised in eval: patches / mean segments over the test images,
    1.0 for a tower that does not pool), train_compression of the last epoch, the head's initial test top-1
    (`head_top1_before`), a per-epoch `history`, and the sizes and settings.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 1, lr > 0 and batch_size >= 1, got {epochs}, {lr}, {batch_size}")
    model = unwrap(model).to(device)
    seed_everything(seed)
    head = _initial_head(model, split, head, tokenizer, preprocess_val, batch_size, device, seed)
    classifier = ImageClassifier(model.visual, head.to(device))
    test_features, test_labels = extract_features(model, preprocess_val, split.test, batch_size, device)
    head_top1_before = head_accuracy(head, test_features, test_labels)["top1"]

    pools = bool(dtp_towers(model)) and get_tower(model).pools
    loader = image_loader(split.train, preprocess_train, batch_size, workers, shuffle=True, seed=seed)
    total_steps = epochs * len(loader)
    warmup = min(len(loader), 500) if warmup is None else warmup
    optimizer = make_optimizer(classifier, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8)
    history, step, start = [], 0, time.perf_counter()
    was_training = model.visual.training
    classifier.train()
    weight = use_config(model, boundary_loss_weight=boundary_loss_weight) if pools else contextlib.nullcontext()
    with weight:
        for epoch in range(epochs):
            sums, step = _finetune_epoch(classifier, optimizer, loader, step, lr=lr, warmup=warmup,
                                        total_steps=total_steps, grad_clip_norm=grad_clip_norm, device=device,
                                        pools=pools)
            seen = max(sums["images"], 1)
            history.append({"epoch": epoch, "loss": sums["loss"] / seen, "cross_entropy": sums["cross_entropy"] / seen,
                            "boundary_loss": sums["boundary_loss"] / seen, "train_top1": sums["correct"] / seen,
                            "train_compression": (get_tower(model).num_patches * seen / sums["segments"]
                                                  if pools and sums["segments"] else 1.0),
                            "lr_end": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start})
    train_seconds = time.perf_counter() - start
    model.visual.train(was_training)

    test_features, test_labels = extract_features(model, preprocess_val, split.test, batch_size, device)
    accuracy = head_accuracy(head, test_features, test_labels)
    segments = _segments_per_image(model, split.test, preprocess_val, batch_size, device) if pools else None
    compression = token_budget(get_tower(model).num_patches, segments) if segments is not None else 1.0
    return {**accuracy, "compression": compression, "train_compression": history[-1]["train_compression"],
            "head_top1_before": head_top1_before, "train_images": len(split.train), "test_images": len(split.test),
            "epochs": epochs, "lr": lr, "steps": step, "train_seconds": train_seconds, "history": history,
            "head": head, **run_info(device, "fp32", batch_size)}


def _initial_head(model: nn.Module, split: ImageFolderSplit, head: nn.Linear | str | None, tokenizer,
                 preprocess_val, batch_size: int, device: str | torch.device, seed: int) -> nn.Linear:
    """The head a finetune starts from: "zeroshot" (CLIP's text classifier), "probe" (a linear probe on the frozen
    features), a copy of a given layer; None: "zeroshot" when a tokenizer is given, else "probe"."""
    if head is None:
        head = "zeroshot" if tokenizer is not None else "probe"
    if head == "zeroshot":
        if tokenizer is None:
            raise ValueError("head='zeroshot' needs the model's tokenizer")
        return zeroshot_head(model, tokenizer, split.classnames, split.layout, device=device)
    if head == "probe":
        train_features, train_labels = extract_features(model, preprocess_val, split.train, batch_size, device)
        return linear_probe(train_features, train_labels, train_features, train_labels,
                            num_classes=split.num_classes, seed=seed).classifier
    if isinstance(head, nn.Linear):
        return copy.deepcopy(head)
    raise ValueError(f"head must be 'zeroshot', 'probe' or an nn.Linear, got {head!r}")


def _finetune_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer, loader, step: int, *, lr: float,
                   warmup: int, total_steps: int, grad_clip_norm: float | None, device: str | torch.device,
                   pools: bool) -> tuple[dict, int]:
    """One pass over the training images: cross-entropy (+ the tower's weighted prior) steps. Returns the sums
    over the epoch (loss parts and correct answers weighted by images, segments) and the next step."""
    sums = {"loss": 0.0, "cross_entropy": 0.0, "boundary_loss": 0.0, "correct": 0, "images": 0, "segments": 0}
    for images, labels, _ in loader:
        if images is None:
            continue
        images, labels = images.to(device), labels.to(device)

        def cross_entropy(images=images, labels=labels):
            logits = classifier(images)  # B x C
            return F.cross_entropy(logits, labels), logits

        result = train_step(classifier, optimizer, cross_entropy, step=step, device=torch.device(device),
                            lr=lr_at(step, lr=lr, warmup=warmup, total_steps=total_steps),
                            grad_clip_norm=grad_clip_norm, hint="try a lower lr")
        if not result.finite:  # the update was skipped; stop here (a finetune reads its losses every step)
            raise NonFiniteLoss(f"loss is {result.loss.item()} at step {step}: stopping; try a lower lr")
        step += 1
        sums["loss"] += result.loss.item() * len(labels)
        sums["cross_entropy"] += result.task_loss.item() * len(labels)
        sums["boundary_loss"] += (result.boundary_loss.item() if result.boundary_loss is not None
                                  else 0.0) * len(labels)
        sums["correct"] += (result.outputs.argmax(1) == labels).sum().item()
        sums["images"] += len(labels)
        sums["segments"] += result.segments.sum().item() if pools else 0
    return sums, step


# ----------------------------------------------------------------------------------------------------------
# 3. A DTP-ViT from a plain ViT


@dataclass
class FromViT:
    """What `dtp_from_vit` built: the model, open_clip's transforms and tokenizer, what loaded, the prior fit."""

    model: nn.Module
    preprocess_train: object
    preprocess: object
    tokenizer: object
    report: LoadReport
    prior_fit: list[dict]  # fit_boundary_prior's history ([] for compression 1)
    compression: float  # realised in eval on the prior images after the fit (1.0 for compression 1)


def _vit_state_dict(vit: str | Path | dict | nn.Module) -> dict | str | Path:
    """A ViT source for `load_vit_weights`: a checkpoint file (a relative path is also tried from the repository
    root), a state dict, an open_clip CLIP, or "NAME/TAG" (open_clip pretrained weights, which must be on disk:
    `evaluate`'s message says how to fetch them)."""
    if isinstance(vit, nn.Module):
        return unwrap(vit).state_dict()
    if isinstance(vit, dict):
        return vit
    if Path(vit).is_file() or repo_path(vit).is_file():
        return vit if Path(vit).is_file() else repo_path(vit)
    name, tag = _parse_pretrained(str(vit))  # not a file: an open_clip pretrained spec, or an error naming the choices
    check_pretrained(name, tag)
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag)
    return model.state_dict()


def dtp_from_vit(arch: str, compression: float, vit: str | Path | dict | nn.Module, *,
                 prior_images: Tensor | Sequence[Sample | Path] | None = None, prior_steps: int = 200,
                 upsample: bool = False, seed: int = 0, device: str | torch.device = "cpu", **overrides) -> FromViT:
    """`create_model_and_transforms(arch, compression)` with every ViT tensor of `vit` loaded, then the boundary
    predictor fitted to the binomial prior on `prior_images` (the rest frozen), so that it starts at its token
    budget rather than at the random predictor's. `vit`: see `_vit_state_dict`; a DTP-ViT CLIP of the same size
    (such as a DTP-1x run of `dtplib.train`) loads too, see `load_dtp_weights`. The fit needs real images (a
    tensor, or samples / paths that the eval transform loads); compression 1 has no predictor and skips it."""
    model, preprocess_train, preprocess = create_model_and_transforms(arch, compression, upsample, **overrides)
    state = read_state_dict(_vit_state_dict(vit))
    report = load_dtp_weights(model, state) if any(k.startswith("visual.trunk.") for k in state) else (
        load_vit_weights(model, state))
    model.to(device)
    tokenizer = open_clip.get_tokenizer(arch)
    history, realised = [], 1.0
    if get_tower(model).predictor is not None:
        if prior_images is None or len(prior_images) == 0:
            raise ValueError("a DTP tower needs prior_images (a few real images) to fit its boundary predictor")
        images = prior_images if isinstance(prior_images, Tensor) else load_images(
            [s[0] if isinstance(s, tuple) else s for s in prior_images], preprocess)
        images = images.to(device)
        torch.manual_seed(seed)
        history = fit_boundary_prior(model, images, steps=prior_steps, seed=seed)
        with eval_mode(model), trace(model) as traced:
            model.encode_image(images)
        realised = traced.budget
    return FromViT(model, preprocess_train, preprocess, tokenizer, report, history, realised)


# ----------------------------------------------------------------------------------------------------------
# Tables and figures for the notebook


def results_row(method: str, result: dict | ProbeResult, split: ImageFolderSplit, device: str | torch.device = "cpu",
                batch_size: int = 64, **extra) -> dict:
    """One row of the results table: accuracy, realised compression, the split's sizes and chance level, and the
    provenance columns (a `finetune` result carries its own; other rows get `device` and the feature batch size)."""
    if isinstance(result, ProbeResult):
        result = {"top1": result.top1, "top5": result.top5, "train_top1": result.train_top1,
                  "weight_decay": result.weight_decay}
    keep = ("top1", "top5", "compression", "train_compression", "train_top1", "head_top1_before", "weight_decay",
            "epochs", "lr", "steps", "train_seconds")
    provenance = {**run_info(device, "fp32", batch_size), **{k: result[k] for k in run_info(device) if k in result}}
    return {"method": method, **{k: result[k] for k in keep if k in result}, **extra,
            "chance": 1 / split.num_classes, "classes": split.num_classes, "train_images": len(split.train),
            "test_images": len(split.test), **provenance}


def history_table(finetunes: dict[str, dict]) -> pd.DataFrame:
    """The per-epoch histories of several `finetune` results, one row per method and epoch."""
    return pd.DataFrame([{"method": method, **row} for method, result in finetunes.items()
                         for row in result["history"]])
