"""Models from training: a TrainConfig to a model, a `dtplib.train` checkpoint back to its TrainConfig and weights,
and a checkpoint exported as a weights-only file (`dtplib.tower.weights`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from ..common.provenance import git_commit
from ..tower.clip import build_model, read_checkpoint, read_state_dict
from ..tower.config import DTPConfig
from ..tower.weights import weights_header, write_weights
from .config import TrainConfig


def build_from_config(config: TrainConfig):
    """`build_model` with a training run's settings: exactly the model that run trained."""
    dtp = config.dtp
    forced = {"force_patch_dropout": config.force_patch_dropout, "force_image_size": config.force_image_size}
    if dtp is None:
        return build_model(config.model, **forced)
    settings = {f.name: getattr(dtp, f.name) for f in DTPConfig.settings() if f.name not in ("compression", "upsample")}
    return build_model(config.model, dtp.compression, dtp.upsample, **forced, **settings)


def training_config(checkpoint: str | Path | dict) -> TrainConfig | None:
    """The TrainConfig a `dtplib.train` checkpoint records (older ones lack fields: defaults fill them), or None
    for a checkpoint that was not written by `dtplib.train`."""
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    stored = raw.get("args") if isinstance(raw, dict) else None
    if not isinstance(stored, dict) or not ({"model", "dtp"} <= stored.keys()  # the tower nested in the config
                                            or {"model", "compression", "upsample"} <= stored.keys()):  # flat: older
        return None
    return TrainConfig.from_dict(stored)


def load_trained(checkpoint: str | Path, device: str | torch.device = "cpu", force_image_size: int | None = None):
    """(model in eval mode, preprocess_val, tokenizer, TrainConfig) rebuilt from a `dtplib.train` checkpoint, with
    its weights: a tower that has no registered name (`--compression 3`, other DTP settings) comes back as it
    was trained, at the input size it was trained at (its --force-image-size), or at `force_image_size` with the
    position embedding resampled (the returned config says so)."""
    raw = read_checkpoint(checkpoint)
    config = training_config(raw)
    if config is None:
        raise ValueError(f"{checkpoint} was not written by dtplib.train (no training flags): give a model name")
    if force_image_size is not None:
        config = config.replace(force_image_size=force_image_size)
    model, _, preprocess, tokenizer = build_from_config(config)
    state = fit_position_embeddings(read_state_dict(raw), model)
    load_state_dict(model, state, source=checkpoint, name=config.model)
    return model.to(device).eval(), preprocess, tokenizer, config


def load_pretrained(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """--pretrained: a checkpoint's weights into the model a run trains (a `dtplib.train` checkpoint, a weights file
    or an open_clip state dict of the same model), the position embedding resampled to the model's grid."""
    state = fit_position_embeddings(read_state_dict(checkpoint), model)
    load_state_dict(model, state, source=checkpoint, name=type(model).__name__)


POSITION_EMBEDDINGS = ("visual.positional_embedding", "visual.trunk.pos_embed")  # open_clip's ViT; a timm trunk's


def fit_position_embeddings(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` with each image position embedding resampled to the model's patch grid where the two differ (weights
    trained at another --force-image-size): bicubic over the square grid with antialiasing, the class token's row
    kept, as open_clip's `resize_pos_embed` and timm's checkpoint filter do. Other tensors pass unchanged."""
    target = model.state_dict()
    fitted = dict(state)
    for key in POSITION_EMBEDDINGS:
        if key in state and key in target and state[key].shape != target[key].shape:
            fitted[key] = _resampled(state[key], target[key].shape, key)
    return fitted


def _resampled(embedding: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """A (1 x) T x D position embedding, 1 class row + a square grid, resampled to `shape`'s grid."""
    old, new = embedding.shape[-2] - 1, shape[-2] - 1
    if embedding.shape[-1] != shape[-1] or math.isqrt(old) ** 2 != old or math.isqrt(new) ** 2 != new:
        raise ValueError(f"{key}: cannot resample {tuple(embedding.shape)} to {tuple(shape)} (a class row and a "
                         "square grid of the same width)")
    grid = embedding.reshape(1, old + 1, embedding.shape[-1])  # 1 x T x D
    resampled = resample_abs_pos_embed(grid.float(), new_size=[math.isqrt(new)] * 2, old_size=[math.isqrt(old)] * 2,
                                       num_prefix_tokens=1)  # 1 x T' x D
    return resampled.to(embedding.dtype).reshape(shape)


def state_mismatch(model: torch.nn.Module, state: dict) -> str | None:
    """How `state` misses a strict load into `model`, in one line (None when it fits): the counts of missing keys,
    unexpected keys and shape mismatches, each with its first two names."""
    target = model.state_dict()
    missing = [key for key in target if key not in state]
    unexpected = [key for key in state if key not in target]
    shapes = [f"{key} {tuple(getattr(state[key], 'shape', ()))} vs {tuple(target[key].shape)}" for key in state
              if key in target and tuple(getattr(state[key], "shape", ())) != tuple(target[key].shape)]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", shapes)) if keys]
    return "; ".join(parts) or None


def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, name: str) -> None:
    """`model.load_state_dict(state)`, strict; a checkpoint of another model is a ValueError in one line that names
    the file, the model and the mismatch (`state_mismatch`); torch's own message is its cause (--debug)."""
    mismatch = state_mismatch(model, state)
    if mismatch:
        raise ValueError(f"checkpoint {source} does not fit model {name}: {mismatch}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exn:
        raise ValueError(f"checkpoint {source} does not fit model {name}: {str(exn).splitlines()[0]}") from exn


def export_weights(checkpoint: str | Path, out: str | Path, fp16: bool = False, overwrite: bool = False) -> Path:
    """Write a `dtplib.train` checkpoint's model as a weights-only file (`dtplib.tower.weights.write_weights`): the
    state dict after a strict load into the model its TrainConfig builds (so the file fits that model), the
    open_clip name and DTPConfig, and the source: run name and id, epoch, step, the training commit (the run's
    params.json) and the commit that exported it."""
    checkpoint = Path(checkpoint)
    raw = read_checkpoint(checkpoint)
    config = training_config(raw)
    if config is None:
        raise ValueError(f"{checkpoint}: not a checkpoint of python -m dtplib.train (no training flags)")
    if raw.get("mid_epoch"):
        raise ValueError(f"{checkpoint}: written mid-epoch (--max-steps); export a finished epoch's checkpoint")
    model = build_from_config(config)[0]
    load_state_dict(model, read_state_dict(raw), source=checkpoint, name=config.model_name)
    params = checkpoint.resolve().parent.parent / "params.json"  # <run>/checkpoints/<file>.pt -> <run>/params.json
    trained_at = json.loads(params.read_text()).get("commit", "unknown") if params.is_file() else "unknown"
    source = {"run": raw.get("name"), "run_id": raw.get("run_id"), "checkpoint": checkpoint.name,
              "epoch": raw.get("epoch"), "epochs": config.epochs, "step": raw.get("step"), "seed": config.seed,
              "train_data": config.train_data, "commit": trained_at, "exported_by": git_commit()}
    if config.force_image_size is not None:  # the open_clip name alone builds its own size: load_weights reads this
        source["force_image_size"] = config.force_image_size
    header = weights_header(config.model_name, config.dtp, source)
    header["open_clip_loads"] = header["open_clip_loads"] and config.force_image_size is None
    return write_weights(model.state_dict(), out, header, fp16=fp16, overwrite=overwrite)
