"""`python -m dtplib.flops`: the FLOPs table of a model at several compressions (`dtplib.measure.flops`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .common.cli import run_cli
from .common.files import atomic_write_text
from .common.images import load_photos
from .common.provenance import run_info
from .measure.flops import format_report, image_tower, patch_count, report, text_tower
from .measure.specs import REDUCTION_MODIFIERS, Spec, create_spec_model, parse_spec
from .tower.clip import check_model_name
from .tower.config import EXECUTIONS
from .tower.model import DTPVisionTransformer
from .training.config import check_image_size


def _parse_compressions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--compressions takes whole numbers >= 1 separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--compressions takes whole numbers >= 1 separated by commas, got {text!r}")
    return values


def _model_spec(text: str) -> Spec:
    """--model: an open_clip name, or NAME+METHOD (a reduction of the field, `dtplib.measure.specs`)."""
    if "+" not in text:
        check_model_name(text)
        return Spec(text)
    spec = parse_spec(text)
    if not spec.reduction:
        raise ValueError(f"--model {text!r}: the only modifier here is a reduction (+{', +'.join(REDUCTION_MODIFIERS)})"
                         "; boundaries and executions are rows of the report, patch dropout is the benchmark's")
    return spec


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m dtplib.flops", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="open_clip name, e.g. DTP-ViT-B-32-4x, DTP-ViT-Ti-8-64-10x-up, "
                        "ViT-B-32, or a DTP tower with a reduction of the field as the benchmark labels it: "
                        f"NAME+{'|+'.join(REDUCTION_MODIFIERS)}, e.g. DTP-ViT-Ti-8-64-4x+tome")
    parser.add_argument("--images", help="folder of photos for FLOPs at realised boundaries, e.g. "
                        "../shared/data/flickr8k/images")
    parser.add_argument("--num-images", type=int, default=64, help="first N photos of --images (sorted names)")
    parser.add_argument("--batch-size", type=int, help="batch that the padded cost is taken over (default: all)")
    parser.add_argument("--compressions", default="1,2,4,10", help="fixed ratios: a boundary every c patches")
    parser.add_argument("--execution", choices=(*EXECUTIONS, "both"), default="both",
                        help="realised cost of the packed path (each image at its own count), of the padded reference "
                             "path (each batch at its largest count), or both")
    parser.add_argument("--force-image-size", type=int, help="input size in pixels instead of the model's own "
                        "(CLIPA's low resolution): the patch grid, and so every count, follow it")
    parser.add_argument("--output", help="write the rows, with provenance columns, to this CSV")
    args = parser.parse_args(argv)

    try:  # every argument before any model is built
        spec = _model_spec(args.model)
        if args.force_image_size is not None:
            check_image_size(args.force_image_size, spec.name)
        compressions = _parse_compressions(args.compressions)
        if args.num_images < 1 or (args.batch_size is not None and args.batch_size < 1):
            raise ValueError("--num-images and --batch-size must be >= 1")
        if args.images is not None and not Path(args.images).is_dir():
            raise FileNotFoundError(f"image folder not found: {args.images}")
    except (ValueError, FileNotFoundError) as exn:
        parser.error(str(exn))

    if args.force_image_size is not None:
        spec = replace(spec, image_size=args.force_image_size)
    model, preprocess = create_spec_model(spec)
    try:
        tower = image_tower(model)
        text_tower(model)
        num_patches = patch_count(tower)
        if max(compressions) > num_patches:
            raise ValueError(f"--compressions: a boundary every c patches needs c <= {num_patches} (patches)")
        pools = isinstance(tower, DTPVisionTransformer) and tower.pools
        if args.images and not pools:
            print(f"{args.model} does not pool tokens: every image costs the same, --images is not needed")
        images = load_photos(args.images, args.num_images, preprocess)[0] if args.images and pools else None
    except (ValueError, FileNotFoundError) as exn:
        parser.error(str(exn))
    executions = EXECUTIONS if args.execution == "both" else (args.execution,)
    label = args.model + (f"+px{args.force_image_size}" if args.force_image_size else "")  # the benchmark's spec
    frame = report(model, label, compressions, images, args.batch_size, executions)
    print(format_report(frame))
    if args.output:
        batch = (args.batch_size or len(images)) if images is not None else 1
        frame = frame.assign(**run_info("cpu", "fp32", batch))
        atomic_write_text(args.output, frame.to_csv(index=False))
        print(f"wrote {args.output}")
    return frame


if __name__ == "__main__":
    run_cli(main, prog="python -m dtplib.flops")
