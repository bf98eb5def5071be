"""Loader throughput: images per second of the training loader over shards (`python -m dtplib.data bench`).

`benchmark_loader` times one epoch of `make_loader` with open_clip's train transform; `dtplib.common.files.append_csv`
adds its result, with provenance columns, to a results CSV such as results/loader_bench.csv.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .loader import expand_shards, make_loader


def benchmark_loader(shards: str | Sequence[str], workers: int = 0, batch_size: int = 64, image_size: int = 224,
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
