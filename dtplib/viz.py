"""`python -m dtplib.viz`: boundaries on photos and their alignment with COCO object outlines (`dtplib.figures.viz`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .common.cli import run_cli
from .common.files import append_csv
from .common.paths import data_root, repo_path
from .common.provenance import run_info
from .figures.viz import COCO_MINI, METHODS, RANDOM_WEIGHTS_NOTE, alignment, draw_methods, draw_overlays

UNTRAINED = ("note: no checkpoint, so the boundary predictor is untrained (random init): its boundaries say nothing "
             "about the images yet")


def _model_label(name: str | None, checkpoint: str | None) -> str:
    """The open_clip name a row is about: the one given, else the one a dtplib.train checkpoint was trained as."""
    if name or not checkpoint:
        return name or ""
    from .training.checkpoint import training_config

    config = training_config(checkpoint)
    return "" if config is None else config.model_name


def _methods_parser(commands) -> None:
    methods = commands.add_parser("methods", help="the same photos grouped by each method (DTP, uniform pooling, the "
                                  "field's reductions) in one PNG")
    methods.add_argument("--model", default="DTP-ViT-Ti-8-64-4x", help="DTP name: the arch and compression of every "
                         "method's tower")
    methods.add_argument("--weights", action="append", default=[], metavar="METHOD=WEIGHTS",
                         help=f"trained weights of a method ({', '.join(METHODS)}): a shipped name or weights file, "
                         "or a dtplib.train checkpoint (repeatable); the others are drawn at seeded random init, "
                         "and the figure says so")
    methods.add_argument("--images", default=str(data_root() / "flickr8k" / "images"), help="folder of photos")
    methods.add_argument("--num-images", type=int, default=4, help="first N photos (sorted names): the rows")
    methods.add_argument("--methods", default=",".join(METHODS), help="the columns, in order")
    methods.add_argument("--seed", type=int, default=0, help="seeds every random init")
    methods.add_argument("--out", required=True, help="the PNG to write, e.g. results/figures/methods_ti4x.png")


def _methods(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .common.images import photo_files

    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    weights = dict(pair.partition("=")[::2] for pair in args.weights)
    if any(not pair.partition("=")[2] for pair in args.weights):
        parser.error("--weights takes METHOD=WEIGHTS, e.g. dtp=flickr8k-ti-learned-4x")
    if not chosen or any(m not in METHODS for m in chosen) or args.num_images < 1:
        parser.error(f"--methods name methods of {METHODS}; --num-images >= 1")
    if set(weights) - set(chosen):
        parser.error(f"--weights for {sorted(set(weights) - set(chosen))}, which are not among the methods {chosen}")
    files = photo_files(args.images, args.num_images)
    path = draw_methods(files, repo_path(args.out), args.model, weights, chosen, args.seed)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    from .measure.evaluate import load_model

    parser = argparse.ArgumentParser(prog="python -m dtplib.viz", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    align = commands.add_parser("align", help="alignment of boundaries with COCO object outlines")
    overlay = commands.add_parser("overlay", help="draw segments, probabilities and tokens kept for a folder")
    for sub in (align, overlay):
        sub.add_argument("--model", help="open_clip name, e.g. DTP-ViT-Ti-8-64-4x; default with --checkpoint: the "
                         "model it was trained as")
        sub.add_argument("--checkpoint", help="a checkpoint written by python -m dtplib.train, or a weights file "
                         "from python -m dtplib.export (weights/*.safetensors)")
        sub.add_argument("--batch-size", type=int, default=64)
    align.add_argument("--coco", default=str(COCO_MINI), help="COCO folder with annotations/ and the image folders")
    align.add_argument("--num-images", type=int, help="first N annotated images (default: all)")
    align.add_argument("--draws", type=int, default=100, help="draws of random boundaries")
    align.add_argument("--output", help="append the table, with model and provenance columns, to this CSV")
    overlay.add_argument("--images", default=str(data_root() / "flickr8k" / "images"), help="folder of photos")
    overlay.add_argument("--num-images", type=int, default=64, help="first N photos (sorted names)")
    overlay.add_argument("--shown", type=int, default=6, help="photos drawn in overlays.png")
    overlay.add_argument("--grid", type=int, default=24, help="photos drawn in token_grid.png")
    overlay.add_argument("--out", required=True, help="folder for overlays.png, token_grid.png, tokens_hist.png")
    _methods_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "methods":
        return _methods(parser, args)
    if args.model is None and args.checkpoint is None:
        parser.error("give --model, --checkpoint, or both")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")

    model, preprocess, _ = load_model(args.model, args.checkpoint)
    if args.checkpoint is None:
        print(UNTRAINED, file=sys.stderr)
    if args.command == "align":
        table = alignment(model, preprocess, args.coco, args.num_images, args.batch_size, args.draws)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if args.output:
            provenance = {"model": _model_label(args.model, args.checkpoint), "checkpoint": args.checkpoint or "",
                          **run_info("cpu", "fp32", args.batch_size)}
            append_csv(repo_path(args.output), table.assign(**provenance).to_dict("records"))
        return table
    out = draw_overlays(model, preprocess, args.images, repo_path(args.out), args.num_images, args.shown, args.grid,
                        args.batch_size, note="" if args.checkpoint else RANDOM_WEIGHTS_NOTE)
    print(f"wrote overlays.png, token_grid.png, tokens_hist.png to {out}")
    return None


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.viz")

