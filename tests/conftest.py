"""Shared fixtures: real photos from DTPLIB_DATA (default ../shared/data), and quiet, offline defaults."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dtplib.common.paths import data_root  # noqa: E402

FLICKR = data_root() / "flickr8k"  # DTPLIB_DATA as set when pytest starts


def flickr_photos(n: int) -> list[Path]:
    files = sorted((FLICKR / "images").glob("*.jpg"))[:n]
    if len(files) < n:
        raise FileNotFoundError(f"need {n} photos under {FLICKR / 'images'} (DTPLIB_DATA, default ../shared/data)")
    return files


def flickr_captions(files: list[Path]) -> list[str]:
    """First caption of each photo, from captions.tsv (image<TAB>caption)."""
    wanted, captions = {f.name for f in files}, {}
    for line in (FLICKR / "captions.tsv").read_text().splitlines():
        name, _, caption = line.partition("\t")
        if name in wanted and name not in captions:
            captions[name] = caption
    return [captions[f.name] for f in files]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (small ops on a shared 2-core machine run faster without contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption("--demo-defaults", action="store_true",
                     help="tests/test_demo.py: run the notebooks with their own defaults, as make demo does "
                          "(make test-demo); without it, with the small parameters of test_notebooks.SMOKE")
