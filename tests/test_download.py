"""Downloading on real components: a real img2dataset run against `python -m http.server` on 127.0.0.1 (COCO
files from DTPLIB_DATA, and a file:// row that is counted, never fetched), and URL lists checked before anything is
downloaded."""

import csv
import io
import json
import shutil
import socket

import pytest
from PIL import Image
from shard_io import COCO, read_tars

from dtplib.data.download import from_urls, serve_directory, success_rate_table
from dtplib.data.loader import dataset_size, expand_shards


def test_url_list_errors_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="url list not found"):
        from_urls(tmp_path / "nope.parquet", tmp_path / "dl")
    laion_like = tmp_path / "laion.csv"
    laion_like.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['url', 'caption'\].*URL"):
        from_urls(laion_like, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


# ---------------------------------------------------------------------------------------------------------
# from-urls: a real img2dataset run against a real local HTTP server


@pytest.mark.slow
def test_from_urls_with_local_http_server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    good = sorted((COCO / "val2017").glob("*.jpg"))[:5]
    for path in good:
        shutil.copy(path, www / path.name)
    (www / "corrupt.jpg").write_bytes(b"this is not a JPEG " * 200)
    local = sorted((COCO / "val2017").glob("*.jpg"))[5]  # a real photo outside the served folder
    with serve_directory(www) as server:
        url_list = tmp_path / "urls.csv"
        with open(url_list, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            writer.writerows([(f"{server.url}/{p.name}", f"caption of {p.name}") for p in good])
            writer.writerow([f"{server.url}/missing.jpg", "a 404"])
            writer.writerow([f"{server.url}/corrupt.jpg", "a corrupt file"])
            writer.writerow([local.as_uri(), "a local file: counted as a failure, never fetched"])
        summary = from_urls(url_list, tmp_path / "shards", image_size=64, processes=1, threads=4,
                            shard_size=100, timeout=5)
        with pytest.raises(FileExistsError, match="already holds a download"):  # before any download
            from_urls(url_list, tmp_path / "shards")
        again = from_urls(url_list, tmp_path / "shards", image_size=64, processes=1, threads=4,
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
    assert (summary["count"], summary["successes"]) == (8, 5)
    assert (summary["failed_to_download"], summary["failed_to_resize"]) == (2, 1)
    reasons = " ".join(summary["failure_reasons"])
    assert "404" in reasons and "decoding" in reasons.lower()
    assert summary["failure_reasons"]["not fetched: URL scheme 'file' (only http and https)"] == 1
    assert summary["refused_examples"] == [f"urls.csv row 8: {local.as_uri()}"]
    assert local.read_bytes() not in [s["jpg"] for s in samples]  # and no sample's url is the file's
    assert not list((tmp_path / "shards").glob("_http_only*"))  # the filtered list is gone
    table = success_rate_table(tmp_path / "shards")
    assert table["count"].sum() == 8 and table.loc[table.outcome == "success", "count"].item() == 5
    with open(tmp_path / "shards" / "summary.csv") as f:
        rows = {row["shard"]: row for row in csv.DictReader(f)}
    assert (rows["refused"]["count"], rows["refused"]["failed_to_download"]) == ("1", "1")
    assert float(rows["total"]["success_rate"]) == pytest.approx(5 / 8, abs=1e-3)
    assert dataset_size(expand_shards(str(tmp_path / "shards" / summary["shards"]))) == 5
