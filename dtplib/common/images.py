"""Photos from disk as RGB images and preprocessed batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from .paths import repo_path


def open_rgb(path: str | Path | BinaryIO):
    """An image file (or file-like object) as an RGB PIL image, read whole: the file is closed when this returns.
    PIL's errors on bad bytes pass through (OSError, SyntaxError, ValueError, DecompressionBombError)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_images(paths: Sequence[str | Path], preprocess) -> torch.Tensor:
    """Image files through a preprocess (open_clip's eval transform): B x 3 x H x W."""
    return torch.stack([preprocess(open_rgb(path)) for path in paths])


def photo_files(folder: str | Path, count: int) -> list[Path]:
    """The first `count` photos of a folder (sorted names): .jpg, .jpeg or .png files."""
    folder = repo_path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder}")
    return files


def load_photos(folder: str | Path, count: int, preprocess) -> tuple[torch.Tensor, list[Path]]:
    """The first `count` photos of a folder (sorted names), preprocessed: B x 3 x H x W, and their paths."""
    files = photo_files(folder, count)
    return load_images(files, preprocess), files
