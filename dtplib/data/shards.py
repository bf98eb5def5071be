"""Writing webdataset shards from local images: an image folder + captions file -> seeded train/val/test shards.

`read_captions` parses the captions file (Flickr8k tsv, Kaggle csv, COCO json); `from_captions` writes
OUT/{train,val,test}/NNNNNN.tar with sizes.json per split, stats.json and LICENSES.tsv; `split_shards` names a
split's shards again; `unpack_shards` turns shards back into a folder. Every sample holds `jpg`, `txt` (one
caption) and `json` (source id, all captions, split, licence).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import multiprocessing as mp
import random
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image

from ..common.files import atomic_write_text
from ..common.paths import repo_path
from ..common.progress import progress
from .loader import DECODE_ERRORS, IMAGE_EXTENSIONS, expand_shards

log = logging.getLogger(__name__)

# the embedded COCO sample (split shards, stats.json, LICENSES.tsv): it ships with the repository, not the package, so
# it is the working checkout's (as the current directory stood when dtplib was imported)
SAMPLE_DIR = repo_path("data/sample")
SPLITS = ("train", "val", "test")


@dataclass
class CaptionedImage:
    """One source image (path relative to the images folder), all its captions, any licence metadata."""

    path: str
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    row: int = 0  # where the captions file first names it: a table's line, or the image's entry in a json (from 1)


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


def _read_text(path: Path) -> str:
    """A captions file as text; a byte that is not UTF-8 is a ValueError naming file:line (not a bare
    UnicodeDecodeError)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exn:
        line = data.count(b"\n", 0, exn.start) + 1
        column = exn.start - (data.rfind(b"\n", 0, exn.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[exn.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _read_caption_table(path: Path) -> dict[str, CaptionedImage]:
    lines = _read_text(path).splitlines()
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
        entries.setdefault(image, CaptionedImage(image, row=line_number)).captions.append(row[1])
    return entries


def _read_coco_json(path: Path) -> dict[str, CaptionedImage]:
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected COCO captions json)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path}:{exn.lineno}: not valid JSON ({exn.msg}, column {exn.colno})") from None
    images = data.get("images") if isinstance(data, dict) else None
    licenses = {lic["id"]: lic for lic in data.get("licenses", [])} if isinstance(data, dict) else {}
    if isinstance(images, list) and "annotations" in data:  # official COCO: images[] + annotations[]
        by_id = {img["id"]: CaptionedImage(img["file_name"], [], _coco_meta(img, licenses), row)
                 for row, img in enumerate(images, start=1)}
        for annotation in data["annotations"]:
            if annotation["image_id"] in by_id:
                by_id[annotation["image_id"]].captions.append(annotation["caption"])
        return {entry.path: entry for entry in by_id.values()}
    if isinstance(images, dict):  # coco-mini captions_all.json: {"<folder>/<file>": {captions, license, ...}}
        return {p: CaptionedImage(p, list(rec.get("captions", [])), _coco_meta(rec, licenses), row)
                for row, (p, rec) in enumerate(images.items(), start=1)}
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


def _sample_key(path: str) -> str:
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

    Errors before any image is read: missing folder or captions file, no captions at all, any row whose image path
    resolves outside `images` (absolute, `..`, or a symlink out of it: the whole run is refused, naming the first
    rows and the count, since such a file would be read and packed with its path), none of the named images
    present, a non-empty OUT without `overwrite`. Skipped and counted (stats.json): images named but
    absent (an error with `strict`), empty captions, images left without any caption, undecodable images.
    Counts add up: samples_out = images_in - sum(skipped), captions_out = pairs_in - sum(captions_skipped).
    `limit` keeps the first N images by path (for quick runs).
    """
    images, captions, out = Path(images), Path(captions), Path(out)
    entries, missing = _read_entries(images, captions, limit, strict)
    keys = {p: _sample_key(p) for p in entries}
    if len(set(keys.values())) < len(keys):
        clash = Counter(keys.values()).most_common(1)[0][0]
        raise ValueError(f"two images map to the same sample key {clash!r} (same name, different extension?)")
    split_of = assign_splits(list(entries), val_size, test_size, seed)
    skips = _Skips()
    jobs = _kept_captions(entries, split_of, set(missing), skips)
    if not jobs:
        raise ValueError(f"{captions}: no image has a non-empty caption")
    _prepare_out_dir(out, overwrite)
    written = _write_shards(images, out, jobs, split_of, keys, skips, image_size=image_size,
                            encode_quality=encode_quality, shard_size=shard_size, processes=processes)
    _write_sizes_and_licences(out, written)
    stats = {
        "source": {"images": str(images), "captions": str(captions)},
        "options": {"image_size": image_size, "encode_quality": encode_quality, "shard_size": shard_size,
                    "val_size": val_size, "test_size": test_size, "seed": seed, "limit": limit},
        "images_in": len(entries),
        "pairs_in": sum(len(e.captions) for e in entries.values()),
        "samples_out": sum(sum(s.values()) for s in written.sizes.values()),
        "captions_out": sum(written.captions.values()),
        "skipped": dict(skips.images),
        "captions_skipped": {k: v for k, v in skips.captions.items() if v},
        "skipped_examples": skips.examples,
        "splits": {split: {"samples": sum(written.sizes[split].values()), "captions": written.captions[split],
                           "shards": f"{split}/{brace_pattern(sorted(written.sizes[split]))}"}
                   for split in SPLITS if written.sizes[split]},
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1))
    return stats


def _read_entries(images: Path, captions: Path, limit: int | None, strict: bool
                  ) -> tuple[dict[str, CaptionedImage], list[str]]:
    """The captioned images (the first `limit` by path) and those of them missing under `images`; the errors that
    come before any image is read."""
    if not images.is_dir():
        raise FileNotFoundError(f"images folder not found: {images}")
    if not captions.is_file():
        raise FileNotFoundError(f"captions file not found: {captions}")
    entries = read_captions(captions)
    _refuse_outside(images, captions, entries)
    if limit:
        entries = dict(list(entries.items())[:limit])
    missing = [p for p in entries if not (images / p).is_file()]
    if len(missing) == len(entries):
        raise FileNotFoundError(f"none of the {len(entries)} images named in {captions} exist under {images} "
                                f"(first: {missing[0]!r}); is --images the folder the names are relative to?")
    if missing and strict:
        raise FileNotFoundError(f"{len(missing)} images named in {captions} are missing under {images}, "
                                f"e.g. {missing[:3]}")
    return entries, missing


def _refuse_outside(images: Path, captions: Path, entries: dict[str, CaptionedImage]) -> None:
    """A ValueError naming the first rows (a table's line, a json's image entry) whose image path resolves outside
    `images`, and how many there are."""
    root = images.resolve()
    outside = sorted((entry for entry in entries.values() if not _resolves_inside(root, entry.path)),
                     key=lambda entry: entry.row)
    if outside:
        where = "entry" if captions.suffix == ".json" else "line"
        shown = "; ".join(f"{where} {entry.row}: {entry.path!r}" for entry in outside[:3])
        raise ValueError(f"{captions}: {len(outside)} of {len(entries)} image paths resolve outside --images {images} "
                         f"({shown}); paths must stay inside the images folder, nothing was written")


def _resolves_inside(root: Path, name: str) -> bool:
    """Whether `root / name` is inside `root` (resolved, symlinks followed). An absolute name or a `..` is refused by
    the name alone, so nothing outside is even looked at; a symlink loop counts as outside."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    try:
        return (root / name).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop: RuntimeError before Python 3.13, OSError from then on
        return False


@dataclass
class _Skips:
    """Images and captions left out, by reason, with up to five example paths per reason (stats.json)."""

    images: Counter = field(default_factory=Counter)
    captions: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, entry: CaptionedImage, reason: str, n_captions: int) -> None:
        self.images[reason] += 1
        self.captions[reason] += n_captions
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(entry.path)


