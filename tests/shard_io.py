"""Helpers for the data tests: the Flickr8k and COCO files from DTPLIB_DATA, and tar shards read with tarfile alone
or written with webdataset's TarWriter (independent of dtplib)."""

import os
import tarfile
from collections import defaultdict
from pathlib import Path

import webdataset as wds
from conftest import FLICKR

from dtplib.common.paths import data_root

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

COCO = data_root() / "coco-mini"
FLICKR_IMAGES = sorted((FLICKR / "images").glob("*.jpg"))


def read_tars(paths) -> list[dict]:
    """Samples of tar shards read with tarfile alone (independent of dtplib and webdataset)."""
    samples = defaultdict(dict)
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples[(str(path), key)][ext] = tar.extractfile(member).read()
    return list(samples.values())


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
