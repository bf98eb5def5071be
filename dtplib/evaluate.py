"""Zero-shot classification (top-1/top-5) and image-text retrieval (R@1/5/10) for any open_clip model.

Read top to bottom:
1. Metrics on score matrices: `topk_accuracy`, `retrieval_recall`.
2. Zero-shot classification of an ImageFolder-style directory: `zeroshot_classes`, `templates_for`, `zero_shot_eval`.
3. Image-text retrieval over webdataset shards, every caption of every image: `retrieval_eval`.
4. `evaluate` (what the training loop calls), `load_model`, and `python -m dtplib.evaluate -h`.

Ties and NaN count against the model: an item is a hit at k when fewer than k wrong candidates score at least as
high as its best right one (a NaN score is taken as the best wrong one and the worst right one). So the numbers are
deterministic, and a collapsed model (all scores equal, or NaN) scores 0 instead of a perfect top-1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import batched, build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from timm.data import ImageNetInfo
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dtplib.clip import (
    check_model_name,
    check_pretrained,
    load_state_dict,
    load_trained,
    read_state_dict,
    training_config,
)
from dtplib.loader import DECODE_ERRORS, IMAGE_EXTENSIONS, expand_shards, iter_samples
from dtplib.utils import atomic_write_text, eval_mode, open_rgb, run_cli, run_info, unwrap

log = logging.getLogger(__name__)

RANK_CHUNK = 1024  # score rows ranked at once: bounds memory to a few copies of 1024 x candidates
WNID = re.compile(r"n\d{8}")  # an ImageNet class folder name (WordNet noun id)

CIFAR_TEMPLATES = (  # CLIP's 18 prompts for CIFAR-10 (Radford et al. 2021, data/prompts.md of openai/CLIP)
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


# ----------------------------------------------------------------------------------------------------------
# 1. Metrics


def _ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """Rank of each row's best positive: how many negatives of that row score at least as high (ties, NaN lose).

    scores N x M, positives N x M boolean -> N ranks; a row is a hit at k when its rank < k.
    """
    inf, ranks = float("inf"), []
    for start in range(0, len(scores), RANK_CHUNK):
        rows, is_positive = scores[start:start + RANK_CHUNK].float(), positives[start:start + RANK_CHUNK]  # n x M
        as_positive = rows.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)  # a NaN positive is the worst
        as_negative = rows.nan_to_num(nan=inf, posinf=inf, neginf=-inf)  # a NaN negative is the best
        best = as_positive.masked_fill(~is_positive, -inf).amax(dim=1, keepdim=True)  # n x 1
        at_least_best = as_negative >= best  # n x M
        ranks.append((at_least_best & ~is_positive).sum(dim=1))  # n
    return torch.cat(ranks) if ranks else scores.new_zeros(0, dtype=torch.long)


def _hit_rates(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of ranks below each k (an exact ratio of counts, so 2/20 prints as 0.1)."""
    return {k: (ranks < k).sum().item() / len(ranks) for k in ks}


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target class is among the k highest logits, for each k (a k above C counts as C)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or len(logits) == 0:
        raise ValueError(f"need logits B x C and targets B with B > 0, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    num_classes = logits.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got {targets.min()}..{targets.max()}")
    is_target = F.one_hot(targets.long(), num_classes).bool()  # B x C
    return _hit_rates(_ranks(logits, is_target), ks)