def _kept_captions(entries: dict[str, CaptionedImage], split_of: dict[str, str], missing: set[str],
                   skips: _Skips) -> list[tuple[CaptionedImage, list[str]]]:
    """(image, its non-empty captions) in the split's seeded order, so each split's shards come out shuffled;
    missing images and images without a caption are skipped."""
    jobs = []
    for path in split_of:
        entry = entries[path]
        kept = [c.strip() for c in entry.captions if c.strip()]
        if path in missing:
            skips.skip(entry, "image_missing", len(entry.captions))
            continue
        skips.captions["empty_caption"] += len(entry.captions) - len(kept)
        if not kept:
            skips.skip(entry, "no_caption", 0)
            continue
        jobs.append((entry, kept))
    return jobs


@dataclass
class _Written:
    """What the shard writers wrote: samples per shard file and captions per split, and COCO's licence rows."""

    sizes: dict[str, Counter] = field(default_factory=lambda: {split: Counter() for split in SPLITS})
    captions: Counter = field(default_factory=Counter)
    licences: list[list] = field(default_factory=list)


def _write_shards(images: Path, out: Path, jobs: list[tuple[CaptionedImage, list[str]]], split_of: dict[str, str],
                  keys: dict[str, str], skips: _Skips, *, image_size: int, encode_quality: int, shard_size: int,
                  processes: int) -> _Written:
    """Encode the images (in `processes` worker processes) and write each split's shards; an undecodable image
    is skipped and counted."""
    written = _Written()
    writers: dict[str, wds.ShardWriter] = {}
    encode_args = [(str(images / entry.path), image_size, encode_quality) for entry, _ in jobs]
    with contextlib.ExitStack() as stack:
        if processes > 1:
            pool = stack.enter_context(mp.Pool(processes))
            encoded = pool.imap(_encode_job, encode_args, chunksize=16)
        else:
            encoded = map(_encode_job, encode_args)
        bar = progress(zip(jobs, encoded, strict=True), desc="shards", total=len(jobs), leave=True)
        for (entry, kept), (jpg, width, height, error) in bar:
            if error is not None:
                skips.skip(entry, "unreadable_image", len(kept))
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
            written.sizes[split][Path(writers[split].fname).name] += 1
            written.captions[split] += len(kept)
            if "license" in entry.meta:
                written.licences.append([keys[entry.path], split, entry.path, entry.meta.get("image_id", ""),
                                         entry.meta["license"], entry.meta.get("license_url", ""),
                                         entry.meta.get("flickr_url", "")])
    return written


