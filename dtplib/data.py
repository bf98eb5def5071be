"""Image-caption data: local folders and URL lists to webdataset shards, and a robust, DDP-aware loader.

Read top to bottom:
1. `from_captions`: an image folder + captions file (Flickr8k tsv, COCO json) -> seeded train/val/test shards.
2. `from_urls`: a LAION-style URL list -> img2dataset -> shards, plus a success-rate summary.
3. `make_loader`: shards -> (images, tokens) batches; corrupt samples are skipped and counted, never raised.
4. `bench`, plots and small helpers for the notebook; `python -m dtplib.data -h` for the command line.

Every shard sample holds `jpg`, `txt` (one caption) and `json` (source id, all captions, split, licence).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from dtplib.utils import REPO_ROOT, atomic_write_text, run_info

log = logging.getLogger(__name__)

SAMPLE_DIR = REPO_ROOT / "data" / "sample"  # embedded COCO sample: split shards, stats.json, LICENSES.tsv
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # sample fields the loader reads an image from, first found wins
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL on bad bytes


# ----------------------------------------------------------------------------------------------------------
# 1. Local image folder + captions file -> shards


@dataclass
class CaptionedImage:
    """One source image (path relative to the images folder), all its captions, any licence metadata."""

    path: str
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def read_captions(captions_file: str | Path) -> dict[str, CaptionedImage]:
    """Parse a captions file into {image path: CaptionedImage}, sorted by path.

    Formats: a table of image<TAB>caption (Flickr8k captions.tsv; a header line and Flickr8k.token.txt's
    "#n" suffixes are handled) or image,caption (Kaggle captions.txt); COCO captions_*.json; coco-mini's
    captions_all.json ({"images": {path: {captions, license, flickr_url}}}). Empty captions are kept here:
    `from_captions` skips and counts them.
    """
    path = Path(captions_file)
    entries = _read_coco_json(path) if path.suffix == ".json" else _read_caption_table(path)
    if not entries:
        raise ValueError(f"{path}: no captions (expected image<TAB>caption lines or COCO captions json)")
    return dict(sorted(entries.items()))


def _read_caption_table(path: Path) -> dict[str, CaptionedImage]:
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines[0] if lines else ""
    if "\t" in first:
        rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)  # captions hold quotes: keep them
    elif "," in first:
        rows = csv.reader(lines)
    else:
        raise ValueError(f"{path}: first line {first[:80]!r} is neither image<TAB>caption nor image,caption")
    entries: dict[str, CaptionedImage] = {}
    for line_number, row in enumerate(rows, start=1):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{line_number}: expected image, caption; got {len(row)} fields: {row!r}")
        image = row[0].strip().split("#")[0]
        if line_number == 1 and not image.lower().endswith(IMAGE_EXTENSIONS):
            continue  # a header such as "image<TAB>caption"
        entries.setdefault(image, CaptionedImage(image)).captions.append(row[1])
    return entries


def _read_coco_json(path: Path) -> dict[str, CaptionedImage]:
    data = json.loads(path.read_text(encoding="utf-8"))
    images = data.get("images") if isinstance(data, dict) else None
    licenses = {lic["id"]: lic for lic in data.get("licenses", [])} if isinstance(data, dict) else {}
    if isinstance(images, list) and "annotations" in data:  # official COCO: images[] + annotations[]
        by_id = {img["id"]: CaptionedImage(img["file_name"], [], _coco_meta(img, licenses)) for img in images}
        for annotation in data["annotations"]:
            if annotation["image_id"] in by_id:
                by_id[annotation["image_id"]].captions.append(annotation["caption"])
        return {entry.path: entry for entry in by_id.values()}
    if isinstance(images, dict):  # coco-mini captions_all.json: {"<folder>/<file>": {captions, license, ...}}
        return {p: CaptionedImage(p, list(rec.get("captions", [])), _coco_meta(rec, licenses))
                for p, rec in images.items()}
    raise ValueError(f"{path}: not COCO captions json ('images' and 'annotations', or an images dict)")


def _coco_meta(record: dict, licenses: dict) -> dict:
    """Licence and provenance fields worth carrying into each sample's json and LICENSES.tsv."""
    license_info = licenses.get(record.get("license"), {})
    meta = {
        "image_id": record.get("id", record.get("image_id")),
        "license": license_info.get("name"),
        "license_url": license_info.get("url"),
        "flickr_url": record.get("flickr_url"),
    }
    return {k: v for k, v in meta.items() if v is not None}


def assign_splits(paths: Sequence[str], val_size: float, test_size: float, seed: int) -> dict[str, str]:
    """Fixed, seeded split by image: {path: "train" | "val" | "test"}.

    A size below 1 is a fraction of the images, 1 or more a count (Flickr8k's usual split: 1000 and 1000).
    The split depends only on the sorted paths and the seed, not on which images later turn out unreadable.
    """
    def count(size: float) -> int:
        return round(size * len(paths)) if size < 1 else int(size)

    n_val, n_test = count(val_size), count(test_size)
    if n_val < 0 or n_test < 0 or n_val + n_test >= len(paths):
        raise ValueError(f"val {n_val} + test {n_test} images leave none of {len(paths)} for training")
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    split_of = {p: "test" for p in order[:n_test]} | {p: "val" for p in order[n_test:n_test + n_val]}
    return split_of | {p: "train" for p in order[n_test + n_val:]}