def retrieval_recall(similarity: Tensor, text_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k from an images x texts similarity matrix.

    text_image[t] is the image that text t describes. Image-to-text: a hit when any caption of the image is among
    its k best texts; text-to-image: a hit when the text's image is among its k best images.
    """
    num_images, num_texts = similarity.shape
    if text_image.shape != (num_texts,) or num_images == 0:
        raise ValueError(f"need similarity I x T and text_image T with I > 0, got {tuple(similarity.shape)} and "
                         f"{tuple(text_image.shape)}")
    image_ids = torch.arange(num_images, device=similarity.device)
    describes = text_image.to(similarity.device)[None, :] == image_ids[:, None]  # I x T
    without_text = (~describes.any(dim=1)).nonzero().flatten().tolist()
    if without_text or text_image.min() < 0 or text_image.max() >= num_images:
        raise ValueError(f"every text needs an image in [0, {num_images}) and every image a text "
                         f"(images without one: {without_text[:5]})")
    image_to_text = _hit_rates(_ranks(similarity, describes), ks)  # over the I images
    text_to_image = _hit_rates(_ranks(similarity.T, describes.T), ks)  # over the T texts
    return ({f"image_to_text_R@{k}": v for k, v in image_to_text.items()}
            | {f"text_to_image_R@{k}": v for k, v in text_to_image.items()})


# ----------------------------------------------------------------------------------------------------------
# 2. Zero-shot classification


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def class_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """(class folders with images, class folders without any) of an ImageFolder-style directory, each in sorted
    order. An image is a file with one of IMAGE_EXTENSIONS, at any depth; hidden folders are not classes."""
    if not root.is_dir():
        raise FileNotFoundError(f"zero-shot data folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    with_images = [folder for folder in folders if _has_image(folder)]
    return with_images, [folder for folder in folders if folder not in with_images]


def refuse_empty_classes(root: Path, with_images: Sequence[Path], empty: Sequence[Path],
                         skip_empty_classes: bool) -> None:
    """An empty class folder is a ValueError naming it, as torchvision's ImageFolder refuses one, unless skipped; a
    directory whose every class folder is empty is refused either way."""
    names = [folder.name for folder in empty]
    if names and not skip_empty_classes:
        raise ValueError(f"{root}: found no valid file for the classes {names[:10]}"
                         f"{f' and {len(names) - 10} more' if len(names) > 10 else ''} (image extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)}); remove the folders, or skip them with "
                         "skip_empty_classes=True (--zeroshot-skip-empty)")
    if not with_images:
        raise ValueError(f"{root}: every class folder is empty (no {', '.join(IMAGE_EXTENSIONS)} files)")


def zeroshot_classes(data_dir: str | Path, *, skip_empty_classes: bool = False) -> tuple[list[str], str]:
    """Class names of an ImageFolder-style directory, in label order (sorted folder names), and its layout.

    "imagenet": every folder is a WordNet id (n01440764, ...), named with open_clip's IMAGENET_CLASSNAMES. The
    standard ImageNet index is the position in the sorted list of the 1000 ids, so with all folders label i is
    class i; a subset keeps that order. "names": folders are class names, underscores read as spaces (CIFAR-10).
    A class folder without images is refused (a ValueError naming it, as torchvision's ImageFolder does) once the
    names are checked, or left out (of the names and the labels) with `skip_empty_classes`.
    """
    root = Path(data_dir)
    with_images, empty = class_folders(root)
    folders = sorted(folder.name for folder in with_images + empty)
    is_wnid = [bool(WNID.fullmatch(folder)) for folder in folders]
    if all(is_wnid):
        wnids = ImageNetInfo("imagenet-1k").label_names()  # the 1000 ids, sorted: index i is IMAGENET_CLASSNAMES[i]
        index = {wnid: i for i, wnid in enumerate(wnids)}
        unknown = [folder for folder in folders if folder not in index]
        if unknown:
            raise ValueError(f"{root}: {len(unknown)} folders are not ImageNet-1k classes, e.g. {unknown[:3]}")
        names, layout = [IMAGENET_CLASSNAMES[index[folder]] for folder in folders], "imagenet"
    elif any(is_wnid):
        raise ValueError(f"{root} mixes WordNet-id folders with named ones, e.g. "
                         f"{[f for f, w in zip(folders, is_wnid, strict=True) if w][:2]} and "
                         f"{[f for f, w in zip(folders, is_wnid, strict=True) if not w][:2]}")
    else:
        names, layout = [folder.replace("_", " ") for folder in folders], "names"
    refuse_empty_classes(root, with_images, empty, skip_empty_classes)
    kept = {folder.name for folder in with_images}
    return [name for folder, name in zip(folders, names, strict=True) if folder in kept], layout


def templates_for(layout: str) -> tuple:
    """Prompt templates: OpenAI's 80 for ImageNet, CLIP's 18 CIFAR-10 prompts for plain class names."""
    if layout == "imagenet":
        return OPENAI_IMAGENET_TEMPLATES
    if layout == "names":
        return CIFAR_TEMPLATES
    raise ValueError(f"unknown layout {layout!r}; expected 'imagenet' or 'names'")


def image_files(root: Path, max_per_class: int | None, skip_empty_classes: bool = False) -> list[tuple[Path, int]]:
    """(path, label) for the images of each class folder in sorted path order, the first `max_per_class` of each.
    Labels follow `zeroshot_classes(root, skip_empty_classes=...)`; an empty class folder is refused unless skipped."""
    folders, empty = class_folders(Path(root))
    refuse_empty_classes(Path(root), folders, empty, skip_empty_classes)
    samples = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        samples += [(path, label) for path in files[:max_per_class]]
    return samples


class ImageFiles(Dataset):
    """(image, label) from a list of files; an unreadable image comes back as None for the collate to count."""

    def __init__(self, samples: list[tuple[Path, int]], preprocess):
        self.samples, self.preprocess = samples, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, label = self.samples[index]
        try:
            image = open_rgb(path)
        except DECODE_ERRORS as exn:
            log.warning("skipping unreadable image %s: %r", path, exn)
            return None
        return self.preprocess(image), label


def collate_readable(batch: list[tuple[Tensor, int] | None]) -> tuple[Tensor | None, Tensor, int]:
    """Stack the readable samples of a batch; also return how many were unreadable."""
    readable = [sample for sample in batch if sample is not None]
    images = torch.stack([image for image, _ in readable]) if readable else None  # B x 3 x H x W
    labels = torch.tensor([label for _, label in readable], dtype=torch.long)  # B
    return images, labels, len(batch) - len(readable)


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """dtype the image tower expects (fp32, or bf16/fp16 for a model cast to pure low precision)."""
    return next(model.parameters()).dtype


def zero_shot_eval(model, preprocess, tokenizer, data_dir: str | Path, *, batch_size: int = 64,
                   device: str | torch.device = "cpu", max_per_class: int | None = None,
                   templates: Sequence | None = None, workers: int = 0, skip_empty_classes: bool = False) -> dict:
    """Zero-shot top-1/top-5 accuracy on an ImageFolder-style directory, with prompts averaged per class.

    `max_per_class` keeps the first n images per class in sorted path order (a deterministic subset for CPU
    runs). Unreadable images are skipped and counted (zeroshot_skipped); the model's training flags are kept.
    A class folder without images is a ValueError naming it, before any model work; with `skip_empty_classes` it is
    left out of the classifier and counted (zeroshot_skipped_classes, a key only present then).
    """
    root = Path(data_dir)
    classnames, layout = zeroshot_classes(root, skip_empty_classes=skip_empty_classes)
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
        for images, labels, unreadable in loader:
            skipped += unreadable
            if images is None:
                continue
            features = model.encode_image(images.to(device, input_dtype(model)), normalize=True).float()  # B x D
            logits = features @ classifier  # B x C
            is_target = F.one_hot(labels.to(device), len(classnames)).bool()  # B x C
            ranks.append(_ranks(logits, is_target).cpu())  # B
    if not ranks:
        raise ValueError(f"none of the {len(samples)} images under {root} could be read")
    hits = _hit_rates(torch.cat(ranks), (1, 5))
    metrics = {"zeroshot_top1": hits[1], "zeroshot_top5": hits[5], "zeroshot_images": sum(map(len, ranks)),
               "zeroshot_skipped": skipped}
    if skip_empty_classes:
        if empty:
            log.warning("%s: left out %d class folders without images: %s", root, len(empty), empty[:10])
        metrics["zeroshot_skipped_classes"] = len(empty)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# 3. Image-text retrieval


def retrieval_eval(model, preprocess, tokenizer, shards: str | Sequence[str], *, batch_size: int = 64,
                   device: str | torch.device = "cpu", max_images: int | None = None) -> dict:
    """Image-to-text and text-to-image R@1/5/10 over every sample of the shards, each image with all its captions.

    Captions come from the sample's json "captions" (falling back to txt); blank ones are dropped, and a sample left
    without any (neither json captions nor txt) is skipped and counted (retrieval_skipped_no_caption), as the
    training loader counts no_caption. `max_images` keeps the first n scored samples. Images that do not decode are
    passed over by `iter_samples`. No sample left: a ValueError naming the shards.
    """
    shard_list = expand_shards(shards)
    model = unwrap(model)
    image_features, text_features, text_image = [], [], []  # per batch, per batch, per text
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
        for batch in batched(captioned(), batch_size):
            images = torch.stack([preprocess(sample["image"]) for sample in batch])  # B x 3 x H x W
            captions = [caption for sample in batch for caption in sample["captions"]]
            text_image += [num_images + i for i, sample in enumerate(batch) for _ in sample["captions"]]
            num_images += len(batch)
            image_features.append(model.encode_image(images.to(device, input_dtype(model)), normalize=True).float())
            text_features.append(model.encode_text(tokenizer(captions).to(device), normalize=True).float())
    if not image_features:
        reason = f" ({no_caption} samples had no caption: neither json captions nor txt)" if no_caption else ""
        raise ValueError(f"no readable samples in {shards}{reason}")
    similarity = torch.cat(image_features) @ torch.cat(text_features).T  # I x T
    recalls = retrieval_recall(similarity, torch.tensor(text_image, device=similarity.device))
    return recalls | {"retrieval_images": similarity.shape[0], "retrieval_texts": similarity.shape[1],
                      "retrieval_skipped_no_caption": no_caption}


# ----------------------------------------------------------------------------------------------------------
# 4. Entry points: evaluate, load_model, command line


def check_data(zeroshot_data=None, imagenet_val=None, val_data=None, skip_empty_classes: bool = False) -> None:
    """Fail on a missing or empty data path (or class folder) before any model work (minutes of it, on ImageNet)."""
    for data_dir in (zeroshot_data, imagenet_val):
        if data_dir is not None:
            zeroshot_classes(data_dir, skip_empty_classes=skip_empty_classes)
    if val_data is not None:
        expand_shards(val_data)


def evaluate(model, preprocess, tokenizer, *, zeroshot_data: str | Path | None = None,
             imagenet_val: str | Path | None = None, val_data: str | Sequence[str] | None = None,
             batch_size: int = 64, device: str | torch.device = "cpu", max_per_class: int | None = None,
             max_images: int | None = None, workers: int = 0, skip_empty_classes: bool = False) -> dict:
    """Every evaluation whose data is given, as one flat dict ({} when none is): zeroshot_*, imagenet_*, and the
    retrieval recalls. ImageNet keys replace the zeroshot_ prefix with imagenet_ (imagenet_top1, imagenet_top5).
    An empty class folder is refused before any model work, or left out with `skip_empty_classes`."""
    check_data(zeroshot_data, imagenet_val, val_data, skip_empty_classes)
    metrics = {}
    options = dict(batch_size=batch_size, device=device, max_per_class=max_per_class, workers=workers,
                   skip_empty_classes=skip_empty_classes)
    if zeroshot_data is not None:
        metrics |= zero_shot_eval(model, preprocess, tokenizer, zeroshot_data, **options)
    if imagenet_val is not None:
        imagenet = zero_shot_eval(model, preprocess, tokenizer, imagenet_val, **options)
        metrics |= {key.replace("zeroshot_", "imagenet_", 1): value for key, value in imagenet.items()}
    if val_data is not None:
        metrics |= retrieval_eval(model, preprocess, tokenizer, val_data, batch_size=batch_size, device=device,
                                  max_images=max_images)
    return metrics


def load_model(name: str | None = None, checkpoint: str | Path | None = None, pretrained: str | None = None,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object, object]:
    """(model in eval mode, preprocess_val, tokenizer) for an open_clip name (dtplib's DTP-ViT names included).

    `checkpoint`: a file from our training loop ({"state_dict": ..., optional `module.` prefixes, other keys}).
    Such a file records the flags that built its model (`args`), so `name` may be left out, and a tower that has
    no registered name (`--model ViT-B-32 --compression 3`, other DTP settings) is rebuilt as it was trained.
    `pretrained`: an open_clip tag or weights file. Names, files and weights are checked before the model is built.
    """
    if checkpoint is not None and pretrained is not None:
        raise ValueError("give a checkpoint or pretrained weights, not both")
    config = training_config(checkpoint) if checkpoint is not None else None
    if name is None and config is None:
        raise ValueError("give a model name (a checkpoint from python -m dtplib.train records its own)")
    if config is not None and name in (None, config.model):  # the training flags rebuild exactly the trained model
        model, preprocess, tokenizer, _ = load_trained(checkpoint, device)
        log.info("loaded %s", checkpoint)
        return model, preprocess, tokenizer
    check_model_name(name)
    if pretrained is not None:
        check_pretrained(name, pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        load_state_dict(model, state, checkpoint, name)
        log.info("loaded %d tensors from %s", len(state), checkpoint)
    return model.eval(), preprocess, tokenizer


def format_table(metrics: dict) -> str:
    """Two aligned columns, fractions to four places and counts as integers."""
    width = max(map(len, metrics), default=6)
    rows = [f"{'metric':<{width}}  value"]
    rows += [f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
             for key, value in metrics.items()]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: load a model, run the evaluations asked for, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m dtplib.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="open_clip name, e.g. DTP-ViT-B-32-4x or ViT-B-32; default with --checkpoint: "
                        "the model the checkpoint was trained as")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="a checkpoint written by python -m dtplib.train")
    weights.add_argument("--pretrained", help="an open_clip pretrained tag (e.g. laion2b_s34b_b79k) or file")
    parser.add_argument("--zeroshot-data", help="ImageFolder-style directory, e.g. a CIFAR-10 test folder")
    parser.add_argument("--imagenet-val", help="ImageNet validation directory with one WordNet-id folder per class")
    parser.add_argument("--val-data", help="retrieval shards, brace notation allowed: dir/{000000..000004}.tar")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers for the zero-shot images")
    parser.add_argument("--max-per-class", type=int, help="zero-shot: first N images of each class (sorted)")
    parser.add_argument("--max-images", type=int, help="retrieval: first N images of the shards")
    parser.add_argument("--zeroshot-skip-empty", action="store_true", help="zero-shot: leave out class folders "
                        "without images (counted as *_skipped_classes) instead of refusing them")
    parser.add_argument("--output", help="write the metrics and provenance to this JSON file")
    args = parser.parse_args(argv)
    if args.zeroshot_data is None and args.imagenet_val is None and args.val_data is None:
        parser.error("give at least one of --zeroshot-data, --imagenet-val, --val-data")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        parser.error(f"checkpoint not found: {args.checkpoint}")
    if args.model is None and args.checkpoint is None:
        parser.error("give --model (and --pretrained), or --checkpoint")
    try:  # every path, the name and the weights, before the model is built
        check_data(args.zeroshot_data, args.imagenet_val, args.val_data, args.zeroshot_skip_empty)
        if args.model is not None:
            check_model_name(args.model)
        if args.pretrained is not None:
            check_pretrained(args.model, args.pretrained)
    except (FileNotFoundError, ValueError, RuntimeError) as exn:
        parser.error(str(exn))

    model, preprocess, tokenizer = load_model(args.model, args.checkpoint, args.pretrained, args.device)
    metrics = evaluate(model, preprocess, tokenizer, zeroshot_data=args.zeroshot_data,
                       imagenet_val=args.imagenet_val, val_data=args.val_data, batch_size=args.batch_size,
                       device=args.device, max_per_class=args.max_per_class, max_images=args.max_images,
                       workers=args.workers, skip_empty_classes=args.zeroshot_skip_empty)
    print(format_table(metrics))
    if args.output:
        record = {"model": args.model, "checkpoint": args.checkpoint, "pretrained": args.pretrained,
                  "zeroshot_data": args.zeroshot_data, "imagenet_val": args.imagenet_val, "val_data": args.val_data,
                  "max_per_class": args.max_per_class, "max_images": args.max_images,
                  **run_info(args.device, "fp32", args.batch_size), "metrics": metrics}
        atomic_write_text(args.output, json.dumps(record, indent=1) + "\n")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    run_cli(main, prog="python -m dtplib.evaluate")
