"""The command line `python -m dtplib.data` on real components: shards from Flickr8k photos (DTPLIB_DATA), the loader
benchmark over the embedded sample, and the refusals that keep it inside its data folder (caption paths, tar members,
URL schemes) and offline (the third-party opt-outs)."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from shard_io import COCO, FLICKR_IMAGES, read_tars

from dtplib.common.cli import run_cli
from dtplib.common.extras import OPT_OUTS, set_opt_outs
from dtplib.data import cli
from dtplib.data.shards import SAMPLE_DIR, split_shards, unpack_shards


def test_from_captions_command_prints_the_counts(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in FLICKR_IMAGES[:3]:
        shutil.copy(path, images / path.name)
    (tmp_path / "c.tsv").write_text("image\tcaption\n" + "".join(f"{p.name}\tcaption {i}\n"
                                                                 for i, p in enumerate(FLICKR_IMAGES[:3])))
    argv = ["from-captions", "--images", str(images), "--captions", str(tmp_path / "c.tsv"), "--out",
            str(tmp_path / "out"), "--val-size", "0", "--test-size", "0", "--processes", "1"]
    cli.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["images_in", "pairs_in", "samples_out", "captions_out", "skipped",
                             "captions_skipped", "splits"]
    assert printed["samples_out"] == 3 and printed["splits"]["train"]["shards"] == "train/000000.tar"
    assert len(read_tars((tmp_path / "out" / "train").glob("*.tar"))) == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.main(argv)
    cli.main([*argv, "--overwrite"])

    with pytest.raises(SystemExit) as exit_info:  # no subcommand: argparse's usage error
        cli.main([])
    assert exit_info.value.code == 2


def test_bench_command_appends_a_results_row(tmp_path, capsys):
    out_csv = tmp_path / "bench.csv"
    for workers in (0, 1):
        cli.main(["bench", split_shards(SAMPLE_DIR, "train"), "--workers", str(workers),
                   "--batch-size", "16", "--image-size", "64", "--warmup", "2", "--csv", str(out_csv)])
    assert "images/s" in capsys.readouterr().out
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [row["workers"] for row in rows] == ["0", "1"]
    assert all(float(row["images_per_s"]) > 0 and row["hardware"] and row["batch_size"] == "16"
               for row in rows)


# ---------------------------------------------------------------------------------------------------------
# Nothing outside the data folder is read or written: caption paths, tar members, URL schemes


def files_under(folder) -> dict:
    """Every file under `folder` with its size and mtime (a snapshot to compare before and after a refused call)."""
    return {path: (path.lstat().st_size, path.lstat().st_mtime_ns) for path in folder.rglob("*")}


def run_data_command(argv: list[str], capsys) -> str:
    """`python -m dtplib.data ARGV` in this process, as its __main__ runs it; expects exit 2, returns the one line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli.main, argv, prog="python -m dtplib.data")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_from_captions_refuses_image_paths_outside_images(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in FLICKR_IMAGES[:2]:
        shutil.copy(path, images / path.name)
    canary = tmp_path / "elsewhere" / "canary.jpg"  # a real photo outside --images
    canary.parent.mkdir()
    shutil.copy(FLICKR_IMAGES[2], canary)
    (images / "link.jpg").symlink_to(canary)  # inside by name, outside once resolved
    rows = [(FLICKR_IMAGES[0].name, "kept"), ("../elsewhere/canary.jpg", "up and out"), (str(canary), "absolute"),
            ("link.jpg", "a symlink out"), ("../../../../../etc/hostname", "a system file"),
            (FLICKR_IMAGES[1].name, "kept too")]
    captions = tmp_path / "c.tsv"
    captions.write_text("image\tcaption\n" + "".join(f"{image}\t{caption}\n" for image, caption in rows))
    before = files_under(tmp_path)
    line = run_data_command(["from-captions", "--images", str(images), "--captions", str(captions), "--out",
                             str(tmp_path / "out"), "--val-size", "0", "--test-size", "0", "--processes", "1"],
                            capsys)
    # lines 3-6 of the file (line 1 is the header); the first three are named, all four counted
    assert "4 of 6 image paths resolve outside --images" in line
    assert "line 3: '../elsewhere/canary.jpg'; line 4: " + repr(str(canary)) + "; line 5: 'link.jpg'" in line
    assert files_under(tmp_path) == before  # no shard, no folder, no stats.json: the run was refused before work
    assert not (tmp_path / "out").exists()


def evil_shard(path, member: tarfile.TarInfo, data: bytes = b"") -> str:
    """A shard with one good sample (a real photo and its caption) and then `member`."""
    photo = FLICKR_IMAGES[0].read_bytes()
    with tarfile.open(path, "w") as tar:
        for name, payload in (("good.jpg", photo), ("good.txt", b"a good caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return str(path)


def escaping_members(tmp_path) -> list[tuple[tarfile.TarInfo, str]]:
    """Members a hostile shard might hold, each with the words of its refusal; where one would land, it lands
    inside tmp_path (so a failing test writes nothing outside it)."""
    upward = tarfile.TarInfo("../../ESCAPED_x.jpg")
    absolute = tarfile.TarInfo(str(tmp_path / "ESCAPED_abs.jpg"))
    link = tarfile.TarInfo("linked.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "ESCAPED_target.jpg")
    device = tarfile.TarInfo("device.jpg")
    device.type = tarfile.CHRTYPE
    return [(upward, "not a plain file name"), (absolute, "not a plain file name"), (link, "is a link"),
            (device, "is a device or fifo")]


def test_unpack_shards_refuses_members_that_leave_the_folder(tmp_path):
    photo = FLICKR_IMAGES[1].read_bytes()
    out = tmp_path / "deep" / "er" / "out"  # "../../" from out/images is tmp_path/deep/er
    for index, (member, reason) in enumerate(escaping_members(tmp_path)):
        shard = evil_shard(tmp_path / f"evil{index}.tar", member, photo if member.isreg() else b"")
        before = files_under(tmp_path)
        with pytest.raises(ValueError) as error:
            unpack_shards([shard], out)
        message = str(error.value)
        assert message.startswith(f"{shard}: member {member.name!r}") and reason in message, message
        assert files_under(tmp_path) == before and not out.exists()  # refused before anything was written
    assert not [p for p in tmp_path.rglob("ESCAPED*")]

    # a shard read as a stream (no look at its headers first) is refused at the member, still inside OUT
    upward = evil_shard(tmp_path / "stream.tar", escaping_members(tmp_path)[0][0], photo)
    with pytest.raises(ValueError, match=r"stream\.tar: member '\.\./\.\./ESCAPED_x'\.jpg is not a plain file"):
        unpack_shards([f"pipe:cat {upward}"], out)
    assert [p.name for p in out.rglob("*")] == ["images", "good.jpg"]
    assert not [p for p in tmp_path.rglob("ESCAPED*")] and sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_from_urls_refuses_a_list_without_http_urls(tmp_path, capsys):
    photo = sorted((COCO / "val2017").glob("*.jpg"))[0]
    url_list = tmp_path / "urls.csv"
    url_list.write_text(f"url,caption\n{photo.as_uri()},a local photo\nftp://127.0.0.1/x.jpg,ftp\n")
    line = run_data_command(["from-urls", "--url-list", str(url_list), "--out", str(tmp_path / "dl")], capsys)
    assert f"none of the 2 URLs is http or https, e.g. urls.csv row 1: {photo.as_uri()}" in line
    assert not (tmp_path / "dl").exists()


def test_opt_outs_are_set_and_a_users_value_kept(monkeypatch):
    for name in OPT_OUTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "true")  # the user's choice stands
    assert set_opt_outs() == {**OPT_OUTS, "WANDB_ERROR_REPORTING": "true"}
    assert os.environ["NO_ALBUMENTATIONS_UPDATE"] == "1" and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


@pytest.mark.slow
def test_no_update_check_when_a_data_command_imports_img2dataset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in OPT_OUTS and k not in ("WANDB_MODE", "DO_NOT_TRACK")}
    script = ("import json, os; import dtplib.data.download; from dtplib.common.extras import OPT_OUTS, "
              "optional_import; optional_import('img2dataset'); "
              "print(json.dumps({k: os.environ.get(k) for k in OPT_OUTS}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == OPT_OUTS  # in force in the process that imported it
    printed = (result.stdout + result.stderr).lower()
    assert "new version of albumentations" not in printed and "error fetching version info" not in printed
