"""Image-caption data: local folders and URL lists to webdataset shards, and a robust, DDP-aware loader.

The command line over the data modules (`python -m dtplib.data -h`):
- `from-captions`: an image folder + captions file (Flickr8k tsv, COCO json) -> seeded train/val/test shards
  (`dtplib.data.shards.from_captions`).
- `from-urls`: a LAION-style URL list -> img2dataset -> shards, plus a success-rate summary; only http and https
  URLs are fetched (`dtplib.data.download.from_urls`).
- `bench`: images/s of the training loader (`dtplib.data.loaderbench.benchmark_loader`; the loader itself is
  `dtplib.data.loader.make_loader`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..common.cli import run_cli
from ..common.files import append_csv
from ..common.provenance import run_info
from .download import from_urls
from .loaderbench import benchmark_loader
from .shards import from_captions


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dtplib.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("from-captions", help="image folder + captions file -> train/val/test shards")
    p.add_argument("--images", required=True, help="folder the captions file's image names are relative to; a name "
                   "that resolves outside it (absolute, .., a symlink out) refuses the run")
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
    p.add_argument("--url-list", required=True, help="a parquet/csv/tsv file, or a folder of them; only http(s) URLs "
                   "are fetched, other rows count as failures")
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
        result = benchmark_loader(args.shards, args.workers, args.batch_size, args.image_size, args.warmup,
                                  args.batches)
        print(f"{result['images_per_s']} images/s ({result['workers']} workers, batch {result['batch_size']},"
              f" {result['image_size']}px, {result['images_timed']} images in {result['seconds']} s)")
        if args.csv:
            append_csv(Path(args.csv), result | run_info(batch_size=args.batch_size))


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.data")