def sample_key(path: str) -> str:
    """Webdataset key for an image path: no slashes and no dots (webdataset splits off extensions there)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(path).with_suffix("")))


def encode_image(path: str | Path, image_size: int = 0, quality: int = 90) -> tuple[bytes, int, int]:
    """Fully decode an image (so a corrupt file fails here, not in a training run) and return JPEG bytes.

    A JPEG that needs no resize is kept byte for byte; otherwise the shorter side is shrunk to `image_size`
    (never enlarged; 0 keeps the size) and the image re-encoded. Raises one of DECODE_ERRORS on a bad file.
    """
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        needs_resize = image_size > 0 and min(img.size) > image_size
        if img.format == "JPEG" and not needs_resize:
            return data, img.width, img.height
        img = img.convert("RGB")
        if needs_resize:
            scale = image_size / min(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue(), img.width, img.height


def _encode_job(job: tuple[str, int, int]) -> tuple[bytes | None, int, int, str | None]:
    """Pool worker: encode_image, with a decode failure returned as a message instead of raised."""
    try:
        return (*encode_image(*job), None)
    except DECODE_ERRORS as exn:
        return None, 0, 0, repr(exn)


def from_captions(images: str | Path, captions: str | Path, out: str | Path, *, image_size: int = 0,
                  encode_quality: int = 90, shard_size: int = 1000, val_size: float = 0.1,
                  test_size: float = 0.1, seed: int = 0, processes: int = 1, limit: int | None = None,
                  strict: bool = False, overwrite: bool = False) -> dict:
    """Write shards OUT/{train,val,test}/NNNNNN.tar (one sample per image) plus sizes.json, stats.json and,
    when the source names licences (COCO), LICENSES.tsv. Returns the stats.

    Errors before any image is read: missing folder or captions file, no captions at all, none of the named
    images present, a non-empty OUT without `overwrite`. Skipped and counted (stats.json): images named but
    absent (an error with `strict`), empty captions, images left without any caption, undecodable images.
    Counts add up: samples_out = images_in - sum(skipped), captions_out = pairs_in - sum(captions_skipped).
    `limit` keeps the first N images by path (for quick runs).
    """
    images, captions, out = Path(images), Path(captions), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"images folder not found: {images}")
    if not captions.is_file():
        raise FileNotFoundError(f"captions file not found: {captions}")
    entries = read_captions(captions)
    if limit:
        entries = dict(list(entries.items())[:limit])
    missing = [p for p in entries if not (images / p).is_file()]
    if len(missing) == len(entries):
        raise FileNotFoundError(f"none of the {len(entries)} images named in {captions} exist under {images} "
                                f"(first: {missing[0]!r}); is --images the folder the names are relative to?")
    if missing and strict:
        raise FileNotFoundError(f"{len(missing)} images named in {captions} are missing under {images}, "
                                f"e.g. {missing[:3]}")
    keys = {p: sample_key(p) for p in entries}
    if len(set(keys.values())) < len(keys):
        clash = Counter(keys.values()).most_common(1)[0][0]
        raise ValueError(f"two images map to the same sample key {clash!r} (same name, different extension?)")
    split_of = assign_splits(list(entries), val_size, test_size, seed)

    image_skips, caption_skips, examples = Counter(), Counter(), {}

    def skip(entry: CaptionedImage, reason: str, n_captions: int) -> None:
        image_skips[reason] += 1
        caption_skips[reason] += n_captions
        examples.setdefault(reason, [])
        if len(examples[reason]) < 5:
            examples[reason].append(entry.path)

    missing = set(missing)
    jobs: list[tuple[CaptionedImage, list[str]]] = []
    for path in split_of:  # in the split's seeded order, so each split's shards come out shuffled
        entry = entries[path]
        kept = [c.strip() for c in entry.captions if c.strip()]
        if path in missing:
            skip(entry, "image_missing", len(entry.captions))
            continue
        caption_skips["empty_caption"] += len(entry.captions) - len(kept)
        if not kept:
            skip(entry, "no_caption", 0)
            continue
        jobs.append((entry, kept))
    if not jobs:
        raise ValueError(f"{captions}: no image has a non-empty caption")
    _prepare_out_dir(out, overwrite)

    writers: dict[str, wds.ShardWriter] = {}
    sizes: dict[str, dict[str, int]] = {split: Counter() for split in SPLITS}
    captions_out: Counter = Counter()
    licence_rows = []
    encode_args = [(str(images / entry.path), image_size, encode_quality) for entry, _ in jobs]
    with contextlib.ExitStack() as stack:
        if processes > 1:
            pool = stack.enter_context(mp.Pool(processes))
            encoded = pool.imap(_encode_job, encode_args, chunksize=16)
        else:
            encoded = map(_encode_job, encode_args)
        progress = tqdm(zip(jobs, encoded, strict=True), total=len(jobs), desc="shards", disable=None)
        for (entry, kept), (jpg, width, height, error) in progress:
            if error is not None:
                skip(entry, "unreadable_image", len(kept))
                log.warning("skipping %s: %s", entry.path, error)
                continue
            split = split_of[entry.path]
            if split not in writers:
                (out / split).mkdir(parents=True, exist_ok=True)
                writers[split] = stack.enter_context(
                    wds.ShardWriter(str(out / split / "%06d.tar"), maxcount=shard_size, verbose=0, mtime=0))
            meta = {"source_id": entry.path, "captions": kept, "split": split, "width": width,
                    "height": height, **entry.meta}
            writers[split].write({"__key__": keys[entry.path], "jpg": jpg, "txt": kept[0].encode(),
                                  "json": json.dumps(meta).encode()})
            sizes[split][Path(writers[split].fname).name] += 1
            captions_out[split] += len(kept)
            if "license" in entry.meta:
                licence_rows.append([keys[entry.path], split, entry.path, entry.meta.get("image_id", ""),
                                     entry.meta["license"], entry.meta.get("license_url", ""),
                                     entry.meta.get("flickr_url", "")])

    for split, split_sizes in sizes.items():
        if split_sizes:
            atomic_write_text(out / split / "sizes.json", json.dumps(dict(sorted(split_sizes.items()))))
    if licence_rows:
        header = ["key", "split", "source_id", "image_id", "license", "license_url", "flickr_url"]
        lines = ["\t".join(map(str, row)) for row in [header, *sorted(licence_rows)]]
        atomic_write_text(out / "LICENSES.tsv", "\n".join(lines) + "\n")
    stats = {
        "source": {"images": str(images), "captions": str(captions)},
        "options": {"image_size": image_size, "encode_quality": encode_quality, "shard_size": shard_size,
                    "val_size": val_size, "test_size": test_size, "seed": seed, "limit": limit},
        "images_in": len(entries),
        "pairs_in": sum(len(e.captions) for e in entries.values()),
        "samples_out": sum(sum(s.values()) for s in sizes.values()),
        "captions_out": sum(captions_out.values()),
        "skipped": dict(image_skips),
        "captions_skipped": {k: v for k, v in caption_skips.items() if v},
        "skipped_examples": examples,
        "splits": {split: {"samples": sum(sizes[split].values()), "captions": captions_out[split],
                           "shards": f"{split}/{_brace(sorted(sizes[split]))}"}
                   for split in SPLITS if sizes[split]},
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1))
    return stats


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones; with `overwrite`, remove only what from_captions writes."""
    _replace_outputs(out, (*SPLITS, "stats.json", "LICENSES.tsv"), overwrite, "shards")
    out.mkdir(parents=True, exist_ok=True)


