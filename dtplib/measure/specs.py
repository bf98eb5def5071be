"""Model specs of the benchmark: an open_clip name (dtplib's DTP-ViT names included) with optional modifiers.

`NAME[+pxSIZE][+pdRATE][+static|+packed|+padded][+uniform|+topk|+batch-topk]` or `NAME+METHOD`: `+px32` the input
size in pixels (open_clip's `force_image_size`: CLIPA's low resolution, fewer patches), `+pd0.5` FLIP-style patch
dropout (open_clip's `force_patch_dropout`), and for a DTP tower that pools its execution (`+packed`, the
host-planned path, or `+padded`, the reference; without one the static-capacity path, the towers' default) and
where its boundaries come from: learned by the threshold rule (no modifier; the capacity cap applies in training),
`+uniform` (a boundary every c patches), `+topk` (exactly ceil(N / c) segments per image) or `+batch-topk`
(B * ceil(N / c) over the batch). `+tome`, `+evit`, `+tokenlearner`, `+kmeans` or `+prune` replaces DTP's boundaries
by that method of the field at the same budget (`DTPConfig.reduction`, docs/reductions.md); such a tower has one
dense path, so it takes no other modifier. E.g. `DTP-ViT-B-32-4x+padded`, `DTP-ViT-B-32-4x+batch-topk`,
`DTP-ViT-Ti-8-64-4x+tome`, `ViT-B-32+pd0.75`, `DTP-ViT-Ti-8-64-1x+px32`. CSVs written before the static path
label their packed rows without a modifier (`DTP-ViT-B-32-4x`); their `execution` column says packed. Used by
`dtplib.bench` (what to time), `dtplib.flops`, `dtplib.measure.tables` and `dtplib.figures` (reading its rows back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import open_clip

from ..tower.clip import create_model_and_transforms, parse_dtp_name
from ..tower.config import EXECUTIONS, REDUCTIONS
from ..training.config import TrainConfig, check_image_size

BOUNDARY_MODIFIERS = ("uniform", "topk", "batch-topk")
LABELLED_EXECUTIONS = ("packed", "padded")  # static, the default, has no modifier
REDUCTION_MODIFIERS = tuple(r for r in REDUCTIONS if r != "dtp")  # +tome, +evit, ...: DTPConfig.reduction
GRAMMAR = ("NAME[+pxSIZE][+pdRATE][+static|+packed|+padded][+uniform|+topk|+batch-topk] or NAME+"
           + "|+".join(REDUCTION_MODIFIERS))


@dataclass(frozen=True)
class Spec:
    """An open_clip model name, optional input size and patch dropout (CLIPA- and FLIP-style peers) and, for a DTP
    tower that pools, either its execution and where its boundaries come from ("learned", "uniform", "topk" or
    "batch-topk"), or a method of the field that replaces the boundaries (`reduction`: "tome", "evit",
    "tokenlearner", "kmeans" or "prune")."""

    name: str
    patch_dropout: float | None = None
    execution: str = ""  # "static", "packed" or "padded" for a DTP tower that pools by boundaries, "" otherwise
    boundaries: str = ""  # "learned", "uniform", "topk" or "batch-topk" for a DTP tower that pools, "" otherwise
    image_size: int | None = None  # pixels, instead of the model's own (open_clip's force_image_size)
    reduction: str = ""  # a method of REDUCTION_MODIFIERS for a DTP tower that pools by it, "" otherwise

    @property
    def pools(self) -> bool:
        """A DTP tower with fewer tokens in its shortened layers than patches (by boundaries or by a method)."""
        return bool(self.boundaries or self.reduction)

    @property
    def label(self) -> str:
        modifiers = [f"px{self.image_size}"] if self.image_size else []
        modifiers += [f"pd{self.patch_dropout:g}"] if self.patch_dropout else []
        modifiers += [self.execution] if self.execution in LABELLED_EXECUTIONS else []
        modifiers += [self.boundaries] if self.boundaries in BOUNDARY_MODIFIERS else []
        modifiers += [self.reduction] if self.reduction else []
        return "+".join([self.name, *modifiers])

    @property
    def trained(self) -> Spec:
        """The spec without its execution, which does not change what a tower learns (a trained run's label)."""
        return replace(self, execution="")


def parse_spec(text: str, execution: str = "static") -> Spec:
    """NAME[+pxSIZE][+pdRATE][+static|+packed|+padded][+uniform|+topk|+batch-topk] or NAME+METHOD (a reduction of
    the field); `execution` is the default for a DTP tower that pools by boundaries."""
    name, *modifiers = text.strip().split("+")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r} in --models (see open_clip.list_models())")
    parsed = parse_dtp_name(name)
    pools = parsed is not None and parsed[1] > 1
    methods = [m for m in modifiers if m in REDUCTION_MODIFIERS]
    if methods:
        return _reduction_spec(text, name, parsed, modifiers, methods)
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
            raise ValueError(f"model spec {text!r}: expected {GRAMMAR} (e.g. ViT-B-32+pd0.5, "
                             f"DTP-ViT-B-32-4x+padded, DTP-ViT-B-32-4x+tome, ViT-B-16+px112), not +{modifier}")
    return Spec(name, rate, execution if pools else "", boundaries, size)


