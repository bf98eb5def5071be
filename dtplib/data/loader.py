"""Reading webdataset shards: a robust, DDP-aware (images, tokens) loader, and raw samples for looking at data.

`make_loader` turns shards into batches in the manner of open_clip; corrupt samples are skipped and counted
(`SkipCounter`, `ShardLoader.skipped`), never raised. `iter_samples` yields decoded samples one by one.
`expand_shards` and `dataset_size` resolve a shard list and its epoch size (from the sizes.json beside it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ..common.images import open_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # sample fields the loader reads an image from, first found wins
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL on bad bytes


def _image_bytes(sample: dict) -> bytes | None:
    """The encoded image of a shard sample: the first of IMAGE_KEYS it holds, or None if it holds none."""
    image_field = next((k for k in IMAGE_KEYS if k in sample), None)
    return None if image_field is None else sample[image_field]


def _decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> an RGB PIL image. Raises one of DECODE_ERRORS when PIL cannot decode them."""
    return open_rgb(io.BytesIO(data))


class SkipCounter:
    """Counts samples a loader process dropped, by reason.

    Worker processes cannot update a counter in the parent, so each batch carries (and clears) the counts
    gathered since the previous batch, and ShardLoader adds them up in the main process.
    """

    def __init__(self, log_first: int = 5):
        self.pending: Counter = Counter()
        self.log_first = log_first
        self.logged = 0

    def skip(self, reason: str, detail: str, count: int = 1) -> None:
        self.pending[reason] += count
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


def _seeded_rng_state(seed: int) -> torch.Tensor:
    """A CPU generator state seeded with `seed`. The training transform's random crops draw from it instead of the
    worker's global RNG, whose state a persistent worker carries from epoch to epoch and a resumed run's fresh
    worker does not: with it, a resumed run gets the same crops as the uninterrupted one with any --workers."""
    return torch.Generator().manual_seed(seed).get_state()


def _shuffled_shards(shards: Iterator[dict], seed: int, epoch: mp.Value) -> Iterator[dict]:
    """Shuffle the shard list the same way on every rank (seed + epoch), so split_by_node then deals disjoint
    shards to the ranks."""
    shards = list(shards)
    random.Random(seed * 100_003 + epoch.value).shuffle(shards)
    yield from shards


def _shard_samples(shards: Iterator[dict], counter: SkipCounter, sizes: dict[str, int]) -> Iterator[dict]:
    """Raw samples of each shard in turn (webdataset's tarfile_to_samples, one shard at a time: the same samples in
    the same order). A shard that errors (unreadable, truncated) is counted as shard_error, as many times as
    webdataset reports it; when sizes.json declared its size, the samples it declared but did not give are
    counted once more as lost_samples_estimate (an estimate: a sample cut in half is among them)."""
    for shard in shards:
        errors, read = [], 0

        def handler(exn: Exception, errors: list = errors) -> bool:
            errors.append(exn)
            return counter.shard_error(exn)

        for sample in wds.tarfile_to_samples(handler=handler)(iter([shard])):
            read += 1
            yield sample
        declared = sizes.get(shard.get("url"))
        if errors and declared is not None and declared > read:
            counter.skip("lost_samples_estimate", f"{shard.get('url')}: {read} of its {declared} samples read before "
                         f"{errors[0]!r}", count=declared - read)


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
    PIL cannot decode are counted in `counter` and dropped. Random augmentation draws from a stream seeded by
    (seed, epoch, rank, worker), so an epoch's crops do not depend on what ran before it."""
    rng = random.Random(_worker_seed(seed, epoch, salt=2))
    augment = _seeded_rng_state(_worker_seed(seed, epoch, salt=3))
    for sample in samples:
        key = f"{sample.get('__url__')}:{sample.get('__key__')}"
        encoded = _image_bytes(sample)
        if encoded is None:
            counter.skip("no_image", key)
            continue
        caption = _pick_caption(sample, caption_choice, rng)
        if not caption:
            counter.skip("no_caption", key)
            continue
        try:
            image = _decode_image(encoded)
        except DECODE_ERRORS as exn:
            counter.skip("undecodable_image", f"{key}: {exn!r}")
            continue
        with _single_threaded(), torch.random.fork_rng(devices=[]):
            torch.set_rng_state(augment)  # this epoch's augmentation stream, not the process's global one
            image = preprocess(image)  # 3 x H x W float
            augment = torch.get_rng_state()
        yield image, caption


def _batches(pairs: Iterator[tuple[torch.Tensor, str]], batch_size: int, tokenizer, counter: SkipCounter,
             single_pass: bool, advice: str = "use a smaller batch") -> Iterator[tuple]:
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
                           f"(skipped so far: {dict(counter.pending)}); {advice}")


