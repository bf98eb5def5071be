"""The loader on real components: real webdataset shards (Flickr8k photos from DTPLIB_DATA, corrupt samples on
purpose), the open_clip tokenizer and transforms, several workers and ranks; and the embedded sample."""

import csv
import io
import json

import open_clip
import pytest
import torch
from PIL import Image
from shard_io import FLICKR_IMAGES, read_tars, write_shard

from dtplib.common.paths import REPO_ROOT
from dtplib.data.loader import iter_samples, make_loader
from dtplib.data.shards import from_captions, split_shards, unpack_shards


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(64, is_train=False)


def token_to_caption(tokenizer, captions):
    return {tuple(row.tolist()): c for row, c in zip(tokenizer(captions), captions, strict=True)}


def good_sample(i: int) -> dict:
    return {"__key__": f"good{i:03d}", "jpg": FLICKR_IMAGES[i].read_bytes(), "txt": f"good sample {i}"}


# ---------------------------------------------------------------------------------------------------------
# make_loader


def test_loader_errors_before_work(tmp_path, preprocess, tokenizer):
    with pytest.raises(ValueError, match="empty shard list"):
        make_loader([], preprocess, tokenizer, 4)
    with pytest.raises(FileNotFoundError, match="2 of 2 shards do not exist"):
        make_loader(str(tmp_path / "{000000..000001}.tar"), preprocess, tokenizer, 4)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        make_loader(tmp_path, preprocess, tokenizer, 4)
    write_shard(tmp_path / "000000.tar", [good_sample(0)])
    with pytest.raises(ValueError, match="num_samples"):
        make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 4)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 workers"):
        make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 4, workers=2, num_samples=1)


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
    loader = make_loader(shards_with_bad_samples, preprocess, tokenizer, batch_size=4, workers=workers,
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
    loader = make_loader(shards_with_bad_samples, preprocess, tokenizer, batch_size=2, workers=2,
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
        loader = make_loader(urls, preprocess, tokenizer, batch_size=4, resampled=resampled, seed=seed,
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
    for _, tokens in make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 8, is_train=False):
        for row in tokens:
            picked[lookup[tuple(row.tolist())]] += 1
    assert all(count > 0 for count in picked.values()) and sum(picked.values()) == 30
    txt_only = make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 8, is_train=False,
                           caption_choice="txt")
    assert {lookup[tuple(row.tolist())] for _, tokens in txt_only for row in tokens} == {options[0]}


def test_iter_samples_decodes_images_and_passes_over_undecodable_ones(tmp_path, shards_with_bad_samples):
    samples = list(iter_samples(shards_with_bad_samples))
    assert [s["key"] for s in samples] == ["good000", "good001", "good002", "good003", "nocaption", "good005",
                                           "good006", "good007"]  # all but the truncated JPEG, in shard order
    with Image.open(FLICKR_IMAGES[0]) as source:
        assert samples[0]["image"].mode == "RGB" and samples[0]["image"].size == source.size
    assert samples[0]["captions"] == ["good sample 0"] and samples[0]["meta"] == {}
    assert [s["key"] for s in iter_samples(shards_with_bad_samples, limit=3)] == ["good000", "good001", "good002"]

    png = io.BytesIO()
    with Image.open(FLICKR_IMAGES[1]) as source:
        source.convert("L").save(png, "PNG")
    write_shard(tmp_path / "png.tar", [{"__key__": "png", "png": png.getvalue(),
                                        "json": json.dumps({"captions": ["one", "two"]})}])
    (sample,) = iter_samples(str(tmp_path / "png.tar"))
    assert sample["image"].mode == "RGB" and sample["captions"] == ["one", "two"]


# ---------------------------------------------------------------------------------------------------------
# The embedded sample


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

    loader = make_loader(split_shards(sample, "val"), preprocess, tokenizer, 16, is_train=False)
    assert sum(len(images) for images, _ in loader) == stats["splits"]["val"]["samples"]
    assert not loader.skipped

    images, captions = unpack_shards(split_shards(sample, "test"), tmp_path / "unpacked")
    again = from_captions(images, captions, tmp_path / "again", val_size=0, test_size=0)
    assert again["captions_out"] == stats["splits"]["test"]["captions"]



@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_counts_its_lost_samples(tmp_path, preprocess, tokenizer, workers):
    """A shard cut at 40% of its bytes: the samples it declared in sizes.json but never gave are estimated."""
    write_shard(tmp_path / "000000.tar", [good_sample(i) for i in range(10)])
    write_shard(tmp_path / "000001.tar", [good_sample(i) for i in range(10, 13)])
    (tmp_path / "sizes.json").write_text(json.dumps({"000000.tar": 10, "000001.tar": 3}))
    data = (tmp_path / "000000.tar").read_bytes()
    (tmp_path / "000000.tar").write_bytes(data[: int(len(data) * 0.4)])
    loader = make_loader(str(tmp_path / "{000000..000001}.tar"), preprocess, tokenizer, batch_size=4,
                         workers=workers, is_train=False)
    assert sum(len(images) for images, _ in loader) == loader.samples_seen
    read_from_truncated = loader.samples_seen - 3
    assert 1 <= read_from_truncated <= 5
    assert loader.skipped["shard_error"] >= 1
    assert loader.skipped["lost_samples_estimate"] == 10 - read_from_truncated

    (tmp_path / "sizes.json").unlink()  # no declared sizes: errors are counted, no estimate is made
    loader = make_loader(str(tmp_path / "{000000..000001}.tar"), preprocess, tokenizer, batch_size=4,
                         is_train=False)
    list(loader)
    assert loader.skipped["shard_error"] >= 1 and "lost_samples_estimate" not in loader.skipped


def test_empty_shard_is_named_as_such(tmp_path, preprocess, tokenizer):
    """An empty tar whose sizes.json says 0: the error says so, not that there is no sizes.json."""
    import tarfile

    tarfile.open(tmp_path / "000000.tar", "w").close()
    (tmp_path / "sizes.json").write_text(json.dumps({"000000.tar": 0}))
    with pytest.raises(ValueError, match=r"000000\.tar.*no samples") as error:
        make_loader(str(tmp_path / "000000.tar"), preprocess, tokenizer, 4)
    assert "no sizes.json" not in str(error.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_without_a_full_batch_names_the_shards_and_advises_what_helps(tmp_path, preprocess, tokenizer,
                                                                            workers):
    """Two shards of 3 good photos, batch 8: no worker ever fills a batch. The error names the shards and suggests
    fewer workers only where there are several."""
    for index in range(2):
        write_shard(tmp_path / f"00000{index}.tar", [good_sample(3 * index + i) for i in range(3)])
    loader = make_loader(str(tmp_path / "{000000..000001}.tar"), preprocess, tokenizer, 8, workers=workers,
                         num_samples=16, is_train=True)
    with pytest.raises(RuntimeError, match="no full batch of 8") as error:
        next(iter(loader))
    message = str(error.value)
    assert "000000.tar ..." in message and "a smaller batch" in message
    assert ("fewer workers" in message) == (workers > 1)