def _reduction_spec(text: str, name: str, parsed: tuple | None, modifiers: list[str], methods: list[str]) -> Spec:
    """NAME+METHOD: one method of the field on a DTP tower that pools, without upsampling, and nothing else."""
    if parsed is None or parsed[1] <= 1 or parsed[2]:
        raise ValueError(f"{text!r}: +{methods[0]} needs a DTP tower that pools without upsampling "
                         "(DTP-...-2x and up, not -1x nor -up)")
    if len(modifiers) > 1:
        raise ValueError(f"{text!r}: +{methods[0]} replaces the boundaries and runs one dense path: it takes no "
                         f"other modifier (got +{'+'.join(modifiers)})")
    return Spec(name, reduction=methods[0])


def create_spec_model(spec: Spec):
    """(model, preprocess_val) of a spec at initialisation: open_clip's model by name (with its patch dropout and
    input size), or the DTP tower rebuilt with the spec's reduction (`dtplib.tower.clip.create_model_and_transforms`:
    the same ViT and text tower as the name's, so a seeded build gives every method the same trunk)."""
    size = {"force_image_size": spec.image_size} if spec.image_size else {}
    if spec.reduction:
        arch, compression, upsample = parse_dtp_name(spec.name)
        model, _, preprocess = create_model_and_transforms(arch, compression, upsample, reduction=spec.reduction,
                                                           **size)
        return model, preprocess
    options = {"force_patch_dropout": spec.patch_dropout} if spec.patch_dropout else {}
    model, _, preprocess = open_clip.create_model_and_transforms(spec.name, **options, **size)
    return model, preprocess


def trained_spec(config: TrainConfig) -> Spec:
    """The spec of the tower a `dtplib.train` run trained, with its execution: what the benchmark would time."""
    name, dtp = config.model_name, config.dtp
    if dtp is None or dtp.compression <= 1:
        return Spec(name, config.force_patch_dropout or None, image_size=config.force_image_size)
    if dtp.reduction != "dtp":
        return Spec(name, image_size=config.force_image_size, reduction=dtp.reduction)
    boundaries = "uniform" if dtp.forced_boundaries else dtp.boundaries if dtp.boundaries in (
        "topk", "batch-topk") else "learned"
    return Spec(name, None, dtp.execution, boundaries, config.force_image_size)


def trained_label(config: TrainConfig) -> str:
    """What a `dtplib.train` run trained, as a spec label without the execution (which does not change what is
    learned): `DTP-ViT-Ti-8-64-4x`, `DTP-ViT-Ti-8-64-4x+uniform`, `DTP-ViT-Ti-8-64-4x+tome`,
    `DTP-ViT-Ti-8-64-1x+pd0.5`, `DTP-ViT-Ti-8-64-1x+px32`. Settings the spec grammar has no modifier for are appended
    as `+hilbert`, `+image-prior` and `+normalised-up`, so a run matches a benchmark row only when it trained the
    tower that row times."""
    spec = trained_spec(config)
    extras = []
    if spec.boundaries:
        dtp = config.dtp
        extras += ["hilbert"] if dtp.patch_order == "hilbert" else []
        extras += ["image-prior"] if not dtp.forced_boundaries and dtp.prior_scope == "image" else []
        extras += ["normalised-up"] if dtp.upsample and dtp.upsample_weights == "normalised" else []
    return "+".join([spec.trained.label, *extras])
