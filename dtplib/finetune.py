"""Beyond contrastive pretraining: zero-shot of open_clip's pretrained CLIPs, linear probes and finetuning.

Read top to bottom:
1. `pretrained_zeroshot`: zero-shot top-1/top-5 of pretrained CLIPs ("RN50x16/openai", "ViT-B-16", ...) whose
   weights are on disk, one row per model; a model whose weights are missing gets a status and the message of
   `dtplib.evaluate` (how to fetch them) instead of an exception.
2. `imagefolder_split`: a deterministic, disjoint train / test split of an ImageFolder (class-named folders as
   CIFAR-10, or ImageNet's WordNet-id folders, named through `evaluate.zeroshot_classes`).
3. `extract_features` and `linear_probe`: frozen CLIP image embeddings, then an L2-regularised logistic
   regression fitted with L-BFGS (the regularisation strength chosen on a held-out part of the train split).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dtplib import evaluate as ev
from dtplib.clip import (
    LoadReport,
    check_model_name,
    check_pretrained,
    create_model_and_transforms,
    load_dtp_weights,
    load_vit_weights,
    read_state_dict,
)
from dtplib.model import dtp_towers, fit_boundary_prior, get_tower, token_budget, trace, use_config
from dtplib.optim import lr_at, make_optimizer, train_step
from dtplib.utils import eval_mode, load_images, repo_path, run_info, seed_everything, unwrap

Sample = tuple[Path, int]  # an image file and its label

# ----------------------------------------------------------------------------------------------------------
# 1. Zero-shot of pretrained open_clip models


def parse_pretrained(spec: str | tuple[str, str | None]) -> tuple[str, str]:
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

    `specs`: "NAME/TAG" strings (or one comma-separated string, or (name, tag) pairs), see `parse_pretrained`. All specs
    are checked before any model is loaded. Weights come from disk (open_clip's Hugging Face cache, or a file);
    where HF_HUB_OFFLINE is unset, missing ones are fetched, as `python -m dtplib.evaluate` does. A model whose
    weights cannot be had gets status "weights not on disk" and the reason in `message`; the others "ok".
    """
    if isinstance(specs, str):
        specs = [spec for spec in specs.split(",") if spec.strip()]
    parsed = [parse_pretrained(spec) for spec in specs]
    data_dir = repo_path(data_dir)
    ev.zeroshot_classes(data_dir)  # a missing or empty folder fails before any model work
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
# 2. Train / test splits of an ImageFolder


@dataclass
class ImageFolderSplit:
    """Disjoint train and test samples of an ImageFolder; label i is the i-th class folder in sorted order."""

    classnames: list[str]  # in label order, as zero-shot prompts name them
    layout: str  # "names" (CIFAR-10 style) or "imagenet" (WordNet ids), see evaluate.zeroshot_classes
    train: list[Sample]
    test: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _shuffled_per_class(root: Path, seed: int) -> dict[int, list[Path]]:
    """Each class's image files in a seeded order: sorted paths, then permuted by (seed, label)."""
    per_class: dict[int, list[Path]] = {}
    for path, label in ev.image_files(root, None):  # sorted folders, sorted files
        per_class.setdefault(label, []).append(path)
    return {label: [files[i] for i in np.random.default_rng([seed, label]).permutation(len(files))]
            for label, files in per_class.items()}


def imagefolder_split(data_dir: str | Path, per_class_train: int, per_class_test: int | None, seed: int = 0,
                      test_dir: str | Path | None = None) -> ImageFolderSplit:
    """`per_class_train` train and `per_class_test` test images of each class, disjoint and deterministic.

    Files are listed in sorted order and permuted with a generator seeded by (seed, label), so a split depends on
    the seed and the files only. `per_class_test=None` keeps all the rest. With `test_dir` (ImageNet: train/ and
    val/), train images come from `data_dir` and test images from `test_dir`, whose class folders must match.
    """
    root = repo_path(data_dir)
    classnames, layout = ev.zeroshot_classes(root)
    if per_class_train < 1 or (per_class_test is not None and per_class_test < 1):
        raise ValueError(f"need at least one train and one test image per class, got {per_class_train} and "
                         f"{per_class_test}")
    train_files = _shuffled_per_class(root, seed)
    if test_dir is None:
        test_files = {label: files[per_class_train:] for label, files in train_files.items()}
    else:
        test_root = repo_path(test_dir)
        if ev.zeroshot_classes(test_root)[0] != classnames:
            raise ValueError(f"{test_root} and {root} do not hold the same class folders")
        test_files = _shuffled_per_class(test_root, seed)
    short = [classnames[label] for label in range(len(classnames))
             if len(train_files.get(label, [])[:per_class_train]) < per_class_train
             or len(test_files.get(label, [])) < (per_class_test or 1)]
    if short:
        raise ValueError(f"classes with too few images for {per_class_train} train + {per_class_test} test "
                         f"under {root}: {short[:5]}")
    train = [(path, label) for label in sorted(train_files) for path in train_files[label][:per_class_train]]
    test = [(path, label) for label in sorted(test_files) for path in test_files[label][:per_class_test]]
    return ImageFolderSplit(classnames, layout, train, test)