def _replace_outputs(out: Path, patterns: Sequence[str], overwrite: bool, what: str) -> None:
    """Raise if `out` holds files matching `patterns` (a previous run's output), or remove them with
    `overwrite`; anything else in the folder is left alone."""
    existing = [p for pattern in patterns for p in out.glob(pattern)] if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {what} ({existing[0].name}); pass --overwrite to replace")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _brace(names: Sequence[str]) -> str:
    """["000000.tar", "000001.tar", "000002.tar"] -> "{000000..000002}.tar" (names are contiguous numbers)."""
    first, last = Path(names[0]), Path(names[-1])
    return first.name if len(names) == 1 else f"{{{first.stem}..{last.stem}}}{first.suffix}"


def split_shards(out: str | Path, split: str = "train") -> str:
    """Brace pattern of a split's shards from from_captions, e.g. "data/sample/train/{000000..000001}.tar"."""
    stats_file = Path(out) / "stats.json"
    if not stats_file.is_file():
        raise FileNotFoundError(f"no stats.json in {out}: not a folder written by from-captions")
    splits = json.loads(stats_file.read_text())["splits"]
    if split not in splits:
        raise ValueError(f"{out} has no {split!r} split (has {sorted(splits)})")
    return str(Path(out) / splits[split]["shards"])


# ----------------------------------------------------------------------------------------------------------
# 2. URL list -> img2dataset -> shards


