"""`python -m dtplib.evaluate`: zero-shot, retrieval, held-out loss and linear probe of one model, or a paired
comparison of two (`dtplib.measure.evaluate`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from open_clip import get_model_preprocess_cfg

from .common.cli import run_cli
from .common.provenance import run_info
from .measure.evaluate import (
    build_parser,
    check_data,
    compare_items,
    evaluate,
    format_comparison,
    format_table,
    load_model,
    log,
    write_items,
    write_output,
)
from .tower.clip import check_model_name, check_pretrained


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: load a model (or two, with --compare), run the evaluations asked for, print a table, optionally
    write the results (JSON, or CSV for a path ending in .csv). Returns the metrics, or with --compare
    {"a": metrics, "b": metrics, "differences": compare_items rows}."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if all(getattr(args, a) is None for a in ("zeroshot_data", "imagenet_val", "val_data", "probe_data")):
        parser.error("give at least one of --zeroshot-data, --imagenet-val, --val-data, --probe-data")
    for path in [args.checkpoint] + (args.compare or []):
        if path is not None and not os.path.isfile(path):
            parser.error(f"checkpoint not found: {path}")
    if args.model is None and args.checkpoint is None and args.compare is None:
        parser.error("give --model (and --pretrained), --checkpoint, or --compare A B")
    if args.items and args.compare:
        parser.error("--items writes one model's per-item scores: not with --compare")
    if args.bootstrap is not None and args.bootstrap < (1 if args.compare else 0):
        parser.error(f"--bootstrap must be at least {1 if args.compare else 0}, got {args.bootstrap}")
    try:  # every path, the name and the weights, before the model is built
        check_data(args.zeroshot_data, args.imagenet_val, args.val_data, args.zeroshot_skip_empty, args.probe_data)
        if args.model is not None:
            check_model_name(args.model)
        if args.pretrained is not None:
            check_pretrained(args.model, args.pretrained)
    except (FileNotFoundError, ValueError, RuntimeError) as exn:
        parser.error(str(exn))

    options = dict(zeroshot_data=args.zeroshot_data, imagenet_val=args.imagenet_val, val_data=args.val_data,
                   probe_data=args.probe_data, batch_size=args.batch_size, device=args.device,
                   max_per_class=args.max_per_class, max_images=args.max_images, workers=args.workers,
                   skip_empty_classes=args.zeroshot_skip_empty, loss_batch_size=args.loss_batch_size,
                   probe_per_class=args.probe_train_per_class, probe_test_per_class=args.probe_test_per_class,
                   seed=args.seed)
    record = {"model": args.model, "checkpoint": args.checkpoint, "pretrained": args.pretrained,
              "zeroshot_data": args.zeroshot_data, "imagenet_val": args.imagenet_val, "val_data": args.val_data,
              "probe_data": args.probe_data, "max_per_class": args.max_per_class, "max_images": args.max_images,
              "probe_train_per_class": args.probe_train_per_class, "probe_test_per_class": args.probe_test_per_class,
              "loss_batch_size": args.loss_batch_size, "seed": args.seed, "force_image_size": args.force_image_size,
              **run_info(args.device, "fp32", args.batch_size)}
    if args.compare:
        resamples = 1000 if args.bootstrap is None else args.bootstrap
        scored = []
        for checkpoint in args.compare:
            model, preprocess, tokenizer = load_model(args.model, checkpoint, None, args.device,
                                                      args.force_image_size)
            scored.append(evaluate(model, preprocess, tokenizer, per_item=True, **options))
            del model
        (metrics_a, items_a), (metrics_b, items_b) = scored
        rows = compare_items(metrics_a, items_a, metrics_b, items_b, resamples, seed=args.seed)
        print(format_comparison(rows, *args.compare))
        if args.output:
            record = {**record, "checkpoint": None, "checkpoint_a": args.compare[0], "checkpoint_b": args.compare[1],
                      "bootstrap": resamples}
            write_output(args.output, {**record, "metrics_a": metrics_a, "metrics_b": metrics_b,
                                       "differences": rows}, rows)
        return {"a": metrics_a, "b": metrics_b, "differences": rows}

    model, preprocess, tokenizer = load_model(args.model, args.checkpoint, args.pretrained, args.device,
                                              args.force_image_size)
    metrics, items = evaluate(model, preprocess, tokenizer, bootstrap=args.bootstrap or 0, per_item=True, **options)
    print(format_table(metrics))
    if args.items:
        write_items(args.items, items)
    if args.output:  # image_size: what the model saw (its trained size, or --force-image-size)
        height, width = get_model_preprocess_cfg(model)["size"]
        record = {**record, "image_size": height if height == width else [height, width]}
        write_output(args.output, {**record, "bootstrap": args.bootstrap or 0, "metrics": metrics}, [metrics])
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    run_cli(main, prog="python -m dtplib.evaluate")

