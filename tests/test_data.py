"""The command line `python -m dtplib.data` on real components: shards from Flickr8k photos (DTPLIB_DATA), and
the loader benchmark over the embedded sample."""

import csv
import json
import shutil

import pytest
from shard_io import FLICKR_IMAGES, read_tars

from dtplib.data import cli
from dtplib.data.shards import SAMPLE_DIR, split_shards


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
