"""Optimisation shared by pretraining (`dtplib.train`) and finetuning (`dtplib.finetune`).

- `make_optimizer`: AdamW with open_clip's parameter groups (no weight decay on gains, biases, logit_scale),
  fused by default (`--adamw-impl`); `use_adamw_impl` keeps that choice over a loaded optimizer state.
- `lr_at`: linear warm-up, then cosine decay to 0 or a constant rate, as a pure function of the step.
- `train_step`: one optimisation step: the learning rate, the forward under autocast, task loss + the tower's
  boundary-loss weight x its boundary prior, backward (through a GradScaler for fp16), gradient clipping and the
  update, with no host read: whether the loss was finite is a device tensor that also skips the update
  (the fused AdamW's `found_inf`), and the caller reads it with the step's logs every few steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common.runtime import autocast, unwrap
from ..tower.control import dtp_towers
from .config import ADAMW_IMPLS, TrainConfig


class NonFiniteLoss(FloatingPointError):
    """The loss of a step is NaN or infinite: the run stops before the update."""


def make_optimizer(model: torch.nn.Module, lr: float, wd: float, betas: tuple[float, float] = (0.9, 0.98),
                   eps: float = 1e-6, impl: str = TrainConfig.adamw_impl) -> torch.optim.AdamW:
    """AdamW; as open_clip, no weight decay on gains, biases, norms, embeddings' 1-d params and logit_scale.

    `impl` (--adamw-impl): "fused" runs one kernel over all parameters (CPU and CUDA); "torch" leaves the choice
    to torch: foreach on CUDA, and on a CPU a loop over the parameters. One update of ViT-B-32's 151M parameters
    on a 2-core Intel Xeon took 0.62 s looped (foreach the same) and 0.12 s fused; the 1x training step at batch
    8 takes 1.82 s fused. The two agree to rounding (1 ulp a step), not bit for bit."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"AdamW impl {impl!r}: expected one of {ADAMW_IMPLS}")
    def no_decay(name: str, param: torch.Tensor) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if impl == "fused" else None)


def use_adamw_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """After `load_state_dict`, which brings back the kernel the checkpoint was saved with: run `impl` instead (the
    run's --adamw-impl, which params.json records), with each step counter where that kernel keeps it (on the
    parameter's device when fused, on the CPU otherwise)."""
    fused = impl == "fused"
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True if fused else None), None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(param.device if fused else "cpu", torch.float32)


def lr_at(step: int, *, lr: float, warmup: int, total_steps: int, scheduler: str = "cosine") -> float:
    """Linear warm-up to `lr`, then cosine to 0 (or constant): open_clip's schedules as a pure function."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if scheduler == "const":
        return lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * lr


@dataclass
class StepResult:
    """What one `train_step` computed, as device tensors: the caller reads them to the host when it logs."""

    loss: torch.Tensor  # task loss + weight x boundary loss
    task_loss: torch.Tensor
    boundary_loss: torch.Tensor | None  # the prior, unweighted; None without a boundary predictor
    outputs: object  # what `compute` returned besides the task loss (logits, features, ...)
    finite: torch.Tensor  # 0-d bool: the loss was finite (where it was not, the update was skipped)
    segments: torch.Tensor | None  # B: segments per image of the DTP tower; None for a model that does not pool
    dropped: torch.Tensor | None  # 0-d: boundaries the tower's capacity cap dropped in this step


def _skips_update_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes a device flag that skips its update (`found_inf`, as GradScaler sets it): the
    fused AdamW does; torch's looped and foreach kernels do not."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               compute: Callable[[], tuple[torch.Tensor, object]], *, lr: float, step: int,
               device: torch.device, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None,
               grad_clip_norm: float | None = None, hint: str = "") -> StepResult:
    """One step: `compute()` runs the forward and returns (task loss, outputs); the DTP tower's prior, weighted by
    its `DTPConfig.boundary_loss_weight`, is added.

    No host read: a non-finite loss skips the update on the device (the fused AdamW's `found_inf`; a GradScaler
    skips it by itself) and is reported in `StepResult.finite`, which the caller reads with its logs and turns
    into NonFiniteLoss before any checkpoint is written. An optimizer that cannot skip on the device (torch's
    looped or foreach AdamW, `--adamw-impl torch`) is checked here instead, with one host read, and NonFiniteLoss
    is raised before the update; `hint` ends that message."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    towers = [t for t in dtp_towers(unwrap(model)) if t.pools]
    with autocast(precision, device):
        task_loss, outputs = compute()
        boundary = towers[0].last_boundary_loss if towers and towers[0].predictor is not None else None
        loss = task_loss + towers[0].dtp.boundary_loss_weight * boundary if boundary is not None else task_loss
    finite = torch.isfinite(loss.detach())
    device_skip = scaler is None and _skips_update_on_device(optimizer)
    if scaler is None and not device_skip and not finite:
        raise NonFiniteLoss(f"loss is {loss.item()} at step {step}: stopping{'; ' + hint if hint else ''}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)  # skips the update where the gradients are not finite
        scaler.update()
    else:
        loss.backward()
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        if device_skip:
            optimizer.found_inf = (~finite).float()  # the fused kernel leaves weights and moments as they were
        try:
            optimizer.step()
        finally:
            if device_skip:
                del optimizer.found_inf
    tower = towers[0] if towers else None
    return StepResult(loss.detach(), task_loss.detach(), boundary.detach() if boundary is not None else None,
                      outputs, finite, tower.last_segments if tower is not None else None,
                      tower.last_dropped if tower is not None else None)
