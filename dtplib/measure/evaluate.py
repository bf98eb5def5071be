"""Zero-shot classification (top-1/top-5), image-text retrieval (R@1/5/10), the held-out contrastive loss and a
linear probe for any open_clip model, with bootstrap confidence intervals and paired comparisons of two models.

Read top to bottom (the metrics on score matrices, and how ties and NaN count, are `dtplib.measure.metrics`; the
ImageFolder reading is `dtplib.data.imagefolder`):
1. Zero-shot classification of an ImageFolder-style directory: `templates_for`, `zero_shot_eval`.
2. Over webdataset shards: image-text retrieval, every caption of every image (`retrieval_eval`), and the held-out
   contrastive loss, each image with its first caption in fixed batches (`val_loss_eval`).
3. A linear probe on frozen image features: `extract_features`, `linear_probe`, `probe_eval` (also used by
   `dtplib.finetune`).
4. `evaluate` (what the training loop calls), `compare_items`, `load_model`, and the flags of
   `python -m dtplib.evaluate -h` (`build_parser`; `--bootstrap N` adds <metric>_ci_low / _ci_high; `--compare
   A.pt B.pt` gives A - B per metric with its paired bootstrap interval; `--items` writes the per-item scores,
   `write_items`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import get_model_preprocess_cfg
from open_clip.loss import ClipLoss
from open_clip.zero_shot_classifier import batched, build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..common.files import atomic_write_bytes, atomic_write_text
from ..common.paths import repo_path
from ..common.progress import progress
from ..common.runtime import eval_mode, unwrap
from ..data.imagefolder import (
    ImageFiles,
    Sample,
    class_folders,
    collate_readable,
    image_files,
    image_loader,
    imagefolder_split,
    zeroshot_classes,
)
from ..data.loader import IMAGE_EXTENSIONS, expand_shards, iter_samples
from ..tower.clip import check_model_name, check_pretrained, read_state_dict
from ..tower.weights import is_weights_file, load_weights, weights_info
from ..training.checkpoint import fit_position_embeddings, load_state_dict, load_trained, training_config
from ..training.config import check_image_size
from .metrics import ItemScores, hit_items, hit_rates, item_ranks, retrieval_items, retrieval_recall, topk_accuracy
from .stats import paired_ci

log = logging.getLogger(__name__)


CIFAR_TEMPLATES = (  # CLIP's 18 prompts for CIFAR-10 (Radford et al. 2021, data/prompts.md of openai/CLIP)
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


# ----------------------------------------------------------------------------------------------------------
# 1. Zero-shot classification


def templates_for(layout: str) -> tuple:
    """Prompt templates: OpenAI's 80 for ImageNet, CLIP's 18 CIFAR-10 prompts for plain class names."""
    if layout == "imagenet":
        return OPENAI_IMAGENET_TEMPLATES
    if layout == "names":
        return CIFAR_TEMPLATES
    raise ValueError(f"unknown layout {layout!r}; expected 'imagenet' or 'names'")


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """dtype the image tower expects (fp32, or bf16/fp16 for a model cast to pure low precision)."""
    return next(model.parameters()).dtype


def zero_shot_eval(model, preprocess, tokenizer, data_dir: str | Path, *, batch_size: int = 64,
                   device: str | torch.device = "cpu", max_per_class: int | None = None,
                   templates: Sequence | None = None, workers: int = 0, skip_empty_classes: bool = False,
                   per_item: bool = False) -> dict | tuple[dict, dict[str, ItemScores]]:
    """Zero-shot top-1/top-5 accuracy on an ImageFolder-style directory, with prompts averaged per class.

    `max_per_class` keeps the first n images per class in sorted path order (a deterministic subset for CPU
    runs). Unreadable images are skipped and counted (zeroshot_skipped); the model's training flags are kept.
    A class folder without images is a ValueError naming it, before any model work; with `skip_empty_classes` it is
    left out of the classifier and counted (zeroshot_skipped_classes, a key only present then).
    Accuracy is over the classes present: on the ImageNet layout, classes of ImageNet-1k without a folder (or left
    out) are counted (zeroshot_missing_classes, a key of that layout only) with a warning, as the numbers are then
    not ImageNet-1k accuracy. With 5 classes or fewer every image is a top-5 hit, so zeroshot_top5 is NaN (and
    has no per-image scores), with a warning.
    `per_item`: (metrics, {"zeroshot_top1" / "zeroshot_top5": per-image hits}) instead of the metrics alone.
    """
    root = Path(data_dir)
    classnames, layout = zeroshot_classes(root, skip_empty_classes=skip_empty_classes)
    _warn_partial_classes(root, classnames, layout)
    empty = [folder.name for folder in class_folders(root)[1]]
    samples = image_files(root, max_per_class, skip_empty_classes)
    if not samples:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    loader = DataLoader(ImageFiles(samples, preprocess), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_readable)
    model = unwrap(model)
    ranks, skipped = [], 0
    with eval_mode(model):
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates or templates_for(layout),
                                                device=device).float()  # D x C, unit columns
        for images, labels, unreadable in progress(loader, desc="zero-shot"):
            skipped += unreadable
            if images is None:
                continue
            features = model.encode_image(images.to(device, _input_dtype(model)), normalize=True).float()  # B x D
            logits = features @ classifier  # B x C
            is_target = F.one_hot(labels.to(device), len(classnames)).bool()  # B x C
            ranks.append(item_ranks(logits, is_target).cpu())  # B
    if not ranks:
        raise ValueError(f"none of the {len(samples)} images under {root} could be read")
    ranks = torch.cat(ranks)
    hits = hit_rates(ranks, (1, 5))
    has_top5 = len(classnames) > TOP5_MIN_CLASSES
    metrics = {"zeroshot_top1": hits[1], "zeroshot_top5": hits[5] if has_top5 else float("nan"),
               "zeroshot_images": len(ranks), "zeroshot_skipped": skipped}
    if skip_empty_classes:
        if empty:
            log.warning("%s: left out %d class folders without images: %s", root, len(empty), empty[:10])
        metrics["zeroshot_skipped_classes"] = len(empty)
    if layout == "imagenet":
        metrics["zeroshot_missing_classes"] = IMAGENET_CLASSES - len(classnames)
    if per_item:
        items = {"zeroshot_top1": hit_items(ranks, 1)}
        return metrics, items | ({"zeroshot_top5": hit_items(ranks, 5)} if has_top5 else {})
    return metrics


IMAGENET_CLASSES = 1000
TOP5_MIN_CLASSES = 5  # top-5 is reported above this many classes: at or below it every image is a hit


def _warn_partial_classes(root: Path, classnames: Sequence[str], layout: str) -> None:
    """Warn, before the classifier is built, when an ImageNet layout lacks classes and when top-5 is not reported."""
    if layout == "imagenet" and len(classnames) < IMAGENET_CLASSES:
        log.warning("%s: %d of the %d ImageNet-1k classes are missing (%d class folders with images); top-1/top-5 "
                    "are over those classes only, not ImageNet-1k accuracy", root, IMAGENET_CLASSES - len(classnames),
                    IMAGENET_CLASSES, len(classnames))
    if len(classnames) <= TOP5_MIN_CLASSES:
        log.warning("%s: top-5 not reported (NaN): %d classes, and top-5 needs more than %d", root, len(classnames),
                    TOP5_MIN_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# 2. Over caption shards: image-text retrieval and the held-out contrastive loss


@dataclass
class ShardEmbeddings:
    """Unit image and text embeddings of every scored sample of some shards, in shard order (`_embed_shards`)."""

    image_features: Tensor  # I x D, fp32
    text_features: Tensor  # T x D, fp32: every caption of every image, image by image
    text_image: Tensor  # T: the image that text t describes
    first_text: Tensor  # I: the index of each image's first caption
    no_caption: int  # samples skipped for want of a caption
    logit_scale: Tensor | None  # exp(model.logit_scale), the ClipLoss temperature; None for a model without one
    logit_bias: Tensor | None = None


def _embed_shards(model, preprocess, tokenizer, shards: str | Sequence[str], *, batch_size: int = 64,
                 device: str | torch.device = "cpu", max_images: int | None = None) -> ShardEmbeddings:
    """Embed every sample of the shards with all its captions, in eval mode (a DTP tower's deterministic boundaries).

    Captions come from the sample's json "captions" (falling back to txt), stripped; blank ones are dropped, and a
    sample left without any (neither json captions nor txt) is skipped and counted, as the training loader counts
    no_caption. `max_images` keeps the first n scored samples. Images that do not decode are passed over by
    `iter_samples`. No sample left: a ValueError naming the shards.
    """
    shard_list = expand_shards(shards)
    model = unwrap(model)
    image_features, text_features, text_image, first_text = [], [], [], []  # per batch, per batch, per text, image
    num_images, no_caption = 0, 0

    def captioned() -> Iterator[dict]:
        nonlocal no_caption
        produced = 0
        for sample in iter_samples(shard_list):
            if max_images is not None and produced >= max_images:
                return
            captions = [c.strip() for c in sample["captions"] if isinstance(c, str) and c.strip()]
            if not captions:
                no_caption += 1
                if no_caption <= 5:
                    log.warning("retrieval: skipping %s, it has no caption", sample["key"])
                continue
            produced += 1
            yield {**sample, "captions": captions}

    with eval_mode(model):
        for batch in progress(batched(captioned(), batch_size), desc="caption shards"):
            images = torch.stack([preprocess(sample["image"]) for sample in batch])  # B x 3 x H x W
            captions = [caption for sample in batch for caption in sample["captions"]]
            for i, sample in enumerate(batch):
                first_text.append(len(text_image))
                text_image += [num_images + i] * len(sample["captions"])
            num_images += len(batch)
            image_features.append(model.encode_image(images.to(device, _input_dtype(model)), normalize=True).float())
            text_features.append(model.encode_text(tokenizer(captions).to(device), normalize=True).float())
        scale = model.logit_scale.exp().float() if hasattr(model, "logit_scale") else None
        bias = getattr(model, "logit_bias", None)
    if not image_features:
        reason = f" ({no_caption} samples had no caption: neither json captions nor txt)" if no_caption else ""
        raise ValueError(f"no readable samples in {shards}{reason}")
    features = torch.cat(image_features)
    return ShardEmbeddings(features, torch.cat(text_features), torch.tensor(text_image, device=features.device),
                           torch.tensor(first_text, device=features.device), no_caption, scale,
                           None if bias is None else bias.detach().float())


def _retrieval_metrics(embedded: ShardEmbeddings) -> tuple[dict, dict[str, ItemScores]]:
    similarity = embedded.image_features @ embedded.text_features.T  # I x T
    recalls = retrieval_recall(similarity, embedded.text_image)
    metrics = recalls | {"retrieval_images": similarity.shape[0], "retrieval_texts": similarity.shape[1],
                         "retrieval_skipped_no_caption": embedded.no_caption}
    return metrics, retrieval_items(similarity, embedded.text_image)


def retrieval_eval(model, preprocess, tokenizer, shards: str | Sequence[str], *, batch_size: int = 64,
                   device: str | torch.device = "cpu", max_images: int | None = None,
                   per_item: bool = False) -> dict | tuple[dict, dict[str, ItemScores]]:
    """Image-to-text and text-to-image R@1/5/10 over every sample of the shards, each image with all its captions.

    Samples and captions as `_embed_shards` reads them: a sample without any caption is skipped and counted
    (retrieval_skipped_no_caption); `max_images` keeps the first n scored samples; no sample left is a ValueError
    naming the shards. `per_item`: (metrics, `retrieval_items`: per-image scores) instead of the metrics alone.
    """
    embedded = _embed_shards(model, preprocess, tokenizer, shards, batch_size=batch_size, device=device,
                            max_images=max_images)
    metrics, items = _retrieval_metrics(embedded)
    return (metrics, items) if per_item else metrics


def _clip_loss_batches(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                      batch_size: int = 64, logit_bias: Tensor | None = None) -> Tensor:
    """open_clip's ClipLoss of each batch of `batch_size` consecutive pairs (row i of both, unit features): one loss
    per batch, in order. The last short batch is dropped when there is a full one (every term then has the same
    number of negatives, and a short batch's loss is lower for want of them); fewer pairs than a batch make one
    batch of all; fewer than 2 pairs (no negative) give no batch."""
    if batch_size < 2:
        raise ValueError(f"a contrastive batch needs at least 2 pairs, got batch_size={batch_size}")
    count = len(image_features)
    full = count // batch_size
    bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(full)] or ([(0, count)] if count >= 2 else [])
    loss_fn = ClipLoss()
    with torch.no_grad():
        losses = [loss_fn(image_features[a:b].float(), text_features[a:b].float(), logit_scale, logit_bias)
                  for a, b in bounds]
    return torch.stack(losses).float().cpu() if losses else torch.zeros(0)


def _val_loss_metrics(embedded: ShardEmbeddings, batch_size: int) -> tuple[dict, dict[str, ItemScores]]:
    if embedded.logit_scale is None:
        log.warning("val_loss: the model has no logit_scale, so no contrastive loss")
        return {}, {}
    first = embedded.first_text
    losses = _clip_loss_batches(embedded.image_features, embedded.text_features[first], embedded.logit_scale,
                               batch_size, embedded.logit_bias)
    if len(losses) == 0:
        log.warning("val_loss: needs at least 2 images, got %d", len(first))
        return {}, {}
    used = min(len(first), len(losses) * batch_size)
    return ({"val_loss": losses.mean().item(), "val_loss_images": used},
            {"val_loss": ItemScores(losses.double().numpy())})


def val_loss_eval(model, preprocess, tokenizer, shards: str | Sequence[str], *, batch_size: int = 64,
                  device: str | torch.device = "cpu", max_images: int | None = None,
                  per_item: bool = False) -> dict | tuple[dict, dict[str, ItemScores]]:
    """Held-out contrastive loss: the mean ClipLoss over fixed batches of `batch_size` consecutive samples of the
    shards, in shard order, each image with its first caption (the samples and captions that retrieval scores: see
    `_embed_shards`), in eval mode. Deterministic: no shuffling, no random caption. The last short batch is dropped
    when there is a full one (`_clip_loss_batches`), so the loss is comparable across splits at one batch size.

    {"val_loss", "val_loss_images" (the pairs in the batches counted)}; {} for a model without logit_scale or fewer
    than 2 images. `per_item`: also {"val_loss": the per-batch losses} (a bootstrap over them resamples batches).
    """
    embedded = _embed_shards(model, preprocess, tokenizer, shards, batch_size=batch_size, device=device,
                            max_images=max_images)
    metrics, items = _val_loss_metrics(embedded, batch_size)
    return (metrics, items) if per_item else metrics


# ----------------------------------------------------------------------------------------------------------
# 3. A linear probe on frozen image features


def extract_features(model: nn.Module, preprocess, samples: Sequence[Sample], batch_size: int = 64,
                     device: str | torch.device = "cpu", workers: int = 0) -> tuple[Tensor, Tensor]:
    """L2-normalised CLIP image embeddings N x D (fp32, on the CPU) and labels N, in eval mode without gradients.

    Unreadable images are skipped (with their labels), as in zero-shot evaluation; the model's modes are kept.
    """
    model = unwrap(model)
    features, labels = [], []
    with eval_mode(model):
        batches = image_loader(samples, preprocess, batch_size, workers)
        for images, batch_labels, _ in progress(batches, desc="features"):
            if images is None:
                continue
            batch = model.encode_image(images.to(device, _input_dtype(model)), normalize=True)  # B x D
            features.append(batch.float().cpu())
            labels.append(batch_labels)
    if not features:
        raise ValueError(f"none of the {len(samples)} images could be read")
    return torch.cat(features), torch.cat(labels)


def head_accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> dict[str, float]:
    """top1 / top5 of a linear head on features (`topk_accuracy`: ties count against the head)."""
    device = next(head.parameters()).device
    with torch.no_grad():
        hits = topk_accuracy(head(features.float().to(device)).cpu(), labels.cpu(), (1, 5))
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
    probe is refitted on the whole train split. `init` (e.g. `finetune.zeroshot_head`, CLIP-style) is both the
    starting point and what the weight decay pulls towards, so a strong decay keeps the zero-shot classifier and a
    weak one fits the data; without it the prior is zero.
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


def probe_eval(model, preprocess, data_dir: str | Path, *, per_class_train: int = 100,
               per_class_test: int | None = None, seed: int = 0, batch_size: int = 64,
               device: str | torch.device = "cpu", workers: int = 0,
               per_item: bool = False) -> dict | tuple[dict, dict[str, ItemScores]]:
    """Linear probe on frozen image features of an ImageFolder (CIFAR-10 test): `imagefolder_split(data_dir,
    per_class_train, per_class_test, seed)` into probe-train and probe-test (`per_class_test=None`: all the rest),
    `extract_features` of both in eval mode, then `linear_probe` (its weight decay chosen on a seeded fifth of
    probe-train). Deterministic for a seed. probe_top1 / probe_top5 on probe-test, probe_train_images,
    probe_test_images, probe_weight_decay; `per_item`: also the per-image hits of probe-test.
    """
    split = imagefolder_split(data_dir, per_class_train, per_class_test, seed)
    train_x, train_y = extract_features(model, preprocess, split.train, batch_size, device, workers)
    test_x, test_y = extract_features(model, preprocess, split.test, batch_size, device, workers)
    probe = linear_probe(train_x, train_y, test_x, test_y, num_classes=split.num_classes, seed=seed)
    with torch.no_grad():
        logits = probe.classifier(test_x)  # N x C
    ranks = item_ranks(logits, F.one_hot(test_y, split.num_classes).bool())  # N
    metrics = {"probe_top1": probe.top1, "probe_top5": probe.top5, "probe_train_images": len(train_y),
               "probe_test_images": len(test_y), "probe_weight_decay": probe.weight_decay}
    return (metrics, {"probe_top1": hit_items(ranks, 1), "probe_top5": hit_items(ranks, 5)}) if per_item else metrics


# ----------------------------------------------------------------------------------------------------------
# 4. Entry points: evaluate, load_model, command line


def check_data(zeroshot_data=None, imagenet_val=None, val_data=None, skip_empty_classes: bool = False,
               probe_data=None) -> None:
    """Fail on a missing or empty data path (or class folder) before any model work (minutes of it, on ImageNet)."""
    for data_dir in (zeroshot_data, imagenet_val):
        if data_dir is not None:
            zeroshot_classes(data_dir, skip_empty_classes=skip_empty_classes)
    if probe_data is not None:
        zeroshot_classes(repo_path(probe_data))
    if val_data is not None:
        expand_shards(val_data)


def evaluate(model, preprocess, tokenizer, *, zeroshot_data: str | Path | None = None,
             imagenet_val: str | Path | None = None, val_data: str | Sequence[str] | None = None,
             probe_data: str | Path | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
             max_per_class: int | None = None, max_images: int | None = None, workers: int = 0,
             skip_empty_classes: bool = False, loss_batch_size: int = 64, probe_per_class: int = 100,
             probe_test_per_class: int | None = None, seed: int = 0, bootstrap: int = 0, level: float = 0.95,
             per_item: bool = False) -> dict | tuple[dict, dict[str, ItemScores]]:
    """Every evaluation whose data is given, as one flat dict ({} when none is).

    - `zeroshot_data`: zeroshot_top1, zeroshot_top5, ...; `imagenet_val` the same keys with the prefix imagenet_
      (imagenet_missing_classes: ImageNet-1k classes without a folder). top-5 is NaN with 5 classes or fewer.
    - `val_data`: the retrieval recalls and the held-out contrastive loss (val_loss over fixed batches of
      `loss_batch_size`, see `val_loss_eval`), from one pass over the shards in eval mode.
    - `probe_data`: a linear probe on frozen features (`probe_eval`: probe_top1, ...), `probe_per_class` probe-train
      images per class, `probe_test_per_class` probe-test (None: the rest), split with `seed`.
    - `bootstrap` > 0: `<metric>_ci_low` / `<metric>_ci_high` after each metric that has per-item scores, a
      percentile interval at `level` over that many resamples of the test images (`_add_intervals`, seeded by `seed`).
    - `per_item`: (metrics, {metric: ItemScores}) for a paired comparison (`compare_items`).
    An empty class folder is refused before any model work, or left out with `skip_empty_classes`.
    """
    check_data(zeroshot_data, imagenet_val, val_data, skip_empty_classes, probe_data)
    metrics, items = {}, {}
    options = dict(batch_size=batch_size, device=device, max_per_class=max_per_class, workers=workers,
                   skip_empty_classes=skip_empty_classes, per_item=True)
    if zeroshot_data is not None:
        found, scores = zero_shot_eval(model, preprocess, tokenizer, zeroshot_data, **options)
        metrics, items = metrics | found, items | scores
    if imagenet_val is not None:
        found, scores = zero_shot_eval(model, preprocess, tokenizer, imagenet_val, **options)
        metrics |= {key.replace("zeroshot_", "imagenet_", 1): value for key, value in found.items()}
        items |= {key.replace("zeroshot_", "imagenet_", 1): value for key, value in scores.items()}
    if val_data is not None:
        embedded = _embed_shards(model, preprocess, tokenizer, val_data, batch_size=batch_size, device=device,
                                max_images=max_images)
        for found, scores in (_retrieval_metrics(embedded), _val_loss_metrics(embedded, loss_batch_size)):
            metrics, items = metrics | found, items | scores
    if probe_data is not None:
        found, scores = probe_eval(model, preprocess, probe_data, per_class_train=probe_per_class,
                                   per_class_test=probe_test_per_class, seed=seed, batch_size=batch_size,
                                   device=device, workers=workers, per_item=True)
        metrics, items = metrics | found, items | scores
    if bootstrap:
        metrics = _add_intervals(metrics, items, bootstrap, level, seed)
    return (metrics, items) if per_item else metrics


def _add_intervals(metrics: dict, items: dict[str, ItemScores], resamples: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """`metrics` with `<metric>_ci_low` and `<metric>_ci_high` after each metric that has per-item scores: the
    bootstrap percentile interval over the test images (`stats.bootstrap_ci`; val_loss: over its batches)."""
    out = {}
    for key, value in metrics.items():
        out[key] = value
        if key in items and not key.endswith(("_ci_low", "_ci_high")):
            interval = items[key].interval(resamples, level, seed)
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = interval.low, interval.high
    return out


def compare_items(metrics_a: dict, items_a: dict[str, ItemScores], metrics_b: dict, items_b: dict[str, ItemScores],
                  resamples: int = 1000, level: float = 0.95, seed: int = 0) -> list[dict]:
    """One row per metric that both have per-item scores for: a, b, difference = a - b, and its paired bootstrap
    interval (`stats.paired_ci`: the same resampled images for both, so what the images share cancels).

    The items must be the same images (same count, same caption weights): a ValueError otherwise.
    """
    rows = []
    for key in [k for k in items_a if k in items_b]:
        a, b = items_a[key], items_b[key]
        same_weights = (a.weights is None) == (b.weights is None) and (
            a.weights is None or np.array_equal(a.weights, b.weights))
        if a.scores.shape != b.scores.shape or not same_weights:
            raise ValueError(f"{key}: the two models were not scored on the same items ({len(a.scores)} against "
                             f"{len(b.scores)}, or different captions per image)")
        interval = paired_ci(a.scores, b.scores, resamples, level, seed, weights=a.weights)
        rows.append({"metric": key, "a": metrics_a[key], "b": metrics_b[key],
                     "difference": metrics_a[key] - metrics_b[key], "ci_low": interval.low,
                     "ci_high": interval.high, "level": level, "items": interval.items,
                     "excludes_zero": interval.excludes_zero()})
    return rows


def load_model(name: str | None = None, checkpoint: str | Path | None = None, pretrained: str | None = None,
               device: str | torch.device = "cpu", force_image_size: int | None = None,
               ) -> tuple[torch.nn.Module, object, object]:
    """(model in eval mode, preprocess_val, tokenizer) for an open_clip name (dtplib's DTP-ViT names included).

    `checkpoint`: a file from our training loop ({"state_dict": ..., optional `module.` prefixes, other keys}), or a
    weights file from `python -m dtplib.export`. Either records what built its model (the training flags, the
    weights header), so `name` may be left out, and a tower that has no registered name (`--model ViT-B-32
    --compression 3`, other DTP settings) is rebuilt as it was trained.
    `pretrained`: an open_clip tag or weights file (a file is read as `checkpoint` is: `torch.load(weights_only=True)`
    or safetensors, then loaded strictly). Names, files and weights are checked before the model is built; a file
    that is not a safe checkpoint, or one of another model, is a ValueError in one line naming it.
    The input size is the one the model was trained at (a training checkpoint's --force-image-size), unless
    `force_image_size` gives another: the position embedding is then resampled (open_clip's `force_image_size`).
    """
    if checkpoint is not None and pretrained is not None:
        raise ValueError("give a checkpoint or pretrained weights, not both")
    if force_image_size is not None and force_image_size <= 0:
        raise ValueError(f"--force-image-size must be a whole number of pixels > 0, got {force_image_size}")
    if checkpoint is not None and is_weights_file(checkpoint) \
            and name in (None, weights_info(checkpoint)["open_clip_model"]):
        if force_image_size is not None:
            raise ValueError("--force-image-size: a weights file is evaluated at the size it was trained at")
        model, preprocess, tokenizer, _ = load_weights(checkpoint, device)
        return model, preprocess, tokenizer
    config = training_config(checkpoint) if checkpoint is not None else None
    if name is None and config is None:
        raise ValueError("give a model name (a checkpoint from python -m dtplib.train records its own)")
    if config is not None and name in (None, config.model):  # the training flags rebuild exactly the trained model
        if force_image_size is not None:
            check_image_size(force_image_size, config.model)
        model, preprocess, tokenizer, _ = load_trained(checkpoint, device, force_image_size)
        log.info("loaded %s at %d px", checkpoint, get_model_preprocess_cfg(model)["size"][0])
        return model, preprocess, tokenizer
    check_model_name(name)
    weights_file = checkpoint if checkpoint is not None else pretrained if pretrained and Path(pretrained).is_file() \
        else None
    state = None if weights_file is None else read_state_dict(weights_file)  # safely (weights_only), before the build
    if pretrained is not None and weights_file is None:
        check_pretrained(name, pretrained)
    if force_image_size is not None:
        check_image_size(force_image_size, name)
    forced = {} if force_image_size is None else {"force_image_size": force_image_size}
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=None if weights_file is not None else pretrained, device=device, **forced)
    tokenizer = open_clip.get_tokenizer(name)
    if state is not None:  # a file of another model is one line naming it and the mismatch
        state = fit_position_embeddings(state, model)
        load_state_dict(model, state, weights_file, name)
        log.info("loaded %d tensors from %s", len(state), weights_file)
    return model.eval(), preprocess, tokenizer


def format_table(metrics: dict) -> str:
    """Two aligned columns, fractions to four places and counts as integers; a metric with `<metric>_ci_low` /
    `_ci_high` keys reads "value [low, high]" on its own row."""
    shown = {key: value for key, value in metrics.items() if not (
        key.endswith(("_ci_low", "_ci_high")) and key.rsplit("_ci_", 1)[0] in metrics)}
    width = max(map(len, shown), default=6)
    rows = [f"{'metric':<{width}}  value" + ("  [95% CI]" if len(shown) < len(metrics) else "")]
    for key, value in shown.items():
        text = f"{value:.4f}" if isinstance(value, float) else f"{value}"
        if f"{key}_ci_low" in metrics:
            text += f"  [{metrics[f'{key}_ci_low']:.4f}, {metrics[f'{key}_ci_high']:.4f}]"
        rows.append(f"{key:<{width}}  {text}")
    return "\n".join(rows)


def format_comparison(rows: list[dict], name_a: str = "A", name_b: str = "B") -> str:
    """The rows of `compare_items` as an aligned table: metric, A, B, A - B and its interval."""
    width = max([len(row["metric"]) for row in rows] + [6])
    level = f"{100 * rows[0]['level']:g}% CI" if rows else "CI"
    lines = [f"A = {name_a}", f"B = {name_b}",
             f"{'metric':<{width}}  {'A':>8}  {'B':>8}  {'A - B':>8}  [{level}]"]
    for row in rows:
        mark = "  *" if row["excludes_zero"] else ""
        lines.append(f"{row['metric']:<{width}}  {row['a']:8.4f}  {row['b']:8.4f}  {row['difference']:+8.4f}  "
                     f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]{mark}")
    lines.append("* the interval excludes 0")
    return "\n".join(lines)


def write_output(path: str | Path, record: dict, rows: list[dict]) -> None:
    """A .csv path: `rows` (each with the record's scalar fields as provenance columns); any other: JSON of the
    record."""
    if str(path).endswith(".csv"):
        scalars = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
        full = [{**scalars, **row} for row in rows]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in full for k in row)))
        writer.writeheader()
        writer.writerows(full)
        atomic_write_text(path, buffer.getvalue())
    else:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def write_items(path: str | Path, items: dict[str, ItemScores]) -> None:
    """Per-item scores as a compressed .npz (written atomically): `<metric>` the scores of each test item in the
    data's order, `<metric>.weights` its weights where the metric has them (text-to-image: captions per image);
    `read_items` reads it back. What a bootstrap over runs and items (`stats.hierarchical_ci`) resamples."""
    arrays = {key: np.asarray(item.scores) for key, item in items.items()}
    arrays |= {f"{key}.weights": np.asarray(item.weights) for key, item in items.items() if item.weights is not None}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_items(path: str | Path) -> dict[str, ItemScores]:
    """`write_items`'s file as {metric: ItemScores}."""
    with np.load(path) as stored:
        return {key: ItemScores(stored[key], stored[f"{key}.weights"] if f"{key}.weights" in stored else None)
                for key in stored.files if not key.endswith(".weights")}


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (the experiment driver checks its [final] flags with it)."""
    parser = argparse.ArgumentParser(prog="python -m dtplib.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="open_clip name, e.g. DTP-ViT-B-32-4x or ViT-B-32; default with --checkpoint: "
                        "the model the checkpoint was trained as")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="a checkpoint written by python -m dtplib.train")
    weights.add_argument("--pretrained", help="an open_clip pretrained tag (e.g. laion2b_s34b_b79k) or file")
    weights.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two checkpoints scored on the same images: "
                         "A - B per metric with its paired bootstrap interval (--bootstrap, default 1000)")
    parser.add_argument("--zeroshot-data", help="ImageFolder-style directory, e.g. a CIFAR-10 test folder")
    parser.add_argument("--imagenet-val", help="ImageNet validation directory with one WordNet-id folder per class "
                        "(missing classes are counted, imagenet_missing_classes, with a warning; top-5 is NaN with 5 "
                        "classes or fewer)")
    parser.add_argument("--val-data", help="retrieval shards, brace notation allowed: dir/{000000..000004}.tar; "
                        "also gives val_loss, the held-out contrastive loss")
    parser.add_argument("--probe-data", help="ImageFolder-style directory for a linear probe on frozen image "
                        "features (e.g. a CIFAR-10 test folder), split into probe-train and probe-test with --seed")
    parser.add_argument("--probe-train-per-class", type=int, default=100, help="linear probe: train images per class")
    parser.add_argument("--probe-test-per-class", type=int, help="linear probe: test images per class (default: the "
                        "rest)")
    parser.add_argument("--force-image-size", type=int, help="input size in pixels (default: the size the "
                        "checkpoint was trained at, its --force-image-size, else the model's own); the position "
                        "embedding is resampled")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loss-batch-size", type=int, default=64, help="val_loss: pairs per fixed batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers for the zero-shot images")
    parser.add_argument("--max-per-class", type=int, help="zero-shot: first N images of each class (sorted)")
    parser.add_argument("--max-images", type=int, help="retrieval and val_loss: first N images of the shards")
    parser.add_argument("--zeroshot-skip-empty", action="store_true", help="zero-shot: leave out class folders "
                        "without images (counted as *_skipped_classes) instead of refusing them")
    parser.add_argument("--bootstrap", type=int, metavar="N", help="N bootstrap resamples of the test images: adds "
                        "<metric>_ci_low / <metric>_ci_high (95%%) for the recalls, top-1/top-5 and val_loss")
    parser.add_argument("--seed", type=int, default=0, help="the probe split and the bootstrap resamples")
    parser.add_argument("--output", help="write the metrics and provenance to this file: JSON, or CSV if it ends "
                        "in .csv (one row, or one row per metric with --compare)")
    parser.add_argument("--items", help="write each metric's per-item scores (test images; val_loss: its batches) to "
                        "this .npz, what a bootstrap over runs and items reads (not with --compare)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, the traceback "
                        "(and torch's full message for a refused checkpoint) instead of one line")
    return parser
