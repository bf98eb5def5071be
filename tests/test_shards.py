"""Shard writing on real components: Flickr8k and COCO files from DTPLIB_DATA to real webdataset shards, read back
with tarfile alone; caption file formats; bad input caught before work or skipped and counted."""

import csv
import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image
from shard_io import COCO, FLICKR, FLICKR_IMAGES, read_tars

from dtplib.data.shards import SPLITS, assign_splits, from_captions, read_captions

# ---------------------------------------------------------------------------------------------------------
# from-captions


@pytest.mark.slow
def test_flickr8k_to_shards_counts_splits_and_captions(tmp_path):
    stats = from_captions(FLICKR / "images", FLICKR / "captions.tsv", tmp_path, val_size=1000,
                          test_size=1000, shard_size=1000, processes=2)

    with open(FLICKR / "captions.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]  # first line is a header
    source = defaultdict(list)
    for image, caption in rows:
        source[image].append(caption)
    assert stats["pairs_in"] == len(rows) == 40455
    assert stats["images_in"] == len(source) == 8091
    assert stats["samples_out"] == stats["images_in"] - sum(stats["skipped"].values())
    assert stats["captions_out"] == stats["pairs_in"] - sum(stats["captions_skipped"].values())

    by_split = {}
    for split in SPLITS:
        samples = read_tars(sorted((tmp_path / split).glob("*.tar")))
        metas = [json.loads(s["json"]) for s in samples]
        by_split[split] = {m["source_id"] for m in metas}
        assert len(by_split[split]) == len(samples) == stats["splits"][split]["samples"]
        assert sum(json.loads((tmp_path / split / "sizes.json").read_text()).values()) == len(samples)
        for sample, meta in zip(samples, metas, strict=True):
            assert meta["captions"] == source[meta["source_id"]]  # read back identical, in file order
            assert sample["txt"].decode() == source[meta["source_id"]][0]
            assert sample["jpg"] == (FLICKR / "images" / meta["source_id"]).read_bytes()  # not re-encoded
    assert [len(by_split[s]) for s in SPLITS] == [6091, 1000, 1000]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert sum(len(ids) for ids in by_split.values()) == stats["samples_out"]
    assert json.loads((tmp_path / "stats.json").read_text())["samples_out"] == stats["samples_out"]


def test_split_is_seeded_and_by_count_or_fraction():
    paths = [f"img{i}.jpg" for i in range(100)]
    first = assign_splits(paths, 0.1, 20, seed=0)
    assert first == assign_splits(list(reversed(paths)), 0.1, 20, seed=0)
    assert first != assign_splits(paths, 0.1, 20, seed=1)
    counts = {s: list(first.values()).count(s) for s in SPLITS}
    assert counts == {"train": 70, "val": 10, "test": 20}
    with pytest.raises(ValueError, match="leave none"):
        assign_splits(paths, 50, 50, seed=0)


def test_coco_sample_resized_with_licences(tmp_path):
    stats = from_captions(COCO, COCO / "captions_all.json", tmp_path, image_size=96, shard_size=100)
    assert stats["samples_out"] == stats["images_in"] == 239
    assert stats["captions_out"] == stats["pairs_in"] == 1195
    samples = read_tars(sorted(tmp_path.glob("*/*.tar")))
    assert len(samples) == 239
    for sample in samples[:20]:
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert min(img.size) == 96
    with open(tmp_path / "LICENSES.tsv", encoding="utf-8") as f:
        licences = list(csv.DictReader(f, delimiter="\t"))
    assert len(licences) == 239
    assert all(row["license"] and row["flickr_url"].startswith("http") for row in licences)


def test_caption_file_formats(tmp_path):
    kaggle = tmp_path / "captions.txt"
    kaggle.write_text('image,caption\na.jpg,"A dog, running."\na.jpg,A "quoted" cat\nb.jpg,Two birds\n')
    entries = read_captions(kaggle)
    assert entries["a.jpg"].captions == ["A dog, running.", 'A "quoted" cat']
    assert entries["b.jpg"].captions == ["Two birds"]

    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tFirst caption .\na.jpg#1\tSecond \"caption\" .\n")
    assert read_captions(token)["a.jpg"].captions == ["First caption .", 'Second "caption" .']

    coco = read_captions(COCO / "annotations" / "captions_val2017.json")
    assert len(coco) == 79
    assert all(len(e.captions) >= 5 and e.meta["license"] for e in coco.values())


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before work, or skip-and-count as documented


@pytest.fixture
def small_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in FLICKR_IMAGES[:4]:
        shutil.copy(path, images / path.name)
    return images


def write_tsv(path: Path, rows) -> Path:
    path.write_text("image\tcaption\n" + "".join(f"{i}\t{c}\n" for i, c in rows))
    return path


def test_from_captions_errors_before_work(tmp_path, small_folder):
    names = [p.name for p in FLICKR_IMAGES[:4]]
    captions = write_tsv(tmp_path / "c.tsv", [(n, "a caption") for n in names])
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        from_captions(tmp_path / "nope", captions, out)
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        from_captions(small_folder, tmp_path / "nope.tsv", out)
    with pytest.raises(FileNotFoundError, match="none of the 2 images"):
        from_captions(small_folder, write_tsv(tmp_path / "x.tsv", [("x.jpg", "c"), ("y.jpg", "c")]), out)
    with pytest.raises(ValueError, match="no captions"):
        from_captions(small_folder, write_tsv(tmp_path / "empty.tsv", []), out)
    with pytest.raises(ValueError, match="no image has a non-empty caption"):
        from_captions(small_folder, write_tsv(tmp_path / "blank.tsv", [(names[0], "  ")]), out)
    partly_absent = write_tsv(tmp_path / "partly.tsv", [(names[0], "c"), ("absent.jpg", "c")])
    with pytest.raises(FileNotFoundError, match="1 images named .* are missing"):
        from_captions(small_folder, partly_absent, out, strict=True)
    assert not out.exists()  # nothing was written by any of the failed calls

    from_captions(small_folder, captions, out, val_size=0, test_size=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        from_captions(small_folder, captions, out)


def test_from_captions_skips_and_counts(tmp_path, small_folder):
    names = [p.name for p in FLICKR_IMAGES[:4]]
    (small_folder / "corrupt.jpg").write_bytes(names[0].encode() * 50)
    rows = [(names[0], "kept one"), (names[0], ""), (names[1], " "), (names[2], "kept two"),
            (names[3], "kept 3"), ("absent.jpg", "gone"), ("absent.jpg", "gone 2"), ("corrupt.jpg", "broken")]
    stats = from_captions(small_folder, write_tsv(tmp_path / "c.tsv", rows), tmp_path / "out",
                          val_size=0, test_size=0)
    assert stats["images_in"] == 6 and stats["pairs_in"] == 8
    assert stats["skipped"] == {"image_missing": 1, "no_caption": 1, "unreadable_image": 1}
    assert stats["captions_skipped"] == {"image_missing": 2, "empty_caption": 2, "unreadable_image": 1}
    assert stats["samples_out"] == 3 == stats["images_in"] - sum(stats["skipped"].values())
    assert stats["captions_out"] == 3 == stats["pairs_in"] - sum(stats["captions_skipped"].values())
    texts = sorted(s["txt"].decode() for s in read_tars((tmp_path / "out" / "train").glob("*.tar")))
    assert texts == ["kept 3", "kept one", "kept two"]