def from_urls(url_list: str | Path, out: str | Path, *, url_col: str = "url", caption_col: str = "caption",
              input_format: str | None = None, image_size: int = 256, resize_mode: str = "keep_ratio",
              processes: int = 2, threads: int = 32, shard_size: int = 10000, timeout: int = 10,
              retries: int = 0, extra_columns: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Download a URL list (a parquet/csv/tsv file, or a folder of them) into webdataset shards with
    img2dataset, then write OUT/summary.{csv,json} and OUT/sizes.json from its per-shard stats; returns
    the summary.

    Only images that downloaded and decoded end up in the shards (jpg, txt, img2dataset's json with url and
    caption). The url list and its columns are checked before anything is downloaded. LAION-400M metadata:
    url_col="URL", caption_col="TEXT", input_format="parquet".
    """
    url_list, out = Path(url_list), Path(out)
    table = _check_url_list(url_list, input_format, [url_col, caption_col, *(extra_columns or [])])
    _prepare_download_dir(out, overwrite)
    input_format = input_format or table.suffix.lstrip(".")
    os.environ.setdefault("WANDB_MODE", "disabled")  # img2dataset imports wandb at import time
    import img2dataset

    img2dataset.download(
        url_list=str(url_list), output_folder=str(out), output_format="webdataset", input_format=input_format,
        url_col=url_col, caption_col=caption_col, save_additional_columns=list(extra_columns or []) or None,
        image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=True,
        processes_count=processes, thread_count=threads, number_sample_per_shard=shard_size,
        timeout=timeout, retries=retries, extract_exif=False, distributor="multiprocessing",
        enable_wandb=False,
    )
    return summarize_downloads(out)


def _prepare_download_dir(out: Path, overwrite: bool) -> None:
    """Refuse to download into a folder that already holds a download (img2dataset would resume into it and
    trip on our summary files); with `overwrite`, remove only what img2dataset and from_urls write there."""
    _replace_outputs(out, ("*.tar", "*.parquet", "*_stats.json", "sizes.json", "summary.csv", "summary.json",
                           "_tmp"), overwrite, "a download")


def _check_url_list(url_list: Path, input_format: str | None, columns: Sequence[str]) -> Path:
    """Fail before downloading if the list is missing, of an unknown format, or lacks a named column.

    Returns the (first) table file that was checked."""
    if url_list.is_dir():
        tables = sorted(p for p in url_list.iterdir() if p.suffix in (".parquet", ".csv", ".tsv"))
        if input_format:
            tables = [p for p in tables if p.suffix == f".{input_format}"]
        if not tables:
            raise FileNotFoundError(f"no .parquet/.csv/.tsv url list in folder {url_list}")
        table = tables[0]
    elif url_list.is_file():
        table = url_list
    else:
        raise FileNotFoundError(f"url list not found: {url_list}")
    kind = input_format or table.suffix.lstrip(".")
    if kind == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(table).names
    elif kind in ("csv", "tsv"):
        with open(table, newline="", encoding="utf-8") as f:
            names = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), [])
    else:
        raise ValueError(f"{table}: unknown url list format {kind!r}; use parquet, csv or tsv")
    absent = [c for c in columns if c not in names]
    if absent:
        raise ValueError(f"{table}: no column(s) {absent} among {names[:20]}; pass --url-col/--caption-col "
                         "(LAION-400M metadata: --url-col URL --caption-col TEXT)")
    return table


def summarize_downloads(out: str | Path) -> dict:
    """Aggregate img2dataset's NNNNN_stats.json files: summary.csv (one row per shard and a total),
    summary.json (totals, success rate, failure reasons), sizes.json (successes per shard: make_loader)."""
    out = Path(out)
    stats_files = sorted(out.glob("*_stats.json"))
    if not stats_files:
        raise FileNotFoundError(f"no img2dataset *_stats.json in {out}")
    rows, reasons = [], Counter()
    for stats_file in stats_files:
        stats = json.loads(stats_file.read_text())
        rows.append({"shard": stats_file.name.removesuffix("_stats.json"), "count": stats["count"],
                     "successes": stats["successes"], "failed_to_download": stats["failed_to_download"],
                     "failed_to_resize": stats["failed_to_resize"],
                     "duration_s": round(stats["duration"], 3)})
        reasons.update({k: v for k, v in stats["status_dict"].items() if k != "success"})
    table = pd.DataFrame(rows)
    total = table.drop(columns="shard").sum().to_dict() | {"shard": "total"}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["success_rate"] = (table["successes"] / table["count"].clip(lower=1)).round(4)
    atomic_write_text(out / "summary.csv", table.to_csv(index=False))
    tars = [f"{row['shard']}.tar" for row in rows if (out / f"{row['shard']}.tar").is_file()]
    sizes = {f"{row['shard']}.tar": int(row["successes"]) for row in rows if f"{row['shard']}.tar" in tars}
    atomic_write_text(out / "sizes.json", json.dumps(sizes, indent=1))
    summary = {
        "count": int(total["count"]),
        "successes": int(total["successes"]),
        "failed_to_download": int(total["failed_to_download"]),
        "failed_to_resize": int(total["failed_to_resize"]),
        "success_rate": round(int(total["successes"]) / max(1, int(total["count"])), 4),
        "failure_reasons": dict(reasons.most_common()),
        "num_shards": len(tars),
        "shards": _brace(tars) if tars else None,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def success_rate_table(out: str | Path) -> pd.DataFrame:
    """One row per outcome of a from_urls run (success and each failure reason) with its count and share."""
    summary = json.loads((Path(out) / "summary.json").read_text())
    rows = [("success", summary["successes"])] + list(summary["failure_reasons"].items())
    table = pd.DataFrame(rows, columns=["outcome", "count"])
    table["share"] = (table["count"] / max(1, summary["count"])).round(4)
    return table


# ----------------------------------------------------------------------------------------------------------
# 3. Shards -> (images, tokens) batches


class SkipCounter:
    """Counts samples a loader process dropped, by reason.

    Worker processes cannot update a counter in the parent, so each batch carries (and clears) the counts
    gathered since the previous batch, and ShardLoader adds them up in the main process.
    """

    def __init__(self, log_first: int = 5):
        self.pending: Counter = Counter()
        self.log_first = log_first
        self.logged = 0

    def skip(self, reason: str, detail: str) -> None:
        self.pending[reason] += 1
        if self.logged < self.log_first:
            self.logged += 1
            log.warning("skipping sample (%s): %s", reason, detail)

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler for tar-level errors (unreadable or truncated shard): count, then carry on."""
        self.skip("shard_error", repr(exn))
        return True

    def drain(self) -> dict[str, int]:
        counts, self.pending = dict(self.pending), Counter()
        return counts


def _worker_seed(seed: int, epoch: mp.Value, salt: int = 0) -> int:
    """A seed distinct per rank, dataloader worker and epoch, and reproducible from `seed`."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return wds.utils.make_seed(seed, salt, epoch.value, rank, worker)


def _shuffled_shards(shards: Iterator[dict], seed: int, epoch: mp.Value) -> Iterator[dict]:
    """Shuffle the shard list the same way on every rank (seed + epoch), so split_by_node then deals disjoint
    shards to the ranks."""
    shards = list(shards)
    random.Random(seed * 100_003 + epoch.value).shuffle(shards)
    yield from shards


def _shuffled_samples(samples: Iterator[dict], seed: int, epoch: mp.Value, bufsize: int) -> Iterator[dict]:
    """Buffer-shuffle raw samples (bytes, before decoding, so the buffer stays small)."""
    rng = random.Random(_worker_seed(seed, epoch, salt=1))
    return wds.shuffle(bufsize, min(1000, bufsize), rng=rng)(samples)


def _pick_caption(sample: dict, caption_choice: str, rng: random.Random) -> str:
    """`random`: one of the json's captions (seeded RNG), falling back to txt; `txt`: always the txt field."""
    if caption_choice == "random" and "json" in sample:
        try:
            captions = json.loads(sample["json"]).get("captions", [])
            options = [c for c in captions if isinstance(c, str) and c.strip()]
        except (ValueError, AttributeError):
            options = []
        if options:
            return rng.choice(options).strip()
    return sample.get("txt", b"").decode("utf-8", "replace").strip()


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run per-sample transforms and batch collation with one intra-op thread, as DataLoader workers do.
    They gain nothing from more, and on small machines the thread pool's hand-offs can cost far more than the
    work (measured on 2 cores: 48 ms instead of 1 ms per 224px RandomResizedCrop, 500 ms instead of 25 ms to
    stack 64 images), which made workers=0 ten times slower than workers=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _decoded(samples: Iterator[dict], preprocess, caption_choice: str, counter: SkipCounter, seed: int,
             epoch: mp.Value) -> Iterator[tuple[torch.Tensor, str]]:
    """Raw samples -> (image 3 x H x W, caption). Samples without an image, without a caption or with bytes
    PIL cannot decode are counted in `counter` and dropped."""
    rng = random.Random(_worker_seed(seed, epoch, salt=2))
    for sample in samples:
        key = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image_field = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_field is None:
            counter.skip("no_image", key)
            continue
        caption = _pick_caption(sample, caption_choice, rng)
        if not caption:
            counter.skip("no_caption", key)
            continue
        try:
            with Image.open(io.BytesIO(sample[image_field])) as img:
                image = img.convert("RGB")
        except DECODE_ERRORS as exn:
            counter.skip("undecodable_image", f"{key}: {exn!r}")
            continue
        with _single_threaded():
            image = preprocess(image)  # 3 x H x W float
        yield image, caption


def _batches(pairs: Iterator[tuple[torch.Tensor, str]], batch_size: int, tokenizer, counter: SkipCounter,
             single_pass: bool) -> Iterator[tuple]:
    """(image, caption) pairs -> (images B x 3 x H x W, tokens B x context_length, skip counts).

    single_pass (evaluation): the last batch may be short, and a final (None, None, counts) hands over skips
    seen after it. Otherwise (training, fixed epoch length) short batches are dropped and pending counts ride
    on the next batch; a pass over this worker's shards that yields no batch at all raises, as it would loop.
    """
    def collate() -> tuple[torch.Tensor, torch.Tensor, dict]:
        with _single_threaded():
            return torch.stack(images), tokenizer(captions), counter.drain()  # B x 3 x H x W, B x 77

    images, captions, produced = [], [], 0
    for image, caption in pairs:
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            yield collate()
            images, captions, produced = [], [], produced + 1
    if single_pass:
        if images:
            yield collate()
        yield None, None, counter.drain()
    elif produced == 0:
        raise RuntimeError(f"a whole pass over this worker's shards gave no full batch of {batch_size} "
                           f"(skipped so far: {dict(counter.pending)}); use fewer workers or a smaller batch")


class ShardLoader:
    """Iterable over (images B x 3 x H x W, tokens B x context_length) batches.

    `skipped` holds this epoch's dropped samples by reason (no_image, no_caption, undecodable_image,
    shard_error), complete once the epoch's iteration ends; `samples_seen` the samples yielded. Call
    `set_epoch(epoch)` before each training epoch to reshuffle. `num_samples`/`num_batches` as in open_clip.
    """

    def __init__(self, dataloader: DataLoader, shared_epoch: mp.Value, num_samples: int | None,
                 num_batches: int | None):
        self.dataloader = dataloader
        self.shared_epoch = shared_epoch
        self.num_samples = num_samples
        self.num_batches = num_batches
        self.skipped: Counter = Counter()
        self.samples_seen = 0

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.value = epoch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("number of batches unknown: no sizes.json next to the shards and no num_samples")
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped, self.samples_seen = Counter(), 0
        for images, tokens, skipped in self.dataloader:
            self.skipped.update(skipped)
            if images is not None:
                self.samples_seen += len(images)
                yield images, tokens


def expand_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard list from brace notation ("dir/{000000..000009}.tar", lists joined by "::"), a list, or a folder
    (every .tar in it). Local shards must exist: a typo fails here, not in a worker mid-epoch."""
    if isinstance(urls, Path | str) and Path(urls).is_dir():
        shards = sorted(str(p) for p in Path(urls).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in folder {urls}")
        return shards
    shards = wds.shardlists.expand_urls(str(urls)) if isinstance(urls, Path | str) else [str(u) for u in urls]
    shards = [s for s in shards if s]
    if not shards:
        raise ValueError("empty shard list")
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]} "
                                "(shard lists use brace notation: dir/{000000..000009}.tar)")
    return shards


def dataset_size(shards: Sequence[str]) -> int | None:
    """Number of samples from the sizes.json next to the shards (written by from_captions and from_urls)."""
    total = 0
    for folder in {os.path.dirname(s) for s in shards}:
        sizes_file = Path(folder) / "sizes.json"
        if not sizes_file.is_file():
            return None
        sizes = json.loads(sizes_file.read_text())
        names = [os.path.basename(s) for s in shards if os.path.dirname(s) == folder]
        if any(name not in sizes for name in names):
            return None
        total += sum(sizes[name] for name in names)
    return total


def make_loader(urls: str | Path | Sequence[str], preprocess, tokenizer, batch_size: int, workers: int = 0,
                resampled: bool = False, seed: int = 0, *, is_train: bool = True,
                num_samples: int | None = None, epoch: int = 0, caption_choice: str = "random",
                shuffle_buffer: int = 5000, pin_memory: bool = False) -> ShardLoader:
    """A webdataset loader in the manner of open_clip_train's get_wds_dataset, yielding (images, tokens).

    Training (is_train): shards are shuffled per epoch with `seed` and dealt across ranks then dataloader
    workers (wds.split_by_node, split_by_worker), samples buffer-shuffled, and each worker yields a fixed
    number of full batches so that every rank sees the same count. With `resampled`, each rank and worker
    draws shards with replacement from its own seeded stream instead. The epoch size is `num_samples` or
    comes from sizes.json. Evaluation: every shard once, in order, split across workers on this process only
    (like open_clip, evaluate on one rank), the last batch short.
    Captions: caption_choice="random" picks one of the json's captions with a seeded RNG per rank, worker and
    epoch (falls back to txt); "txt" always uses txt. Corrupt samples: see SkipCounter / ShardLoader.skipped.
    """
    if caption_choice not in ("random", "txt"):
        raise ValueError(f"caption_choice must be 'random' or 'txt', not {caption_choice!r}")
    if resampled and not is_train:
        raise ValueError("resampled only makes sense for training (is_train=True)")
    shards = expand_shards(urls)
    _, world_size, _, _ = wds.utils.pytorch_worker_info()
    shared_epoch = mp.Value("i", epoch)
    counter = SkipCounter()
    if resampled:
        source = [wds.ResampledShards(shards, worker_seed=partial(_worker_seed, seed, shared_epoch),
                                      deterministic=True)]
    elif is_train:
        if len(shards) < max(1, workers) * world_size:
            raise ValueError(f"{len(shards)} shards cannot feed {max(1, workers)} workers x {world_size} "
                             "ranks; use fewer workers, smaller shards, or resampled=True")
        source = [wds.SimpleShardList(shards), partial(_shuffled_shards, seed=seed, epoch=shared_epoch),
                  wds.split_by_node, wds.split_by_worker]
    else:
        source = [wds.SimpleShardList(shards), wds.split_by_worker]
    stages = [wds.tarfile_to_samples(handler=counter.shard_error)]
    if is_train:
        stages.append(partial(_shuffled_samples, seed=seed, epoch=shared_epoch, bufsize=shuffle_buffer))
    stages += [
        partial(_decoded, preprocess=preprocess, caption_choice=caption_choice, counter=counter, seed=seed,
                epoch=shared_epoch),
        partial(_batches, batch_size=batch_size, tokenizer=tokenizer, counter=counter,
                single_pass=not is_train),
    ]
    dataset = wds.DataPipeline(*source, *stages)

    num_samples = num_samples or dataset_size(shards)
    if is_train:
        if not num_samples:
            raise ValueError("training needs the epoch size: pass num_samples (no sizes.json by the shards)")
        num_workers = max(1, workers)
        batches_per_worker = math.ceil(num_samples / (batch_size * world_size * num_workers))
        num_batches = batches_per_worker * num_workers
        num_samples = num_batches * batch_size * world_size
        dataset = dataset.with_epoch(batches_per_worker)
    else:
        num_batches = math.ceil(num_samples / batch_size) if num_samples else None
    dataloader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=pin_memory)
    return ShardLoader(dataloader, shared_epoch, num_samples, num_batches)


# ----------------------------------------------------------------------------------------------------------
# 4. Benchmark, plots and helpers for the notebook


def bench(shards: str | Sequence[str], workers: int = 0, batch_size: int = 64, image_size: int = 224,
          warmup: int = 5, max_batches: int | None = None, seed: int = 0) -> dict:
    """Images per second of a training loader (open_clip train transform, ViT-B-32 tokenizer) over one epoch,
    not counting the first `warmup` batches (worker start-up, shuffle buffer fill)."""
    import open_clip

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loader = make_loader(shards, preprocess, tokenizer, batch_size, workers, seed=seed)
    timed_images, timed_batches = 0, 0
    start = time.perf_counter()
    for i, (images, _) in enumerate(loader):
        if i < warmup:
            start = time.perf_counter()
            continue
        timed_images += len(images)
        timed_batches += 1
        if max_batches and timed_batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    if not timed_batches:
        raise ValueError(f"the epoch had no batches after {warmup} warm-up batches; lower --warmup")
    return {"shards": str(shards), "num_shards": len(expand_shards(shards)), "workers": workers,
            "batch_size": batch_size, "image_size": image_size, "warmup_batches": warmup,
            "timed_batches": timed_batches, "images_timed": timed_images, "seconds": round(seconds, 3),
            "images_per_s": round(timed_images / seconds, 1), "skipped": sum(loader.skipped.values())}


def iter_samples(shards: str | Sequence[str], limit: int | None = None) -> Iterator[dict]:
    """Raw samples in shard order as {"key", "image" (PIL), "captions", "meta"}; undecodable images are passed
    over. For looking at data, not for training."""
    dataset = wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples())
    produced = 0
    for sample in dataset:
        if limit is not None and produced >= limit:
            return
        image_field = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_field is None:
            continue
        try:
            with Image.open(io.BytesIO(sample[image_field])) as img:
                image = img.convert("RGB")
        except DECODE_ERRORS:
            continue
        meta = json.loads(sample["json"]) if "json" in sample else {}
        captions = meta.get("captions") or [sample.get("txt", b"").decode("utf-8", "replace")]
        produced += 1
        yield {"key": sample["__key__"], "image": image, "captions": captions, "meta": meta}


def show_samples(shards: str | Sequence[str], n: int = 8, columns: int = 4):
    """A matplotlib figure: a grid of the first `n` images with their first caption underneath."""
    import matplotlib.pyplot as plt

    samples = list(iter_samples(shards, limit=n))
    rows = max(1, math.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(sample["image"])
        ax.set_title(textwrap.fill(sample["captions"][0], 34), fontsize=8)
    fig.tight_layout()
    return fig


def caption_lengths(shards: str | Sequence[str]) -> list[int]:
    """Words per caption, over every caption of every sample."""
    return [len(c.split()) for sample in iter_samples(shards) for c in sample["captions"]]


def caption_length_histogram(shards: str | Sequence[str]):
    """A matplotlib figure: histogram of caption lengths in words."""
    import matplotlib.pyplot as plt

    lengths = caption_lengths(shards)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=range(0, max(lengths) + 2), color="tab:blue", edgecolor="white")
    ax.set_xlabel("words per caption")
    ax.set_ylabel("captions")
    ax.set_title(f"{len(lengths)} captions, median {sorted(lengths)[len(lengths) // 2]} words")
    fig.tight_layout()
    return fig


def unpack_shards(shards: str | Sequence[str], out: str | Path) -> tuple[Path, Path]:
    """Shards back to a folder: OUT/images/<key>.jpg and OUT/captions.tsv (image<TAB>caption, every caption).
    Returns (images folder, captions file), ready for from_captions or serve_directory."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption"]
    for sample in wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples()):
        name = f"{sample['__key__']}.jpg"
        (out / "images" / name).write_bytes(sample["jpg"])
        captions = json.loads(sample["json"])["captions"] if "json" in sample else [sample["txt"].decode()]
        lines += [f"{name}\t{' '.join(c.split())}" for c in captions]
    atomic_write_text(out / "captions.tsv", "\n".join(lines) + "\n")
    return out / "images", out / "captions.tsv"


