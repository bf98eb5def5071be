"""ImageFolder-style datasets (a folder per class): class names and their layout (named folders, or ImageNet
WordNet ids), the image files per class, a seeded disjoint train/test split, and a loader that skips unreadable
images. Zero-shot evaluation and the linear probe (`dtplib.measure.evaluate`) read through it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from timm.data import ImageNetInfo
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..common.images import open_rgb
from ..common.paths import repo_path
from .loader import DECODE_ERRORS, IMAGE_EXTENSIONS

log = logging.getLogger(__name__)
WNID = re.compile(r"n\d{8}")  # an ImageNet class folder name (WordNet noun id)


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


def _refuse_empty_classes(root: Path, with_images: Sequence[Path], empty: Sequence[Path],
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
    _refuse_empty_classes(root, with_images, empty, skip_empty_classes)
    kept = {folder.name for folder in with_images}
    return [name for folder, name in zip(folders, names, strict=True) if folder in kept], layout


def image_files(root: Path, max_per_class: int | None, skip_empty_classes: bool = False) -> list[tuple[Path, int]]:
    """(path, label) for the images of each class folder in sorted path order, the first `max_per_class` of each.
    Labels follow `zeroshot_classes(root, skip_empty_classes=...)`; an empty class folder is refused unless skipped."""
    folders, empty = class_folders(Path(root))
    _refuse_empty_classes(Path(root), folders, empty, skip_empty_classes)
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


Sample = tuple[Path, int]  # an image file and its label


@dataclass
class ImageFolderSplit:
    """Disjoint train and test samples of an ImageFolder; label i is the i-th class folder in sorted order."""

    classnames: list[str]  # in label order, as zero-shot prompts name them
    layout: str  # "names" (CIFAR-10 style) or "imagenet" (WordNet ids), see zeroshot_classes
    train: list[Sample]
    test: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _shuffled_per_class(root: Path, seed: int) -> dict[int, list[Path]]:
    """Each class's image files in a seeded order: sorted paths, then permuted by (seed, label)."""
    per_class: dict[int, list[Path]] = {}
    for path, label in image_files(root, None):  # sorted folders, sorted files
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
    classnames, layout = zeroshot_classes(root)
    if per_class_train < 1 or (per_class_test is not None and per_class_test < 1):
        raise ValueError(f"need at least one train and one test image per class, got {per_class_train} and "
                         f"{per_class_test}")
    train_files = _shuffled_per_class(root, seed)
    if test_dir is None:
        test_files = {label: files[per_class_train:] for label, files in train_files.items()}
    else:
        test_root = repo_path(test_dir)
        if zeroshot_classes(test_root)[0] != classnames:
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


def image_loader(samples: Sequence[Sample], preprocess, batch_size: int, workers: int = 0, shuffle: bool = False,
                 seed: int = 0) -> DataLoader:
    """(images, labels, unreadable) batches of (path, label) samples; shuffled with a seeded generator (dropping
    the last short batch when there is a full one) or in the given order."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ImageFiles(list(samples), preprocess), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, num_workers=workers, collate_fn=collate_readable,
                      drop_last=shuffle and len(samples) > batch_size)
