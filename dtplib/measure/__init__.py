"""Measuring models: accuracy, cost and the statistics over them.

- `evaluate`: zero-shot, image-text retrieval, held-out contrastive loss, linear probe, paired comparisons;
- `metrics`: top-k accuracy and retrieval recall on score matrices, per item (ties and NaN count against);
- `stats`: bootstrap and t intervals, the tests over seeds (paired t, TOST, Holm), the bootstrap over seeds and items;
- `flops`: analytic and fvcore MACs with attention counted;
- `bench`: step time and memory of models side by side, and `specs`, the model specs it takes;
- `tables`: the tables behind the notebooks" figures (variants, token flow, prior fits, run logs, efficiency).

Command lines: `python -m dtplib.evaluate`, `python -m dtplib.flops`, `python -m dtplib.bench`.
"""

__all__ = ["bench", "evaluate", "flops", "metrics", "specs", "stats", "tables"]
