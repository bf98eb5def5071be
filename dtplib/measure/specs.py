"""Model specs of the benchmark: an open_clip name (dtplib's DTP-ViT names included) with optional modifiers.

`NAME[+pxSIZE][+pdRATE][+static|+packed|+padded][+uniform|+topk|+batch-topk]`: `+px32` the input size in pixels
(open_clip's `force_image_size`: CLIPA's low resolution, fewer patches), `+pd0.5` FLIP-style patch dropout
(open_clip's `force_patch_dropout`), and for a DTP tower that pools its execution (`+packed`, the host-planned
path, or `+padded`, the reference; without one the static-capacity path, the towers' default) and where its
boundaries come from: learned by the threshold rule (no modifier; the capacity cap applies in training), `+uniform`
(a boundary every c patches), `+topk` (exactly ceil(N / c) segments per image) or `+batch-topk` (B * ceil(N / c)
over the batch). E.g. `DTP-ViT-B-32-4x+padded`, `DTP-ViT-B-32-4x+batch-topk`, `ViT-B-32+pd0.75`,
`DTP-ViT-Ti-8-64-1x+px32`. CSVs written
before the static path label their packed rows without a modifier (`DTP-ViT-B-32-4x`); their `execution` column
says packed. Used by `dtplib.bench` (what to time) and `dtplib.figures.plots` (reading its rows back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import open_clip

from ..tower.clip import parse_dtp_name
from ..tower.config import EXECUTIONS
from ..training.config import TrainConfig, check_image_size

BOUNDARY_MODIFIERS = ("uniform", "topk", "batch-topk")
LABELLED_EXECUTIONS = ("packed", "padded")  # static, the default, has no modifier


@dataclass(frozen=True)
class Spec:
    """An open_clip model name, optional input size and patch dropout (CLIPA- and FLIP-style peers) and, for a DTP
    tower that pools, its execution and where its boundaries come from ("learned", "uniform", "topk" or
    "batch-topk")."""

    name: str
    patch_dropout: float | None = None
    execution: str = ""  # "static", "packed" or "padded" for a DTP tower that pools, "" otherwise
    boundaries: str = ""  # "learned", "uniform", "topk" or "batch-topk" for a DTP tower that pools, "" otherwise
    image_size: int | None = None  # pixels, instead of the model's own (open_clip's force_image_size)

    @property
    def pools(self) -> bool:
        return bool(self.boundaries)

    @property
    def label(self) -> str:
        modifiers = [f"px{self.image_size}"] if self.image_size else []
        modifiers += [f"pd{self.patch_dropout:g}"] if self.patch_dropout else []
        modifiers += [self.execution] if self.execution in LABELLED_EXECUTIONS else []
        modifiers += [self.boundaries] if self.boundaries in BOUNDARY_MODIFIERS else []
        return "+".join([self.name, *modifiers])


def parse_spec(text: str, execution: str = "static") -> Spec:
    """NAME[+pxSIZE][+pdRATE][+static|+packed|+padded][+uniform|+topk|+batch-topk]; `execution` is the default for a
    DTP tower that pools."""
    name, *modifiers = text.strip().split("+")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r} in --models (see open_clip.list_models())")
    parsed = parse_dtp_name(name)
    pools = parsed is not None and parsed[1] > 1
    rate, size, boundaries = None, None, "learned" if pools else ""
    for modifier in modifiers:
        if re.fullmatch(r"px[0-9]+", modifier):
            size = int(modifier[2:])
            check_image_size(size, name)
        elif re.fullmatch(r"pd[0-9.]+", modifier):
            rate = float(modifier[2:])
            if not 0 < rate < 1:
                raise ValueError(f"patch dropout in {text!r} must be in (0, 1)")
            if pools:
                raise ValueError(f"{text!r}: patch dropout is for towers that do not pool (compression 1)")
        elif modifier in (*EXECUTIONS, *BOUNDARY_MODIFIERS):
            if not pools:
                raise ValueError(f"{text!r}: +{modifier} needs a DTP tower that pools (DTP-...-2x and up)")
            execution = modifier if modifier in EXECUTIONS else execution
            boundaries = modifier if modifier in BOUNDARY_MODIFIERS else boundaries
        else:
            raise ValueError(f"model spec {text!r}: expected NAME[+pxSIZE][+pdRATE][+static|+packed|+padded]"
                             f"[+uniform|+topk|+batch-topk] (e.g. ViT-B-32+pd0.5, DTP-ViT-B-32-4x+padded, "
                             f"ViT-B-16+px112), not +{modifier}")
    return Spec(name, rate, execution if pools else "", boundaries, size)


def trained_spec(config: TrainConfig) -> Spec:
    """The spec of the tower a `dtplib.train` run trained, with its execution: what the benchmark would time."""
    name, dtp = config.model_name, config.dtp
    if dtp is None or dtp.compression <= 1:
        return Spec(name, config.force_patch_dropout or None, image_size=config.force_image_size)
    boundaries = "uniform" if dtp.forced_boundaries else dtp.boundaries if dtp.boundaries in (
        "topk", "batch-topk") else "learned"
    return Spec(name, None, dtp.execution, boundaries, config.force_image_size)


def trained_label(config: TrainConfig) -> str:
    """What a `dtplib.train` run trained, as a spec label without the execution (which does not change what is
    learned): `DTP-ViT-Ti-8-64-4x`, `DTP-ViT-Ti-8-64-4x+uniform`, `DTP-ViT-Ti-8-64-1x+pd0.5`,
    `DTP-ViT-Ti-8-64-1x+px32`. Settings the spec
    grammar has no modifier for are appended as `+hilbert`, `+image-prior` and `+normalised-up`, so a run matches
    a benchmark row only when it trained the tower that row times."""
    spec = trained_spec(config)
    extras = []
    if spec.pools:
        dtp = config.dtp
        extras += ["hilbert"] if dtp.patch_order == "hilbert" else []
        extras += ["image-prior"] if not dtp.forced_boundaries and dtp.prior_scope == "image" else []
        extras += ["normalised-up"] if dtp.upsample and dtp.upsample_weights == "normalised" else []
    return "+".join([Spec(spec.name, spec.patch_dropout, "", spec.boundaries, spec.image_size).label, *extras])
