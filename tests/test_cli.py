"""Bad input on every dtplib command line but training: one line on stderr that names the file (and the line of a
text file), exit status 2, no traceback unless --debug. Each command runs as `python -m` runs it, on real files:
Flickr8k photos from DTPLIB_DATA, the embedded sample's shards, checkpoints saved and then cut short. The commands
share one child process (tests/one_process.py: runpy, as `python -m`), so that nine commands cost one interpreter
start."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from shard_io import FLICKR_IMAGES

from dtplib.common.paths import REPO_ROOT
from dtplib.data.shards import SAMPLE_DIR, split_shards
from dtplib.tower.clip import read_checkpoint


def assert_one_line_error(result: dict, *names: str) -> str:
    """Exit 2; the last stderr line names every one of `names`; no traceback; returns that line."""
    assert result["returncode"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"], result["stderr"]
    line = result["stderr"].strip().splitlines()[-1]
    assert all(name in line for name in names), line
    return line


def make_images(folder: Path) -> Path:
    folder.mkdir()
    for path in FLICKR_IMAGES[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def make_truncated_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"weight": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.fixture
def truncated_checkpoint(tmp_path):
    return make_truncated_checkpoint(tmp_path / "cut.pt")


def test_read_checkpoint_names_an_empty_or_cut_file(tmp_path, truncated_checkpoint):
    (tmp_path / "empty.pt").write_bytes(b"")
    for path in (tmp_path / "empty.pt", truncated_checkpoint):
        with pytest.raises(ValueError, match=f"{path}: empty or not a checkpoint"):
            read_checkpoint(path)


def bad_inputs(root: Path) -> dict[str, tuple[str, list]]:
    """Each case's files made under `root`: case -> (module, args)."""
    images = make_images(root / "images")
    cut = make_truncated_checkpoint(root / "cut.pt")
    (root / "captions.json").write_bytes(b"")
    empty_json = ["from-captions", "--images", images, "--captions", root / "captions.json", "--out", root / "out1"]
    names = [p.name for p in sorted(images.iterdir())]
    (root / "captions.tsv").write_bytes(f"image\tcaption\n{names[0]}\ta dog\n".encode()
                                        + f"{names[1]}\ta caf\xe9 table\n".encode("latin-1"))
    (root / "tar").mkdir()
    tarfile.open(root / "tar" / "000000.tar", "w").close()
    (root / "tar" / "sizes.json").write_text('{"000000.tar": 0}')
    (root / "epoch_1.pt").write_bytes(b"")
    broken = make_images(root / "broken")
    (broken / "zz_broken.jpg").write_bytes(b"not a jpeg")
    return {
        "empty json": ("dtplib.data", empty_json),
        "empty json --debug": ("dtplib.data", [*empty_json, "--debug"]),
        "latin-1 tsv": ("dtplib.data", ["from-captions", "--images", images, "--captions", root / "captions.tsv",
                                        "--out", root / "out2"]),
        "empty tar": ("dtplib.data", ["bench", root / "tar" / "000000.tar"]),
        "empty checkpoint": ("dtplib.evaluate", ["--checkpoint", root / "epoch_1.pt", "--val-data",
                                                 split_shards(SAMPLE_DIR, "test")]),
        "viz cut checkpoint": ("dtplib.viz", ["overlay", "--checkpoint", cut, "--images", images,
                                              "--out", root / "viz"]),
        "flops broken photo": ("dtplib.flops", ["--model", "DTP-ViT-Ti-8-64-4x", "--images", broken,
                                                "--compressions", "2"]),
        "bench cut checkpoint": ("dtplib.bench", ["--models", "DTP-ViT-Ti-8-64-4x", "--checkpoint",
                                                  f"DTP-ViT-Ti-8-64-4x={cut}", "--batch-size", "2", "--steps", "1",
                                                  "--warmup", "0", "--modes", "image", "--no-memory",
                                                  "--out", root / "bench"]),
    }


@pytest.mark.slow
class TestBadInputOnEveryCommandLine:
    """One child process runs every case (tests/one_process.py); each test reads its case's status and stderr."""

    @pytest.fixture(scope="class")
    def said(self, tmp_path_factory) -> dict[str, dict]:
        root = tmp_path_factory.mktemp("cli")
        cases = bad_inputs(root)
        (root / "commands.json").write_text(json.dumps([[m, [str(a) for a in args]] for m, args in cases.values()]))
        subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "one_process.py"), str(root / "commands.json"),
                        str(root / "results.json")], cwd=REPO_ROOT, check=True, timeout=600)
        return dict(zip(cases, json.loads((root / "results.json").read_text()), strict=True))

    def test_data_empty_json_captions(self, said):
        assert "empty" in assert_one_line_error(said["empty json"], "captions.json")
        debug = said["empty json --debug"]
        assert debug["returncode"] != 0 and "Traceback" in debug["stderr"] and "captions.json" in debug["stderr"]

    def test_data_latin1_byte_in_captions_tsv(self, said):
        assert "UTF-8" in assert_one_line_error(said["latin-1 tsv"], "captions.tsv:3")

    def test_data_bench_on_an_empty_tar(self, said):
        line = assert_one_line_error(said["empty tar"], "000000.tar")
        assert "empty" in line and "no sizes.json" not in line

    def test_evaluate_empty_checkpoint(self, said):
        assert "empty or not a checkpoint" in assert_one_line_error(said["empty checkpoint"], "epoch_1.pt")

    def test_viz_truncated_checkpoint(self, said):
        assert "empty or not a checkpoint" in assert_one_line_error(said["viz cut checkpoint"], "cut.pt")

    def test_flops_undecodable_photo(self, said):
        assert_one_line_error(said["flops broken photo"], "zz_broken.jpg")

    def test_bench_truncated_checkpoint(self, said):
        assert "empty or not a checkpoint" in assert_one_line_error(said["bench cut checkpoint"], "cut.pt")
