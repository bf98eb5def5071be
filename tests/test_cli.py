"""Bad input on every dtplib command line but training: one line on stderr that names the file (and the line of a
text file), exit status 2, no traceback unless --debug. Each command runs as `python -m` in a subprocess, on real
files: Flickr8k photos from DTPLIB_DATA, the embedded sample's shards, checkpoints saved and then cut short."""

import subprocess
import sys
import tarfile

import pytest
import torch
from shard_io import FLICKR_IMAGES

from dtplib.common.paths import REPO_ROOT
from dtplib.data.shards import SAMPLE_DIR, split_shards
from dtplib.tower.clip import read_checkpoint


def run(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2; the last stderr line names every one of `names`; no traceback; returns that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert all(name in line for name in names), line
    return line


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in FLICKR_IMAGES[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture
def truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"state_dict": {"weight": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def test_read_checkpoint_names_an_empty_or_cut_file(tmp_path, truncated_checkpoint):
    (tmp_path / "empty.pt").write_bytes(b"")
    for path in (tmp_path / "empty.pt", truncated_checkpoint):
        with pytest.raises(ValueError, match=f"{path}: empty or not a checkpoint"):
            read_checkpoint(path)


@pytest.mark.slow
def test_data_empty_json_captions(tmp_path, images):
    (tmp_path / "captions.json").write_bytes(b"")
    argv = ["from-captions", "--images", images, "--captions", tmp_path / "captions.json", "--out", tmp_path / "out"]
    line = assert_one_line_error(run("dtplib.data", *argv), "captions.json")
    assert "empty" in line
    debug = run("dtplib.data", *argv, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "captions.json" in debug.stderr


@pytest.mark.slow
def test_data_latin1_byte_in_captions_tsv(tmp_path, images):
    names = [p.name for p in sorted(images.iterdir())]
    (tmp_path / "captions.tsv").write_bytes(f"image\tcaption\n{names[0]}\ta dog\n".encode()
                                            + f"{names[1]}\ta caf\xe9 table\n".encode("latin-1"))
    result = run("dtplib.data", "from-captions", "--images", images, "--captions", tmp_path / "captions.tsv",
                 "--out", tmp_path / "out")
    assert "UTF-8" in assert_one_line_error(result, "captions.tsv:3")


@pytest.mark.slow
def test_data_bench_on_an_empty_tar(tmp_path):
    tarfile.open(tmp_path / "000000.tar", "w").close()
    (tmp_path / "sizes.json").write_text('{"000000.tar": 0}')
    line = assert_one_line_error(run("dtplib.data", "bench", tmp_path / "000000.tar"), "000000.tar")
    assert "empty" in line and "no sizes.json" not in line


@pytest.mark.slow
def test_evaluate_empty_checkpoint(tmp_path):
    (tmp_path / "epoch_1.pt").write_bytes(b"")
    result = run("dtplib.evaluate", "--checkpoint", tmp_path / "epoch_1.pt", "--val-data",
                 split_shards(SAMPLE_DIR, "test"))
    assert "empty or not a checkpoint" in assert_one_line_error(result, "epoch_1.pt")


@pytest.mark.slow
def test_viz_truncated_checkpoint(tmp_path, truncated_checkpoint, images):
    result = run("dtplib.viz", "overlay", "--checkpoint", truncated_checkpoint, "--images", images,
                 "--out", tmp_path / "viz")
    assert "empty or not a checkpoint" in assert_one_line_error(result, "cut.pt")


@pytest.mark.slow
def test_flops_undecodable_photo(tmp_path, images):
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")
    result = run("dtplib.flops", "--model", "DTP-ViT-Ti-8-64-4x", "--images", images, "--compressions", "2")
    assert_one_line_error(result, "zz_broken.jpg")


@pytest.mark.slow
def test_bench_truncated_checkpoint(tmp_path, truncated_checkpoint):
    result = run("dtplib.bench", "--models", "DTP-ViT-Ti-8-64-4x", "--checkpoint",
                 f"DTP-ViT-Ti-8-64-4x={truncated_checkpoint}", "--batch-size", "2", "--steps", "1", "--warmup",
                 "0", "--modes", "image", "--no-memory", "--out", tmp_path / "bench")
    assert "empty or not a checkpoint" in assert_one_line_error(result, "cut.pt")