def write_url_list(captions: str | Path, base_url: str, out_file: str | Path,
                   limit: int | None = None) -> Path:
    """A url,caption CSV naming each image of a captions file under `base_url` (first caption per image)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    entries = list(read_captions(captions).values())[:limit]
    with open(out_file, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for entry in entries:
            writer.writerow([f"{base_url}/{urllib.parse.quote(entry.path)}", entry.captions[0]])
    return out_file


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def serve_directory(directory: str | Path, start_timeout_s: float = 10.0) -> Iterator[LocalServer]:
    """Serve a folder with `python -m http.server` on 127.0.0.1 at a free port; stopped on exit.

    A stand-in for the web when trying from_urls offline (the notebook and the tests use it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
               str(directory)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"http.server on 127.0.0.1:{port} did not start")
            time.sleep(0.05)
        yield LocalServer(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _append_csv_row(path: Path, row: dict) -> None:
    """Add a row to a results CSV, keeping earlier rows (columns are the union, in first-seen order)."""
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    rows.append({k: "" if v is None else v for k, v in row.items()})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dtplib.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("from-captions", help="image folder + captions file -> train/val/test shards")
    p.add_argument("--images", required=True, help="folder the captions file's image names are relative to")
    p.add_argument("--captions", required=True, help="captions.tsv (image<TAB>caption) or COCO captions json")
    p.add_argument("--out", required=True, help="output folder: {train,val,test}/NNNNNN.tar, stats.json")
    p.add_argument("--image-size", type=int, default=0, help="shrink the shorter side to this (0: keep)")
    p.add_argument("--encode-quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--val-size", type=float, default=0.1, help="fraction (<1) or count of images for val")
    p.add_argument("--test-size", type=float, default=0.1, help="fraction (<1) or count of images for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (by name)")
    p.add_argument("--strict", action="store_true", help="error (not skip) if a named image is missing")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")

    p = commands.add_parser("from-urls", help="URL list (parquet/csv/tsv) -> img2dataset -> shards + summary")
    p.add_argument("--url-list", required=True, help="a parquet/csv/tsv file, or a folder of them")
    p.add_argument("--out", required=True, help="output folder: NNNNN.tar, summary.csv, summary.json")
    p.add_argument("--url-col", default="url", help="URL column (LAION-400M: URL)")
    p.add_argument("--caption-col", default="caption", help="caption column (LAION-400M: TEXT)")
    p.add_argument("--input-format", choices=["parquet", "csv", "tsv"], help="default: from the suffix")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="keep_ratio", choices=["no", "keep_ratio", "center_crop",
                                                                   "border"],
                   help="img2dataset resize_mode; keep_ratio shrinks the shorter side to --image-size")
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes_count")
    p.add_argument("--threads", type=int, default=32, help="img2dataset thread_count (per process)")
    p.add_argument("--shard-size", type=int, default=10000, help="img2dataset number_sample_per_shard")
    p.add_argument("--timeout", type=int, default=10, help="seconds per download")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--extra-columns", default="", help="comma-separated columns to keep in json (e.g. NSFW)")
    p.add_argument("--overwrite", action="store_true", help="replace a download already in --out")

    p = commands.add_parser("bench", help="images/s of the training loader over shards")
    p.add_argument("shards", help="brace pattern, e.g. /tmp/f8k/train/{000000..000006}.tar, or a folder")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=5, help="batches not timed")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default: the rest of an epoch)")
    p.add_argument("--csv", default=None, help="append the result with provenance columns to this CSV")
    args = parser.parse_args(argv)

    if args.command == "from-captions":
        stats = from_captions(args.images, args.captions, args.out, image_size=args.image_size,
                              encode_quality=args.encode_quality, shard_size=args.shard_size,
                              val_size=args.val_size, test_size=args.test_size, seed=args.seed,
                              processes=args.processes, limit=args.limit, strict=args.strict,
                              overwrite=args.overwrite)
        print(json.dumps({k: stats[k] for k in ("images_in", "pairs_in", "samples_out", "captions_out",
                                                  "skipped", "captions_skipped", "splits")}, indent=1))
    elif args.command == "from-urls":
        extra = [c for c in args.extra_columns.split(",") if c]
        summary = from_urls(args.url_list, args.out, url_col=args.url_col, caption_col=args.caption_col,
                            input_format=args.input_format, image_size=args.image_size,
                            resize_mode=args.resize_mode, processes=args.processes, threads=args.threads,
                            shard_size=args.shard_size, timeout=args.timeout, retries=args.retries,
                            extra_columns=extra, overwrite=args.overwrite)
        print(json.dumps(summary, indent=1))
    else:
        result = bench(args.shards, args.workers, args.batch_size, args.image_size, args.warmup, args.batches)
        print(f"{result['images_per_s']} images/s ({result['workers']} workers, batch {result['batch_size']},"
              f" {result['image_size']}px, {result['images_timed']} images in {result['seconds']} s)")
        if args.csv:
            _append_csv_row(Path(args.csv), result | run_info(batch_size=args.batch_size))


if __name__ == "__main__":
    main()