# ----------------------------------------------------------------------------------------------------------
# 3. Frozen features and the linear probe


def _loader(samples: Sequence[Sample], preprocess, batch_size: int, workers: int, shuffle: bool = False,
            seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ev.ImageFiles(list(samples), preprocess), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, num_workers=workers, collate_fn=ev.collate_readable,
                      drop_last=shuffle and len(samples) > batch_size)


def extract_features(model: nn.Module, preprocess, samples: Sequence[Sample], batch_size: int = 64,
                     device: str | torch.device = "cpu", workers: int = 0) -> tuple[Tensor, Tensor]:
    """L2-normalised CLIP image embeddings N x D (fp32, on the CPU) and labels N, in eval mode without gradients.

    Unreadable images are skipped (with their labels), as in zero-shot evaluation; the model's modes are kept.
    """
    model = unwrap(model)
    features, labels = [], []
    with eval_mode(model):
        for images, batch_labels, _ in _loader(samples, preprocess, batch_size, workers):
            if images is None:
                continue
            batch = model.encode_image(images.to(device, ev.input_dtype(model)), normalize=True)  # B x D
            features.append(batch.float().cpu())
            labels.append(batch_labels)
    if not features:
        raise ValueError(f"none of the {len(samples)} images could be read")
    return torch.cat(features), torch.cat(labels)


def head_accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> dict[str, float]:
    """top1 / top5 of a linear head on features (`evaluate.topk_accuracy`: ties count against the head)."""
    device = next(head.parameters()).device
    with torch.no_grad():
        hits = ev.topk_accuracy(head(features.float().to(device)).cpu(), labels.cpu(), (1, 5))
    return {"top1": hits[1], "top5": hits[5]}


