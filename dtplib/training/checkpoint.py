"""Models from training: a TrainConfig to a model, and a `dtplib.train` checkpoint back to its TrainConfig and
weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tower.clip import build_model, read_checkpoint, read_state_dict
from ..tower.model import DTPConfig
from .config import TrainConfig


def build_from_config(config: TrainConfig):
    """`build_model` with a training run's settings: exactly the model that run trained."""
    dtp = config.dtp
    if dtp is None:
        return build_model(config.model, force_patch_dropout=config.force_patch_dropout)
    settings = {f.name: getattr(dtp, f.name) for f in DTPConfig.settings() if f.name not in ("compression", "upsample")}
    return build_model(config.model, dtp.compression, dtp.upsample, force_patch_dropout=config.force_patch_dropout,
                       **settings)


def training_config(checkpoint: str | Path | dict) -> TrainConfig | None:
    """The TrainConfig a `dtplib.train` checkpoint records (older ones lack fields: defaults fill them), or None
    for a checkpoint that was not written by `dtplib.train`."""
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    stored = raw.get("args") if isinstance(raw, dict) else None
    if not isinstance(stored, dict) or not ({"model", "dtp"} <= stored.keys()  # the tower nested in the config
                                            or {"model", "compression", "upsample"} <= stored.keys()):  # flat: older
        return None
    return TrainConfig.from_dict(stored)


def load_trained(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess_val, tokenizer, TrainConfig) rebuilt from a `dtplib.train` checkpoint, with
    its weights: a tower that has no registered name (`--compression 3`, other DTP settings) comes back as it
    was trained."""
    raw = read_checkpoint(checkpoint)
    config = training_config(raw)
    if config is None:
        raise ValueError(f"{checkpoint} was not written by dtplib.train (no training flags): give a model name")
    model, _, preprocess, tokenizer = build_from_config(config)
    load_state_dict(model, read_state_dict(raw), source=checkpoint, name=config.model)
    return model.to(device).eval(), preprocess, tokenizer, config


def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, name: str) -> None:
    """`model.load_state_dict(state)` with an error that names the file and the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exn:
        raise RuntimeError(f"checkpoint {source} does not fit model {name}: {exn}") from None
