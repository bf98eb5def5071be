"""Data: image-caption pairs to webdataset shards, and shards back to batches.

- `shards`: local images + captions -> seeded train/val/test shards (and the embedded sample);
- `download`: URL lists -> shards with img2dataset, and a local HTTP server to try it offline;
- `imagefolder`: folder-per-class datasets (zero-shot classes, the linear probe's split);
- `loader`: the DDP-aware, corruption-tolerant training loader and raw samples;
- `loaderbench`: images per second of the loader;
- `cli`: their command line, `python -m dtplib.data`.
"""

__all__ = ["cli", "download", "imagefolder", "loader", "loaderbench", "shards"]
