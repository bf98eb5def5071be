"""Downloading a URL list into webdataset shards with img2dataset, and a local HTTP server to try it offline.

`from_urls` checks the list (only http and https URLs are fetched), runs img2dataset and summarizes its per-shard
stats (summary.csv, summary.json, sizes.json); `success_rate_table` reads the summary back. `serve_directory` serves
a folder on 127.0.0.1 and `write_url_list` names a captions file's images under its URL, a stand-in for the web
(notebook and tests).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..common.cli import stop_process
from ..common.extras import optional_import
from ..common.files import atomic_write_text
from ..common.paths import repo_path
from .shards import (
    SAMPLE_DIR,
    brace_pattern,
    from_captions,
    read_captions,
    replace_outputs,
    split_shards,
    unpack_shards,
)

log = logging.getLogger(__name__)


def from_urls(url_list: str | Path, out: str | Path, *, url_col: str = "url", caption_col: str = "caption",
              input_format: str | None = None, image_size: int = 256, resize_mode: str = "keep_ratio",
              processes: int = 2, threads: int = 32, shard_size: int = 10000, timeout: int = 10,
              retries: int = 0, extra_columns: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Download a URL list (a parquet/csv/tsv file, or a folder of them) into webdataset shards with
    img2dataset, then write OUT/summary.{csv,json} and OUT/sizes.json from its per-shard stats; returns
    the summary.

    Only images that downloaded and decoded end up in the shards (jpg, txt, img2dataset's json with url and
    caption). The url list and its columns are checked before anything is downloaded. Only http and https URLs are
    fetched (urllib, under img2dataset, would also open file:// and ftp:// ones, so an untrusted list could pull
    local files into the shards): any other row is left out of what img2dataset reads and counted as a failed
    download with its reason (`_http_only`); a list with no http(s) URL at all is refused before any work.
    LAION-400M metadata: url_col="URL", caption_col="TEXT", input_format="parquet".
    """
    url_list, out = Path(url_list), Path(out)
    table = _check_url_list(url_list, input_format, [url_col, caption_col, *(extra_columns or [])])
    input_format = input_format or table.suffix.lstrip(".")
    refused = _refused_urls(url_list, input_format, url_col)
    _prepare_download_dir(out, overwrite)
    os.environ.setdefault("WANDB_MODE", "disabled")  # img2dataset imports wandb at import time
    img2dataset = optional_import("img2dataset")
    fetched = _http_only(url_list, input_format, url_col, out / HTTP_ONLY_DIR) if refused.reasons else url_list
    try:
        img2dataset.download(
            url_list=str(fetched), output_folder=str(out), output_format="webdataset", input_format=input_format,
            url_col=url_col, caption_col=caption_col, save_additional_columns=list(extra_columns or []) or None,
            image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=True,
            processes_count=processes, thread_count=threads, number_sample_per_shard=shard_size,
            timeout=timeout, retries=retries, extract_exif=False, distributor="multiprocessing",
            enable_wandb=False,
        )
    finally:
        shutil.rmtree(out / HTTP_ONLY_DIR, ignore_errors=True)
    return _summarize_downloads(out, refused)


# ----------------------------------------------------------------------------------------------------------
# Only http and https: other URLs are counted as failures, never handed to img2dataset


FETCHED_SCHEMES = ("http", "https")
HTTP_ONLY_DIR = "_http_only"  # in OUT while img2dataset runs: the url list without the refused rows


