"""Handles on any model that holds DTP towers (a CLIP, a DDP wrapper, a tower): find the towers, trace what their
forwards decide, force boundaries or change settings for a block of code, fit the boundary prior alone, measure
the realised compression.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace

import torch
import torch.nn as nn

from ..common.progress import progress
from .config import STRUCTURAL_FIELDS, DTPConfig
from .model import DTPVisionTransformer, TraceRecord, token_budget


def dtp_towers(model: nn.Module) -> list[DTPVisionTransformer]:
    """All DTP towers inside a model (a CLIP, a DDP wrapper, or a tower itself)."""
    return [m for m in model.modules() if isinstance(m, DTPVisionTransformer)]


def get_tower(model: nn.Module) -> DTPVisionTransformer:
    towers = dtp_towers(model)
    if len(towers) != 1:
        raise ValueError(f"expected one DTP-ViT image tower in {type(model).__name__}, found {len(towers)}")
    return towers[0]


def last_boundary_loss(model: nn.Module) -> torch.Tensor | None:
    """The boundary loss of the tower's last forward (with its graph), or None for a model that does not pool."""
    towers = dtp_towers(model)
    if not towers or towers[0].predictor is None:
        return None
    return towers[0].last_boundary_loss


class Trace:
    """Records every forward of the traced towers; the attributes refer to the last forward."""

    def __init__(self):
        self.records: list[TraceRecord] = []

    def last(self) -> TraceRecord:
        if not self.records:
            raise RuntimeError("nothing traced yet: run the model inside `with dtplib.trace(model) as t:`")
        return self.records[-1]

    boundaries = property(lambda self: self.last().boundaries)
    segment_ids = property(lambda self: self.last().segment_ids)
    probs = property(lambda self: self.last().probs)
    tokens = property(lambda self: self.last().tokens)
    compression = property(lambda self: self.last().compression)
    boundary_loss = property(lambda self: self.last().boundary_loss)
    grid = property(lambda self: self.last().grid)
    budget = property(lambda self: self.last().budget)


@contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """`with trace(model) as t: model.encode_image(x)` records boundaries, segments and compression."""
    towers = dtp_towers(model)
    if not towers:
        raise ValueError(f"{type(model).__name__} has no DTP-ViT image tower to trace")
    result = Trace()
    for tower in towers:
        tower.tracers.append(result.records)
    try:
        yield result
    finally:
        for tower in towers:
            tower.tracers.remove(result.records)


@contextmanager
def forced_boundaries(model: nn.Module, boundaries: torch.Tensor | str | int) -> Iterator[None]:
    """Replace the predicted boundaries: "all" (each patch its own segment), an int c (a boundary every c
    patches: uniform pooling), or a B x N 0/1 tensor. The last patch always closes a segment."""
    tower = get_tower(model)
    if not tower.pools:
        raise ValueError("this tower does not pool tokens (compression=1); there are no boundaries to force")
    if tower.reducer is not None:
        raise ValueError(f"this tower reduces tokens by {tower.dtp.reduction!r}, not by boundaries: none to force")
    if isinstance(boundaries, str) and boundaries != "all":
        raise ValueError(f"forced boundaries must be 'all', an int or a B x N tensor, got {boundaries!r}")
    if isinstance(boundaries, bool) or (isinstance(boundaries, int) and not 1 <= boundaries <= tower.num_patches):
        raise ValueError(f"a boundary every c patches needs 1 <= c <= {tower.num_patches}, got {boundaries!r}")
    if isinstance(boundaries, torch.Tensor):
        if boundaries.ndim != 2 or boundaries.shape[1] != tower.num_patches:
            raise ValueError(f"forced boundaries must be B x {tower.num_patches}, got {tuple(boundaries.shape)}")
        if not torch.all((boundaries == 0) | (boundaries == 1)):
            raise ValueError("forced boundaries must be 0/1")
    previous, tower.forced = tower.forced, boundaries
    try:
        yield
    finally:
        tower.forced = previous


@contextmanager
def use_config(model: nn.Module, **changes) -> Iterator[DTPConfig]:
    """Change run-time fields of the tower's DTPConfig inside the block (execution, boundaries, temperature,
    boundary_loss_weight, ...); the fields that shape its parameters (`STRUCTURAL_FIELDS`) cannot change."""
    tower = get_tower(model)
    unknown = set(changes) - {f.name for f in fields(DTPConfig)}
    if unknown:
        raise ValueError(f"not DTPConfig fields: {sorted(unknown)}")
    if set(changes) & set(STRUCTURAL_FIELDS):
        raise ValueError(f"{sorted(set(changes) & set(STRUCTURAL_FIELDS))} shape the tower's parameters: build "
                         "another model instead")
    previous = tower.dtp
    tower.dtp = replace(previous, **changes)
    try:
        tower.dtp.validate(len(tower.blocks))
        yield tower.dtp
    finally:
        tower.dtp = previous


def use_execution(model: nn.Module, execution: str):
    """Run the tower's shortened layers "packed" or "padded" inside the block (e.g. to count the padded cost)."""
    return use_config(model, execution=execution)


def fit_boundary_prior(model: nn.Module, images: torch.Tensor, steps: int = 300, lr: float = 1e-2,
                       batch_size: int = 64, seed: int = 0) -> list[dict]:
    """Train only the boundary predictor on the binomial prior (the rest frozen); returns the history.

    A quick check that the prior alone steers the realised compression to its target, and a way to start
    a pretrained-ViT finetune at the intended token budget. The prior counts the boundaries of each batch
    (`boundary_loss`), so its optimum is N*p per image up to (p - 1/2) / batch_size.
    """
    tower = get_tower(model)
    if tower.predictor is None:
        raise ValueError("this tower has no boundary predictor (compression 1, or boundaries forced every c patches)")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(tower.predictor.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)  # settles the sampled rate at the end
    was_training = tower.training
    with torch.no_grad():  # the frozen pre-layers' output does not change: compute it once
        patches = tower.forward_pre(images)[:, 1:]  # B x N x D
    history = []
    tower.train()
    for step in progress(range(steps), desc="prior fit"):
        index = torch.randint(len(patches), (min(batch_size, len(patches)),), generator=generator)
        boundaries, _, loss = tower.boundaries_for(tower.predictor(patches[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append({"step": step, "boundary_loss": loss.item(),
                        "train_compression": token_budget(tower.num_patches, boundaries.detach().sum(-1))})
    tower.train(was_training)
    return history


def realised_compression(model: nn.Module, images: torch.Tensor) -> float:
    """Realised compression of the tower in its current mode: patches / mean segments per image (token budget)."""
    with torch.no_grad(), trace(model) as t:
        model.encode_image(images) if hasattr(model, "encode_image") else model(images)
    return t.budget
