"""Data layer on real components: Flickr8k and COCO files from ../shared/data, real webdataset shards, a real
img2dataset run against `python -m http.server` on 127.0.0.1, and the open_clip tokenizer and transforms."""

import csv
import io
import json
import os
import shutil
import socket
import tarfile
from collections import defaultdict
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from dtplib import data
from dtplib.utils import REPO_ROOT, SHARED_DATA

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

FLICKR = SHARED_DATA / "flickr8k"
COCO = SHARED_DATA / "coco-mini"
FLICKR_IMAGES = sorted((FLICKR / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(64, is_train=False)


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


def token_to_caption(tokenizer, captions):
    return {tuple(row.tolist()): c for row, c in zip(tokenizer(captions), captions, strict=True)}


def good_sample(i: int) -> dict:
    return {"__key__": f"good{i:03d}", "jpg": FLICKR_IMAGES[i].read_bytes(), "txt": f"good sample {i}"}


# ---------------------------------------------------------------------------------------------------------
# from-captions


def test_flickr8k_to_shards_counts_splits_and_captions(tmp_path):
    stats = data.from_captions(FLICKR / "images", FLICKR / "captions.tsv", tmp_path, val_size=1000,
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
    for split in data.SPLITS:
        samples = read_tars(sorted((tmp_path / split).glob("*.tar")))
        metas = [json.loads(s["json"]) for s in samples]
        by_split[split] = {m["source_id"] for m in metas}
        assert len(by_split[split]) == len(samples) == stats["splits"][split]["samples"]
        assert sum(json.loads((tmp_path / split / "sizes.json").read_text()).values()) == len(samples)
        for sample, meta in zip(samples, metas, strict=True):
            assert meta["captions"] == source[meta["source_id"]]  # read back identical, in file order
            assert sample["txt"].decode() == source[meta["source_id"]][0]
            assert sample["jpg"] == (FLICKR / "images" / meta["source_id"]).read_bytes()  # not re-encoded
    assert [len(by_split[s]) for s in data.SPLITS] == [6091, 1000, 1000]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert sum(len(ids) for ids in by_split.values()) == stats["samples_out"]
    assert json.loads((tmp_path / "stats.json").read_text())["samples_out"] == stats["samples_out"]


def test_split_is_seeded_and_by_count_or_fraction():
    paths = [f"img{i}.jpg" for i in range(100)]
    first = data.assign_splits(paths, 0.1, 20, seed=0)
    assert first == data.assign_splits(list(reversed(paths)), 0.1, 20, seed=0)
    assert first != data.assign_splits(paths, 0.1, 20, seed=1)
    counts = {s: list(first.values()).count(s) for s in data.SPLITS}
    assert counts == {"train": 70, "val": 10, "test": 20}
    with pytest.raises(ValueError, match="leave none"):
        data.assign_splits(paths, 50, 50, seed=0)


def test_coco_sample_resized_with_licences(tmp_path):
    stats = data.from_captions(COCO, COCO / "captions_all.json", tmp_path, image_size=96, shard_size=100)
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
    entries = data.read_captions(kaggle)
    assert entries["a.jpg"].captions == ["A dog, running.", 'A "quoted" cat']
    assert entries["b.jpg"].captions == ["Two birds"]

    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tFirst caption .\na.jpg#1\tSecond \"caption\" .\n")
    assert data.read_captions(token)["a.jpg"].captions == ["First caption .", 'Second "caption" .']

    coco = data.read_captions(COCO / "annotations" / "captions_val2017.json")
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
        data.from_captions(tmp_path / "nope", captions, out)
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        data.from_captions(small_folder, tmp_path / "nope.tsv", out)
    with pytest.raises(FileNotFoundError, match="none of the 2 images"):
        data.from_captions(small_folder, write_tsv(tmp_path / "x.tsv", [("x.jpg", "c"), ("y.jpg", "c")]), out)
    with pytest.raises(ValueError, match="no captions"):
        data.from_captions(small_folder, write_tsv(tmp_path / "empty.tsv", []), out)
    with pytest.raises(ValueError, match="no image has a non-empty caption"):
        data.from_captions(small_folder, write_tsv(tmp_path / "blank.tsv", [(names[0], "  ")]), out)
    partly_absent = write_tsv(tmp_path / "partly.tsv", [(names[0], "c"), ("absent.jpg", "c")])
    with pytest.raises(FileNotFoundError, match="1 images named .* are missing"):
        data.from_captions(small_folder, partly_absent, out, strict=True)
    assert not out.exists()  # nothing was written by any of the failed calls

    data.from_captions(small_folder, captions, out, val_size=0, test_size=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        data.from_captions(small_folder, captions, out)


def test_from_captions_skips_and_counts(tmp_path, small_folder):
    names = [p.name for p in FLICKR_IMAGES[:4]]
    (small_folder / "corrupt.jpg").write_bytes(names[0].encode() * 50)
    rows = [(names[0], "kept one"), (names[0], ""), (names[1], " "), (names[2], "kept two"),
            (names[3], "kept 3"), ("absent.jpg", "gone"), ("absent.jpg", "gone 2"), ("corrupt.jpg", "broken")]
    stats = data.from_captions(small_folder, write_tsv(tmp_path / "c.tsv", rows), tmp_path / "out",
                               val_size=0, test_size=0)
    assert stats["images_in"] == 6 and stats["pairs_in"] == 8
    assert stats["skipped"] == {"image_missing": 1, "no_caption": 1, "unreadable_image": 1}
    assert stats["captions_skipped"] == {"image_missing": 2, "empty_caption": 2, "unreadable_image": 1}
    assert stats["samples_out"] == 3 == stats["images_in"] - sum(stats["skipped"].values())
    assert stats["captions_out"] == 3 == stats["pairs_in"] - sum(stats["captions_skipped"].values())
    texts = sorted(s["txt"].decode() for s in read_tars((tmp_path / "out" / "train").glob("*.tar")))
    assert texts == ["kept 3", "kept one", "kept two"]


def test_loader_and_url_list_errors_before_work(tmp_path, preprocess, tokenizer):
    with pytest.raises(ValueError, match="empty shard list"):
        data.make_loader([], preprocess, tokenizer, 4)
    with pytest.raises(FileNotFoundError, match="2 of 2 shards do not exist"):
        data.make_loader(str(tmp_path / "{000000..000001}.tar"), preprocess, tokenizer, 4)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        data.make_loader(tmp_path, preprocess, tokenizer, 4)
    write_shard(tmp_path / "000000.tar", [good_sample(0)])
    with pytest.raises(ValueError, match="num_samples"):
        data.make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 4)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 workers"):
        data.make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 4, workers=2, num_samples=1)

    with pytest.raises(FileNotFoundError, match="url list not found"):
        data.from_urls(tmp_path / "nope.parquet", tmp_path / "dl")
    laion_like = tmp_path / "laion.csv"
    laion_like.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['url', 'caption'\].*URL"):
        data.from_urls(laion_like, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


# ---------------------------------------------------------------------------------------------------------
# from-urls: a real img2dataset run against a real local HTTP server


def test_from_urls_with_local_http_server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    good = sorted((COCO / "val2017").glob("*.jpg"))[:5]
    for path in good:
        shutil.copy(path, www / path.name)
    (www / "corrupt.jpg").write_bytes(b"this is not a JPEG " * 200)
    with data.serve_directory(www) as server:
        url_list = tmp_path / "urls.csv"
        with open(url_list, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            writer.writerows([(f"{server.url}/{p.name}", f"caption of {p.name}") for p in good])
            writer.writerow([f"{server.url}/missing.jpg", "a 404"])
            writer.writerow([f"{server.url}/corrupt.jpg", "a corrupt file"])
        summary = data.from_urls(url_list, tmp_path / "shards", image_size=64, processes=1, threads=4,
                                 shard_size=100, timeout=5)
        with pytest.raises(FileExistsError, match="already holds a download"):  # before any download
            data.from_urls(url_list, tmp_path / "shards")
        again = data.from_urls(url_list, tmp_path / "shards", image_size=64, processes=1, threads=4,
                               shard_size=100, timeout=5, overwrite=True)
        assert again["successes"] == summary["successes"]
        port = int(server.url.rsplit(":", 1)[1])
    assert server.process.poll() is not None  # the server is stopped
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    samples = read_tars(sorted((tmp_path / "shards").glob("*.tar")))
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["url"].rsplit("/", 1)[1] for m in metas) == [p.name for p in good]
    for sample, meta in zip(samples, metas, strict=True):
        assert sample["txt"].decode() == f"caption of {meta['url'].rsplit('/', 1)[1]}"
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert min(img.size) == 64
    assert (summary["count"], summary["successes"]) == (7, 5)
    assert (summary["failed_to_download"], summary["failed_to_resize"]) == (1, 1)
    reasons = " ".join(summary["failure_reasons"])
    assert "404" in reasons and "decoding" in reasons.lower()
    table = data.success_rate_table(tmp_path / "shards")
    assert table["count"].sum() == 7 and table.loc[table.outcome == "success", "count"].item() == 5
    with open(tmp_path / "shards" / "summary.csv") as f:
        total = [row for row in csv.DictReader(f) if row["shard"] == "total"][0]
    assert float(total["success_rate"]) == pytest.approx(5 / 7, abs=1e-3)
    assert data.dataset_size(data.expand_shards(str(tmp_path / "shards" / summary["shards"]))) == 5


# ---------------------------------------------------------------------------------------------------------
# make_loader


@pytest.fixture
def shards_with_bad_samples(tmp_path):
    """Two shards: 3 good + a truncated JPEG; 3 good + an image without caption + one with a blank caption."""
    truncated = FLICKR_IMAGES[10].read_bytes()
    truncated = truncated[: len(truncated) // 2]
    with pytest.raises(OSError):  # the bytes really are undecodable for PIL
        Image.open(io.BytesIO(truncated)).convert("RGB")
    write_shard(tmp_path / "000000.tar", [good_sample(0), good_sample(1),
                                          {"__key__": "truncated", "jpg": truncated, "txt": "truncated"},
                                          good_sample(2)])
    no_caption = {"__key__": "nocaption", "jpg": good_sample(4)["jpg"]}
    write_shard(tmp_path / "000001.tar", [good_sample(3), no_caption, good_sample(5),
                                          {**good_sample(6), "txt": "  "}, good_sample(7)])
    return str(tmp_path / "{000000..000001}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_good_samples_and_counts_bad_ones(shards_with_bad_samples, preprocess, tokenizer,
                                                        workers):
    good = [f"good sample {i}" for i in (0, 1, 2, 3, 5, 7)]
    lookup = token_to_caption(tokenizer, good)
    loader = data.make_loader(shards_with_bad_samples, preprocess, tokenizer, batch_size=4, workers=workers,
                              is_train=False)
    seen = []
    for images, tokens in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 64, 64)
        assert tokens.dtype == torch.long and tokens.shape == (len(images), 77)
        seen += [lookup[tuple(row.tolist())] for row in tokens]
    assert sorted(seen) == good
    assert loader.samples_seen == 6
    assert dict(loader.skipped) == {"undecodable_image": 1, "no_caption": 2}

    for _ in loader:  # a second epoch counts afresh
        pass
    assert sum(loader.skipped.values()) == 3


def test_training_loader_carries_skip_counts_from_workers(shards_with_bad_samples, preprocess, tokenizer):
    loader = data.make_loader(shards_with_bad_samples, preprocess, tokenizer, batch_size=2, workers=2,
                              num_samples=12)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(len(images) == 2 for images, _ in batches)
    assert loader.skipped["undecodable_image"] + loader.skipped["no_caption"] >= 3  # first passes' skips


def test_training_loader_splits_shards_across_ranks(tmp_path, preprocess, tokenizer, monkeypatch):
    captions = [f"shard {s} sample {i}" for s in range(4) for i in range(8)]
    for s in range(4):
        write_shard(tmp_path / f"{s:06d}.tar", [{**good_sample(8 * s + i), "txt": captions[8 * s + i]}
                                                for i in range(8)])
    urls = str(tmp_path / "{000000..000003}.tar")
    lookup = token_to_caption(tokenizer, captions)

    def captions_of_rank(rank: int, epoch: int, resampled: bool = False, seed: int = 0) -> list[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = data.make_loader(urls, preprocess, tokenizer, batch_size=4, resampled=resampled, seed=seed,
                                  num_samples=32, epoch=epoch)
        assert len(loader) == 4  # 32 samples / (4 per batch x 2 ranks)
        return [lookup[tuple(row.tolist())] for _, tokens in loader for row in tokens]

    for epoch in (0, 1):
        rank0, rank1 = captions_of_rank(0, epoch), captions_of_rank(1, epoch)
        assert len(rank0) == len(rank1) == 16
        assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == sorted(captions)
    assert captions_of_rank(0, 0) != captions_of_rank(0, 1)  # a new epoch reshuffles

    resampled0, resampled1 = captions_of_rank(0, 0, resampled=True), captions_of_rank(1, 0, resampled=True)
    assert resampled0 != resampled1  # each rank draws its own shards
    assert resampled0 == captions_of_rank(0, 0, resampled=True)  # ...reproducibly from the seed
    assert resampled0 != captions_of_rank(0, 0, resampled=True, seed=1)


def test_random_caption_choice_uses_all_json_captions(tmp_path, preprocess, tokenizer):
    options = ["a red car", "a parked car", "a car on a street"]
    write_shard(tmp_path / "000000.tar", [{**good_sample(i), "txt": options[0],
                                           "json": json.dumps({"captions": options})} for i in range(30)])
    lookup = token_to_caption(tokenizer, options)
    picked = {caption: 0 for caption in options}
    for _, tokens in data.make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 8, is_train=False):
        for row in tokens:
            picked[lookup[tuple(row.tolist())]] += 1
    assert all(count > 0 for count in picked.values()) and sum(picked.values()) == 30
    txt_only = data.make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 8, is_train=False,
                                caption_choice="txt")
    assert {lookup[tuple(row.tolist())] for _, tokens in txt_only for row in tokens} == {options[0]}


# ---------------------------------------------------------------------------------------------------------
# The embedded sample, the benchmark command and the notebook


def test_embedded_sample(tmp_path, preprocess, tokenizer):
    sample = REPO_ROOT / "data" / "sample"
    assert sum(p.stat().st_size for p in sample.rglob("*") if p.is_file()) <= 5 * 1024 * 1024
    stats = json.loads((sample / "stats.json").read_text())
    assert stats["samples_out"] == stats["images_in"] - sum(stats["skipped"].values()) == 239
    tars = sorted(sample.glob("*/*.tar"))
    assert len(read_tars(tars)) == 239
    with open(sample / "LICENSES.tsv", encoding="utf-8") as f:
        licences = list(csv.DictReader(f, delimiter="\t"))
    assert len(licences) == 239 and all(row["license"] and row["flickr_url"] for row in licences)

    loader = data.make_loader(data.split_shards(sample, "val"), preprocess, tokenizer, 16, is_train=False)
    assert sum(len(images) for images, _ in loader) == stats["splits"]["val"]["samples"]
    assert not loader.skipped

    images, captions = data.unpack_shards(data.split_shards(sample, "test"), tmp_path / "unpacked")
    again = data.from_captions(images, captions, tmp_path / "again", val_size=0, test_size=0)
    assert again["captions_out"] == stats["splits"]["test"]["captions"]


def test_bench_command_appends_a_results_row(tmp_path, capsys):
    out_csv = tmp_path / "bench.csv"
    for workers in (0, 1):
        data.main(["bench", data.split_shards(data.SAMPLE_DIR, "train"), "--workers", str(workers),
                   "--batch-size", "16", "--image-size", "64", "--warmup", "2", "--csv", str(out_csv)])
    assert "images/s" in capsys.readouterr().out
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [row["workers"] for row in rows] == ["0", "1"]
    assert all(float(row["images_per_s"]) > 0 and row["hardware"] and row["batch_size"] == "16"
               for row in rows)