class ShardLoader:
    """Iterable over (images B x 3 x H x W, tokens B x context_length) batches.

    `skipped` holds this epoch's dropped samples by reason (no_image, no_caption, undecodable_image,
    shard_error, and lost_samples_estimate: samples that sizes.json declared for a shard that errored but that it
    did not give), complete once the epoch's iteration ends; `samples_seen` the samples yielded. Call
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


def _declared_sizes(shards: Sequence[str]) -> dict[str, int]:
    """{shard: samples} for the shards that a sizes.json next to them names (written by from_captions and
    from_urls); shards without one are left out. A sizes.json that is not a JSON object of counts is a
    ValueError naming it."""
    sizes = {}
    for folder in sorted({os.path.dirname(s) for s in shards}):
        sizes_file = Path(folder) / "sizes.json"
        if "://" in folder or folder.startswith("pipe:") or not sizes_file.is_file():
            continue
        try:
            counts = json.loads(sizes_file.read_text(encoding="utf-8"))
        except ValueError as exn:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{sizes_file}: not a JSON object of shard sizes ({exn})") from None
        if not isinstance(counts, dict):
            raise ValueError(f"{sizes_file}: not a JSON object of shard sizes")
        sizes |= {s: counts[os.path.basename(s)] for s in shards
                  if os.path.dirname(s) == folder and isinstance(counts.get(os.path.basename(s)), int)}
    return sizes


def dataset_size(shards: Sequence[str]) -> int | None:
    """Number of samples from the sizes.json next to the shards; None when one of the shards is not in one."""
    sizes = _declared_sizes(shards)
    return sum(sizes[s] for s in shards) if all(s in sizes for s in shards) else None


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
    sizes = _declared_sizes(shards)
    stages = [partial(_shard_samples, counter=counter, sizes=sizes)]
    if is_train:
        stages.append(partial(_shuffled_samples, seed=seed, epoch=shared_epoch, bufsize=shuffle_buffer))
    stages += [
        partial(_decoded, preprocess=preprocess, caption_choice=caption_choice, counter=counter, seed=seed,
                epoch=shared_epoch),
        partial(_batches, batch_size=batch_size, tokenizer=tokenizer, counter=counter, single_pass=not is_train,
                advice=(f"shards {shards[0]}{' ...' if len(shards) > 1 else ''}: check their samples, or use "
                        + ("fewer workers or " if workers > 1 else "") + "a smaller batch")),
    ]
    dataset = wds.DataPipeline(*source, *stages)

    num_samples = num_samples or dataset_size(shards)
    if is_train:
        if num_samples == 0:  # every shard is in a sizes.json, and each counts 0 samples
            raise ValueError(f"{shards[0]} holds no samples: the sizes.json beside it counts 0, the tar is empty"
                             if len(shards) == 1 else
                             f"the {len(shards)} shards hold no samples ({shards[0]}, ...): the sizes.json beside "
                             "them counts 0 for each, the tars are empty")
        if not num_samples:
            raise ValueError("training needs the epoch size: pass num_samples (no sizes.json by the shards)")
        num_workers = max(1, workers)
        batches_per_worker = math.ceil(num_samples / (batch_size * world_size * num_workers))
        num_batches = batches_per_worker * num_workers
        num_samples = num_batches * batch_size * world_size
        dataset = dataset.with_epoch(batches_per_worker)
    else:
        num_batches = math.ceil(num_samples / batch_size) if num_samples else None
    # its own generator: a DataLoader draws seeds from the global RNG when it starts its workers and at every
    # epoch, and a resumed run starts them once more than the uninterrupted one, shifting the model's random stream
    dataloader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(seed))
    return ShardLoader(dataloader, shared_epoch, num_samples, num_batches)


def iter_samples(shards: str | Sequence[str], limit: int | None = None) -> Iterator[dict]:
    """Raw samples in shard order as {"key", "image" (PIL), "captions", "meta"}; undecodable images are passed
    over. For looking at data, not for training."""
    dataset = wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples())
    produced = 0
    for sample in dataset:
        if limit is not None and produced >= limit:
            return
        encoded = _image_bytes(sample)
        if encoded is None:
            continue
        try:
            image = _decode_image(encoded)
        except DECODE_ERRORS:
            continue
        meta = json.loads(sample["json"]) if "json" in sample else {}
        captions = meta.get("captions") or [sample.get("txt", b"").decode("utf-8", "replace")]
        produced += 1
        yield {"key": sample["__key__"], "image": image, "captions": captions, "meta": meta}