def _write_sizes_and_licences(out: Path, written: _Written) -> None:
    """Each split's sizes.json (samples per shard, as open_clip reads it) and LICENSES.tsv when COCO named any."""
    for split, split_sizes in written.sizes.items():
        if split_sizes:
            atomic_write_text(out / split / "sizes.json", json.dumps(dict(sorted(split_sizes.items()))))
    if written.licences:
        header = ["key", "split", "source_id", "image_id", "license", "license_url", "flickr_url"]
        lines = ["\t".join(map(str, row)) for row in [header, *sorted(written.licences)]]
        atomic_write_text(out / "LICENSES.tsv", "\n".join(lines) + "\n")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones; with `overwrite`, remove only what from_captions writes."""
    replace_outputs(out, (*SPLITS, "stats.json", "LICENSES.tsv"), overwrite, "shards")
    out.mkdir(parents=True, exist_ok=True)


def replace_outputs(out: Path, patterns: Sequence[str], overwrite: bool, what: str) -> None:
    """Raise if `out` holds files matching `patterns` (a previous run's output), or remove them with
    `overwrite`; anything else in the folder is left alone."""
    existing = [p for pattern in patterns for p in out.glob(pattern)] if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {what} ({existing[0].name}); pass --overwrite to replace")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def brace_pattern(names: Sequence[str]) -> str:
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


def unpack_shards(shards: str | Sequence[str], out: str | Path) -> tuple[Path, Path]:
    """Shards back to a folder: OUT/images/<key>.jpg and OUT/captions.tsv (image<TAB>caption, every caption).
    Returns (images folder, captions file), ready for from_captions or serve_directory.

    Nothing is written outside OUT. A shard member that is not a regular file (a link, a device) or whose name is
    not a plain file name (absolute, `..`, or in a sub-folder, which a flat images folder cannot hold) is refused
    with a ValueError naming the shard and the member, not renamed: a renamed member could land on another sample's
    file, and such a member means the shard is not what from_captions or img2dataset write. Local shards are checked
    before anything is written; a remote one (a URL, `pipe:`) as its samples arrive."""
    out = Path(out)
    shard_list = expand_shards(shards)
    for shard in shard_list:
        _check_members(shard)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption"]
    for sample in wds.DataPipeline(wds.SimpleShardList(shard_list), wds.tarfile_to_samples()):
        name = _plain_name(f"{sample['__key__']}.jpg")
        if name is None:
            raise ValueError(f"{sample['__url__']}: member {sample['__key__']!r}.jpg is not a plain file name; "
                             "refusing to unpack it")
        target = out / "images" / name
        target.unlink(missing_ok=True)  # a link left in OUT is replaced, never followed
        target.write_bytes(sample["jpg"])
        captions = json.loads(sample["json"])["captions"] if "json" in sample else [sample["txt"].decode()]
        lines += [f"{name}\t{' '.join(c.split())}" for c in captions]
    atomic_write_text(out / "captions.tsv", "\n".join(lines) + "\n")
    return out / "images", out / "captions.tsv"


def _plain_name(name: str) -> str | None:
    """A tar member's name as a file directly inside the unpacked folder (a leading "./" dropped), or None when it
    is not one: absolute, `..`, in a sub-folder, empty."""
    name = name.removeprefix("./")
    unsafe = name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
    return None if unsafe else name


def _check_members(shard: str) -> None:
    """A ValueError naming the shard and the first member that unpack_shards must not write: a link, device or other
    non-regular file, or a name that is not a plain file name. Reads only the tar headers; remote shards are left to
    the check in unpack_shards."""
    if "://" in shard or shard.startswith("pipe:"):
        return
    try:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
    except tarfile.TarError as exn:
        raise ValueError(f"{shard}: not a readable tar ({exn})") from None
    for member in members:
        if member.isdir() and member.name.rstrip("/") == ".":
            continue  # the "./" entry of `tar -C folder .`
        if not member.isreg():
            kind = "link" if member.issym() or member.islnk() else "directory" if member.isdir() else "device or fifo"
            raise ValueError(f"{shard}: member {member.name!r} is a {kind}, not a regular file; refusing to unpack "
                             "the shard")
        if _plain_name(member.name) is None:
            raise ValueError(f"{shard}: member {member.name!r} is not a plain file name (absolute, '..' or a "
                             "sub-folder); refusing to unpack the shard")
