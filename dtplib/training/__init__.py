"""Training: the settings of a run, the optimisation step, and models rebuilt from checkpoints.

- `config`: `TrainConfig`, every setting of `python -m dtplib.train` (the tower"s `DTPConfig` nested in it), its
  flags, checks and the `params.json` round trip;
- `optim`: AdamW parameter groups, the learning-rate schedule, the one training step;
- `checkpoint`: a model from a `TrainConfig`, a checkpoint back to its config and weights, and exported as a
  weights-only file;
- `runfolder`: a run's folder: atomic, finite checkpoints (open_clip_train's policy) and their RNG states, CSV,
  TensorBoard and wandb logs, the per-step log line.

The command line and the epoch loop are `dtplib.train`; finetuning is `dtplib.finetune`.
"""

__all__ = ["checkpoint", "config", "optim", "runfolder"]
