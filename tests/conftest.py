"""Shared fixtures: real photos from DTPLIB_DATA (default ../shared/data), quiet, offline defaults, and the set-up of
`make test`'s two workers (pytest -n 2 --dist loadgroup, pytest-xdist)."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import webdataset as wds

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist each worker gets one CPU core: one intra-op thread here and in every process a test starts
# (python -m dtplib.*, torchrun's ranks, notebook kernels), or the two workers' threads fight over two cores.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    torch.set_num_threads(1)

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


def write_shards(folder: Path, photos: list[Path], per_shard: int) -> str:
    """Real Flickr8k photos with their first caption, as webdataset shards with a sizes.json (as from_captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = flickr_captions(photos)
    sizes = {}
    for index in range(0, len(photos), per_shard):
        name = f"{index // per_shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for photo, caption in zip(photos[index:index + per_shard], captions[index:index + per_shard], strict=True):
                sink.write({"__key__": photo.stem, "jpg": photo.read_bytes(), "txt": caption,
                            "json": {"captions": [caption]}})
        sizes[name] = len(photos[index:index + per_shard])
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{000000..{len(sizes) - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def shards32(tmp_path_factory) -> str:
    """32 pairs in two shards of 16: one global batch of 32, or one batch of 16 per rank with two ranks."""
    return write_shards(tmp_path_factory.mktemp("shards32"), flickr_photos(32), per_shard=16)


QUIET = ["--workers", "0", "--report-to", "none", "--threads", "1"]  # training flags: in-process data, one thread
TI_4X = ["--model", "ViT-Ti-8-64", "--compression", "4"]
TI_4X_RUN = [*TI_4X, "--batch-size", "16", "--epochs", "2", "--warmup", "1"]  # the flags of `trained_ti4x`


@pytest.fixture(scope="session")
def trained_ti4x(tmp_path_factory, shards32) -> Path:
    """One finished training run, for the tests that need "a trained Ti run" and not a run of their own: Ti-4x on
    shards32 with TI_4X_RUN (2 epochs of 2 steps; checkpoints epoch_1.pt and epoch_2.pt), trained
    once per session (per pytest-xdist worker). A test that changes a run works on its own copy (`copy_run`)."""
    from dtplib import train

    logs = tmp_path_factory.mktemp("trained")
    return train.main(["--train-data", shards32, "--logs", str(logs), "--name", "ti4x", *QUIET, *TI_4X_RUN])["run_dir"]


def copy_run(run_dir: Path, logs: Path, name: str) -> Path:
    """A copy of a run folder as <logs>/<name>: the same run (its run_id), to resume or to damage."""
    return Path(shutil.copytree(run_dir, Path(logs) / name))


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's --master_port: two workers, or two suites, never share one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pytest_addoption(parser):
    parser.addoption("--demo-defaults", action="store_true",
                     help="tests/test_demo.py: run the notebooks with their own defaults, as make demo does "
                          "(make test-demo); without it, with the small parameters of test_notebooks.SMOKE")


# The longest units of work (a minute or more on 2 cores), longest first: handed out first, they end early, and the
# two workers finish close together (longest-processing-time-first scheduling)
LONGEST_FIRST = ("test_demo.py::test_make_demo", "test_gpu_check.py::test_every_piece",
                 "test_experiment.py::TestTheTrainedGrid", "test_train.py::test_two_gloo_processes_of_the_packed")


def _longest_first(item) -> int:
    return next((rank for rank, prefix in enumerate(LONGEST_FIRST) if prefix in item.nodeid), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist: the slow tests first, the longest of them first of all (LONGEST_FIRST), so that the long
    ones start early and the short ones fill the workers' gaps at the end (the units of work go out in the order of
    their first test)."""
    if XDIST_WORKER:
        items.sort(key=lambda item: (item.get_closest_marker("slow") is None, _longest_first(item)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `-n 2 --dist loadgroup`: the tests of a class are one unit of work, run by one worker in a row
    (they share the class's expensive fixtures, e.g. test_experiment.py's trained grid), and every other test is a
    unit of its own. xdist's own loadgroup (xdist_group marks) does not group under pytest 9.2: it renames node ids,
    which pytest 9.2 no longer lets a plugin do (pytest-dev/pytest-xdist#1386)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClassOrTest(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.partition("[")[0].split("::")  # parameters may hold any character
            return "::".join(parts[:2]) if len(parts) > 2 else nodeid

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems
    return ClassOrTest(config, log)