@dataclass
class ProbeResult:
    """A fitted linear probe: `classifier` maps `extract_features` outputs (N x D) to class logits (N x C)."""

    top1: float
    top5: float
    train_top1: float
    weight_decay: float  # the chosen L2 strength
    classifier: nn.Linear
    search: list[dict] = field(default_factory=list)  # held-out top-1 for each weight decay tried


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, w_prior: Tensor,
                  b_prior: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + weight_decay / 2 * |W - W_prior|^2, by L-BFGS."""
    weight = w_prior.clone().requires_grad_(True)  # C x D
    bias = b_prior.clone().requires_grad_(True)  # C
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + weight_decay / 2 * (weight - w_prior).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
                 num_classes: int | None = None, weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1),
                 val_fraction: float = 0.2, init: nn.Linear | None = None, max_iter: int = 300,
                 seed: int = 0) -> ProbeResult:
    """Logistic regression on frozen features; returns test accuracy and the classifier.

    Features are standardised with the train split's mean and std (the scale of CLIP embeddings varies a lot
    between models, and so would the best weight decay). With several `weight_decays`, each is fitted on the train
    split less a seeded `val_fraction` of it, the best on that held-out part wins (ties: the stronger), and the
    probe is refitted on the whole train split. `init` (e.g. `zeroshot_head`, CLIP-style) is both the starting
    point and what the weight decay pulls towards, so a strong decay keeps the zero-shot classifier and a weak one
    fits the data; without it the prior is zero.
    """
    x_train, x_test = train_features.float(), test_features.float()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # D
    z_train = (x_train - mean) / std  # N x D
    if init is not None:  # the same logits in standardised coordinates: W x = (W * std) z + (b + W mean)
        w_prior = init.weight.detach().float() * std  # C x D
        b_prior = init.bias.detach().float() + init.weight.detach().float() @ mean  # C
    else:
        w_prior, b_prior = z_train.new_zeros(num_classes, z_train.shape[1]), z_train.new_zeros(num_classes)

    search = []
    if len(weight_decays) > 1:
        order = torch.randperm(len(z_train), generator=torch.Generator().manual_seed(seed))
        held = order[:max(1, int(len(order) * val_fraction))]
        kept = order[len(held):]
        for decay in weight_decays:
            weight, bias = _fit_logistic(z_train[kept], train_labels[kept], num_classes, decay, w_prior, b_prior,
                                         max_iter)
            val_top1 = ((z_train[held] @ weight.T + bias).argmax(1) == train_labels[held]).float().mean().item()
            search.append({"weight_decay": decay, "val_top1": val_top1})
        best = max(search, key=lambda row: (row["val_top1"], row["weight_decay"]))["weight_decay"]
    else:
        best = weight_decays[0]
    weight, bias = _fit_logistic(z_train, train_labels, num_classes, best, w_prior, b_prior, max_iter)

    classifier = nn.Linear(x_train.shape[1], num_classes)  # folds the standardisation in: acts on raw features
    with torch.no_grad():
        classifier.weight.copy_(weight / std)
        classifier.bias.copy_(bias - (weight / std) @ mean)
    test = head_accuracy(classifier, x_test, test_labels)
    train_top1 = head_accuracy(classifier, x_train, train_labels)["top1"]
    return ProbeResult(test["top1"], test["top5"], train_top1, best, classifier, search)


# ----------------------------------------------------------------------------------------------------------
# 4. Finetuning the image tower with a linear head


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
    if head is None:
        head = "zeroshot" if tokenizer is not None else "probe"
    if head == "zeroshot":
        if tokenizer is None:
            raise ValueError("head='zeroshot' needs the model's tokenizer")
        head = zeroshot_head(model, tokenizer, split.classnames, split.layout, device=device)
    elif head == "probe":
        train_features, train_labels = extract_features(model, preprocess_val, split.train, batch_size, device)
        head = linear_probe(train_features, train_labels, train_features, train_labels,
                            num_classes=split.num_classes, seed=seed).classifier
    elif isinstance(head, nn.Linear):
        head = copy.deepcopy(head)
    else:
        raise ValueError(f"head must be 'zeroshot', 'probe' or an nn.Linear, got {head!r}")
    classifier = ImageClassifier(model.visual, head.to(device))
    test_features, test_labels = extract_features(model, preprocess_val, split.test, batch_size, device)
    head_top1_before = head_accuracy(head, test_features, test_labels)["top1"]

    pools = bool(dtp_towers(model)) and get_tower(model).predictor is not None
    loader = _loader(split.train, preprocess_train, batch_size, workers, shuffle=True, seed=seed)
    total_steps = epochs * len(loader)
    warmup = min(len(loader), 500) if warmup is None else warmup
    optimizer = make_optimizer(classifier, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8)
    history, step, start = [], 0, time.perf_counter()
    was_training = model.visual.training
    classifier.train()
    weight = use_config(model, boundary_loss_weight=boundary_loss_weight) if pools else contextlib.nullcontext()
    with weight:
        for epoch in range(epochs):
            sums = {"loss": 0.0, "cross_entropy": 0.0, "boundary_loss": 0.0, "correct": 0, "images": 0,
                    "segments": 0}
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
                step += 1
                sums["loss"] += result.loss.item() * len(labels)
                sums["cross_entropy"] += result.task_loss.item() * len(labels)
                sums["boundary_loss"] += (result.boundary_loss.item() if pools else 0.0) * len(labels)
                sums["correct"] += (result.outputs.argmax(1) == labels).sum().item()
                sums["images"] += len(labels)
                sums["segments"] += result.record.tokens.sum().item() if pools else 0
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


# ----------------------------------------------------------------------------------------------------------
# 5. A DTP-ViT from a plain ViT


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


def vit_state_dict(vit: str | Path | dict | nn.Module) -> dict | str | Path:
    """A ViT source for `load_vit_weights`: a checkpoint file (a relative path is also tried from the repository
    root), a state dict, an open_clip CLIP, or "NAME/TAG" (open_clip pretrained weights, which must be on disk:
    `evaluate`'s message says how to fetch them)."""
    if isinstance(vit, nn.Module):
        return unwrap(vit).state_dict()
    if isinstance(vit, dict):
        return vit
    if Path(vit).is_file() or repo_path(vit).is_file():
        return vit if Path(vit).is_file() else repo_path(vit)
    name, tag = parse_pretrained(str(vit))  # not a file: an open_clip pretrained spec, or an error naming the choices
    check_pretrained(name, tag)
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag)
    return model.state_dict()


def dtp_from_vit(arch: str, compression: float, vit: str | Path | dict | nn.Module, *,
                 prior_images: Tensor | Sequence[Sample | Path] | None = None, prior_steps: int = 200,
                 upsample: bool = False, seed: int = 0, device: str | torch.device = "cpu", **overrides) -> FromViT:
    """`create_model_and_transforms(arch, compression)` with every ViT tensor of `vit` loaded, then the boundary
    predictor fitted to the binomial prior on `prior_images` (the rest frozen), so that it starts at its token
    budget rather than at the random predictor's. `vit`: see `vit_state_dict`; a DTP-ViT CLIP of the same size
    (such as a DTP-1x run of `dtplib.train`) loads too, see `load_dtp_weights`. The fit needs real images (a
    tensor, or samples / paths that the eval transform loads); compression 1 has no predictor and skips it."""
    model, preprocess_train, preprocess = create_model_and_transforms(arch, compression, upsample, **overrides)
    state = read_state_dict(vit_state_dict(vit))
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