def _refusal(url: object) -> str | None:
    """Why a URL is not fetched, as a failure reason of summary.json; None for an http or https URL."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    if scheme in FETCHED_SCHEMES:
        return None
    return f"not fetched: URL scheme {scheme!r} (only http and https)" if scheme else "not fetched: not a URL"


def _url_tables(url_list: Path, input_format: str) -> list[Path]:
    """The table files img2dataset reads: the file itself, or every *.<format> of the folder."""
    return sorted(url_list.glob(f"*.{input_format}")) if url_list.is_dir() else [url_list]


def _read_table(path: Path, kind: str, columns: Sequence[str] | None = None):
    """A url table as pyarrow reads it for img2dataset (so a copy keeps every value as img2dataset would see it)."""
    if kind == "parquet":
        return optional_import("pyarrow.parquet").read_table(path, columns=columns)
    pa_csv = optional_import("pyarrow.csv")
    return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                           convert_options=pa_csv.ConvertOptions(include_columns=columns))


@dataclass
class RefusedUrls:
    """Rows of a url list that are not fetched: counted by reason, with up to five examples ("FILE row N: URL", the
    N-th URL of the file, its header not counted)."""

    reasons: Counter
    examples: list[str]


def _refused_urls(url_list: Path, input_format: str, url_col: str) -> RefusedUrls:
    """Count the rows whose URL is not http or https (reading only the URL column); a ValueError when no row is
    left to fetch, before any work."""
    refused, total = RefusedUrls(Counter(), []), 0
    for path in _url_tables(url_list, input_format):
        urls = _read_table(path, input_format, [url_col]).column(url_col).to_pylist()
        total += len(urls)
        for row, url in enumerate(urls, start=1):
            reason = _refusal(url)
            if reason is not None:
                refused.reasons[reason] += 1
                if len(refused.examples) < 5:
                    refused.examples.append(f"{path.name} row {row}: {str(url)[:200]}")
    if total and sum(refused.reasons.values()) == total:
        raise ValueError(f"{url_list}: none of the {total} URLs is http or https, e.g. {refused.examples[0]}; "
                         "only http and https URLs are fetched")
    if refused.reasons:
        log.warning("%d URLs of %s are not fetched (only http and https), e.g. %s", sum(refused.reasons.values()),
                    url_list, refused.examples[0])
    return refused


def _http_only(url_list: Path, input_format: str, url_col: str, folder: Path) -> Path:
    """Copies of the url list's tables without the rows `_refusal` refuses, in `folder` (same names and format);
    returns what to hand img2dataset instead of `url_list`."""
    pa, pa_csv, pq = (optional_import(name) for name in ("pyarrow", "pyarrow.csv", "pyarrow.parquet"))
    folder.mkdir(parents=True)
    for path in _url_tables(url_list, input_format):
        table = _read_table(path, input_format)
        table = table.filter(pa.array([_refusal(url) is None for url in table.column(url_col).to_pylist()]))
        if input_format == "parquet":
            pq.write_table(table, folder / path.name)
        else:
            options = pa_csv.WriteOptions(delimiter="\t" if input_format == "tsv" else ",")
            pa_csv.write_csv(table, folder / path.name, write_options=options)
    return folder if url_list.is_dir() else folder / url_list.name


@dataclass
class Prepared:
    """What `prepare` made: the training shards' pattern, the shard writer's stats, the local source it read."""

    shards: str  # brace pattern of the training shards
    stats: dict
    images_dir: Path | None  # local sources only
    captions_file: Path | None


SOURCE_KINDS = ("sample", "captions", "urls")


def prepare(source_kind: str, out: str | Path, *, images_dir: str | Path = "", captions_file: str | Path = "",
            url_list: str | Path = "", url_col: str = "url", caption_col: str = "caption", image_size: int = 256,
            shard_size: int = 10000, overwrite: bool = True) -> Prepared:
    """Training shards in OUT/shards from one of three sources, in one call (the 01 notebook):
    "sample", the embedded COCO sample unpacked to a folder of JPEGs and a captions.tsv first; "captions", a local
    folder and captions file (seeded train/val/test split); "urls", a URL list through img2dataset."""
    if source_kind not in SOURCE_KINDS:
        raise ValueError(f"source_kind must be one of {SOURCE_KINDS}, got {source_kind!r}")
    out = repo_path(out)
    if source_kind == "urls":
        if not url_list:
            raise ValueError('source_kind="urls" needs url_list')
        stats = from_urls(repo_path(url_list), out / "shards", url_col=url_col, caption_col=caption_col,
                          image_size=image_size, shard_size=shard_size, overwrite=overwrite)
        return Prepared(str(out / "shards"), stats, None, None)
    if source_kind == "sample":
        if not SAMPLE_DIR.is_dir():
            raise FileNotFoundError(f"no embedded sample at {SAMPLE_DIR}: it ships with the repository (data/sample), "
                                    "so run from a checkout")
        images_dir, captions_file = unpack_shards(sorted(SAMPLE_DIR.glob("*/*.tar")), out / "source")
    elif not images_dir or not captions_file:
        raise ValueError('source_kind="captions" needs images_dir and captions_file')
    images_dir, captions_file = repo_path(images_dir), repo_path(captions_file)
    stats = from_captions(images_dir, captions_file, out / "shards", image_size=image_size, shard_size=shard_size,
                          overwrite=overwrite)
    return Prepared(split_shards(out / "shards", "train"), stats, images_dir, captions_file)


def _prepare_download_dir(out: Path, overwrite: bool) -> None:
    """Refuse to download into a folder that already holds a download (img2dataset would resume into it and
    trip on our summary files); with `overwrite`, remove only what img2dataset and from_urls write there."""
    replace_outputs(out, ("*.tar", "*.parquet", "*_stats.json", "sizes.json", "summary.csv", "summary.json",
                           "_tmp", HTTP_ONLY_DIR), overwrite, "a download")


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
        names = optional_import("pyarrow.parquet").read_schema(table).names
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


def _summarize_downloads(out: str | Path, refused: RefusedUrls | None = None) -> dict:
    """Aggregate img2dataset's NNNNN_stats.json files: summary.csv (one row per shard, a "refused" row for the URLs
    that were not fetched, and a total), summary.json (totals, success rate, failure reasons, refused examples),
    sizes.json (successes per shard: make_loader)."""
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
    n_refused = sum(refused.reasons.values()) if refused else 0
    if n_refused:
        rows.append({"shard": "refused", "count": n_refused, "successes": 0, "failed_to_download": n_refused,
                     "failed_to_resize": 0, "duration_s": 0.0})
        reasons.update(refused.reasons)
    table = pd.DataFrame(rows)
    total = {column: table[column].sum() for column in table.columns if column != "shard"} | {"shard": "total"}
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
        "shards": brace_pattern(tars) if tars else None,
    }
    if n_refused:
        summary["refused_examples"] = refused.examples
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def success_rate_table(out: str | Path) -> pd.DataFrame:
    """One row per outcome of a from_urls run (success and each failure reason) with its count and share."""
    summary = json.loads((Path(out) / "summary.json").read_text())
    rows = [("success", summary["successes"])] + list(summary["failure_reasons"].items())
    table = pd.DataFrame(rows, columns=["outcome", "count"])
    table["share"] = (table["count"] / max(1, summary["count"])).round(4)
    return table



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
        stop_process(process)
