"""`python -m dtplib.export CHECKPOINT --out FILE.safetensors [--fp16]`: a training checkpoint as a weights-only
file that open_clip loads (`open_clip.create_model_and_transforms(name, pretrained=FILE)` after `import dtplib`),
with its open_clip name, DTPConfig and source in the file's metadata and in FILE.json (`dtplib.tower.weights`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .common.cli import run_cli
from .training.checkpoint import export_weights


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m dtplib.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by python -m dtplib.train (e.g. "
                        "RUN/checkpoints/epoch_latest.pt)")
    parser.add_argument("--out", required=True, help="the weights file to write, NAME.safetensors (NAME.json beside)")
    parser.add_argument("--fp16", action="store_true", help="store floating tensors in fp16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out and its .json if they exist")
    args = parser.parse_args(argv)
    path = export_weights(args.checkpoint, args.out, fp16=args.fp16, overwrite=args.overwrite)
    header = json.loads(path.with_suffix(".json").read_text())
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {header['dtype']}) and {path.with_suffix('.json')}")
    print(f"load: import dtplib, open_clip; open_clip.create_model_and_transforms({header['open_clip_model']!r}, "
          f"pretrained={str(path)!r})")
    if header["settings_not_in_name"]:
        print(f"settings the name does not carry (dtplib.tower.weights.load_weights sets them): "
              f"{header['settings_not_in_name']}")
    return path


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.export")
