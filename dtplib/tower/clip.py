"""open_clip and timm registration of DTP-ViT, and weight transfer from a plain CLIP ViT.

Route: each variant is a timm model name (`@register_model`-style entrypoint building a
`DTPVisionTransformer`), and an open_clip config points at it with `timm_model_name`, `timm_pool: ""` and
`timm_proj: "linear"` (open_clip's bias-free projection, the same as a CLIP ViT's `proj`). open_clip 3.3.0
has no `timm_model_kwargs`, so there is one timm name per variant; other hyper-parameters are reached by
building the named model and swapping `model.visual.trunk` (`create_model_and_transforms(**overrides)`).

The open_clip configs are json files, one per name, in `model_configs/` next to this module (package data, as
open_clip ships its own), added at import through open_clip's public `add_model_config`, so
`open_clip.create_model_and_transforms(name)`, `open_clip.get_tokenizer(name)` and `open_clip.list_models()` work
unchanged. The table below stays the single source of truth: `write_open_clip_configs` writes the files from it, and
a test keeps them equal.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import open_clip
import timm
import torch
from open_clip.pretrained import download_pretrained
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import _convert_openai_clip

from .config import STRUCTURAL_FIELDS, DTPConfig
from .control import get_tower
from .model import DTPVisionTransformer, clip_pretrained_cfg

TEXT_B = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
TEXT_TI = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4}


@dataclass(frozen=True)
class Arch:
    """A ViT size: the plain open_clip peer and the DTP tower share these numbers."""

    name: str  # open_clip name of the plain ViT peer
    timm_prefix: str  # prefix of the timm names of the DTP towers
    image_size: int
    patch_size: int
    width: int
    depth: int
    embed_dim: int  # CLIP embedding size
    text: dict
    split: tuple[int, int]  # pre_layers, short_layers without upsampling
    split_up: tuple[int, int, int]  # pre, short, post with upsampling

    @property
    def heads(self) -> int:
        return self.width // 64  # open_clip's default head width


ARCHS = {
    "ViT-B-32": Arch("ViT-B-32", "dtp_vit_base_patch32_clip_224", 224, 32, 768, 12, 512, TEXT_B, (2, 10), (2, 8, 2)),
    "ViT-B-16": Arch("ViT-B-16", "dtp_vit_base_patch16_clip_224", 224, 16, 768, 12, 512, TEXT_B, (2, 10), (2, 8, 2)),
    "ViT-Ti-8-64": Arch("ViT-Ti-8-64", "dtp_vit_tiny_patch8_clip_64", 64, 8, 192, 6, 128, TEXT_TI, (2, 4), (2, 2, 2)),
}
COMPRESSIONS = (1, 2, 4, 10)  # registered ratios; any other ratio >= 1 via create_model_and_transforms


def variant_names() -> list[str]:
    """Every open_clip name this module registers (DTP variants and the Ti peer)."""
    names = []
    for arch in ARCHS.values():
        for c in COMPRESSIONS:
            names.append(dtp_name(arch.name, c, False))
            if c > 1:
                names.append(dtp_name(arch.name, c, True))
    return names + ["ViT-Ti-8-64"]


def dtp_name(arch: str, compression: float, upsample: bool) -> str:
    """open_clip name of a DTP variant: ViT-B-32, 4, False -> DTP-ViT-B-32-4x."""
    return f"DTP-{arch}-{compression:g}x" + ("-up" if upsample else "")


def parse_dtp_name(name: str) -> tuple[str, float, bool] | None:
    """Inverse of `dtp_name`: DTP-ViT-B-32-4x-up -> ("ViT-B-32", 4.0, True); None when it is not such a name."""
    stem, _, ratio = name.removeprefix("DTP-").removesuffix("-up").rpartition("-")
    if not name.startswith("DTP-") or stem not in ARCHS or not ratio.endswith("x"):
        return None
    try:
        return stem, float(ratio[:-1]), name.endswith("-up")
    except ValueError:
        return None


def tower_config(arch: Arch, compression: float, upsample: bool) -> DTPConfig:
    if upsample:
        pre, short, post = arch.split_up
        return DTPConfig(compression=compression, pre_layers=pre, short_layers=short, post_layers=post,
                         upsample=True)
    return DTPConfig(compression=compression, pre_layers=arch.split[0], short_layers=arch.split[1])


def _build_tower(arch: Arch, dtp: DTPConfig, **kwargs) -> DTPVisionTransformer:
    return DTPVisionTransformer(dtp=dtp, img_size=arch.image_size, patch_size=arch.patch_size,
                                embed_dim=arch.width, depth=arch.depth, num_heads=arch.heads, **kwargs)


default_cfgs: dict[str, dict] = {}  # timm's registry reads a module's `default_cfgs` when it registers a name


def _timm_entrypoint(arch: Arch, compression: int, upsample: bool):
    """A timm entrypoint for one variant (timm registers a function by its __name__ and __module__), and its
    complete pretrained_cfg in `default_cfgs` (`dtplib.tower.model.clip_pretrained_cfg`: CLIP's preprocessing at the
    arch's fixed size, no timm weights). timm's keyword arguments override the arch's sizes (img_size, patch_size,
    embed_dim, depth, num_heads; `dtp` a DTPConfig); features_only=True wraps the tower in timm's FeatureGetterNet,
    which reads `forward_intermediates` (fx and hook feature extraction cannot follow the merged path)."""
    name = f"{arch.timm_prefix}_{compression}x" + ("_up" if upsample else "")
    default_cfgs[name] = clip_pretrained_cfg(arch.image_size)

    def entrypoint(pretrained: bool = False, **kwargs) -> DTPVisionTransformer:
        if pretrained:
            raise ValueError("DTP-ViT has no timm pretrained weights; load a CLIP ViT with dtplib.load_vit_weights")
        feature_cls = kwargs.get("feature_cls", "getter")
        if kwargs.get("features_only") and not (isinstance(feature_cls, str) and feature_cls.lower() == "getter"):
            raise ValueError(f"DTP-ViT features come from forward_intermediates (feature_cls='getter'), not "
                             f"{feature_cls!r}: fx tracing and block hooks cannot follow a token count that depends "
                             "on the image")
        model_args = {"img_size": arch.image_size, "patch_size": arch.patch_size, "embed_dim": arch.width,
                      "depth": arch.depth, "num_heads": arch.heads, **kwargs}
        overlay = {**(model_args.pop("pretrained_cfg_overlay", None) or {}),
                   "input_size": (3, *to_2tuple(model_args["img_size"]))}
        model_args["dtp"] = model_args.get("dtp") or tower_config(arch, compression, upsample)
        return build_model_with_cfg(DTPVisionTransformer, name, pretrained=False, pretrained_cfg_overlay=overlay,
                                    feature_cfg={"out_indices": model_args.pop("out_indices", 3),
                                                 "feature_cls": "getter"}, **model_args)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = entrypoint.__name__
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"DTP-ViT tower, {arch.name} sizes, {compression}x target compression."
    return entrypoint


def _open_clip_config(arch: Arch, timm_name: str | None) -> dict:
    if timm_name is None:  # the plain open_clip ViT
        vision = {"image_size": arch.image_size, "layers": arch.depth, "width": arch.width,
                  "patch_size": arch.patch_size, "head_width": 64}
    else:
        vision = {"image_size": arch.image_size, "timm_model_name": timm_name, "timm_model_pretrained": False,
                  "timm_pool": "", "timm_proj": "linear"}
    return {"embed_dim": arch.embed_dim, "vision_cfg": vision, "text_cfg": dict(arch.text)}


MODEL_CONFIGS = Path(__file__).parent / "model_configs"  # {open_clip name}.json, written by write_open_clip_configs


def open_clip_configs() -> dict[str, dict]:
    """{open_clip name: config} for every name in `variant_names()`: what `model_configs/` must hold."""
    configs = {}
    for arch in ARCHS.values():
        for c in COMPRESSIONS:
            for up in (False, True) if c > 1 else (False,):
                configs[dtp_name(arch.name, c, up)] = _open_clip_config(arch, _timm_entrypoint(arch, c, up).__name__)
    configs["ViT-Ti-8-64"] = _open_clip_config(ARCHS["ViT-Ti-8-64"], None)
    return configs


def write_open_clip_configs(folder: str | Path = MODEL_CONFIGS) -> list[Path]:
    """Write `open_clip_configs()` as open_clip's json files (one per name, open_clip's 4-space layout) into
    `folder`, replacing what is there: run after changing ARCHS, COMPRESSIONS or a config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):
        stale.unlink()
    written = []
    for name, config in open_clip_configs().items():
        written.append(folder / f"{name}.json")
        written[-1].write_text(json.dumps(config, indent=4) + "\n")
    return written


def register() -> None:
    """Add every variant to timm's registry and open_clip's (idempotent; done at `import dtplib`). open_clip's side
    is its public `add_model_config(MODEL_CONFIGS)`: it reads every json file of the folder into its registry."""
    module = sys.modules[__name__]
    for arch in ARCHS.values():
        for c in COMPRESSIONS:
            for up in (False, True) if c > 1 else (False,):
                fn = _timm_entrypoint(arch, c, up)
                if not timm.is_model(fn.__name__):
                    setattr(module, fn.__name__, fn)
                    register_model(fn)
    if any(open_clip.get_model_config(name) != config for name, config in open_clip_configs().items()):
        open_clip.add_model_config(MODEL_CONFIGS)


_OPEN_CLIP_KWARGS = {"pretrained", "precision", "device", "jit", "force_quick_gelu", "force_custom_text",
                     "force_patch_dropout", "force_image_size", "force_preprocess_cfg", "cache_dir", "output_dict",
                     "aug_cfg", "image_mean", "image_std", "image_interpolation", "image_resize_mode",
                     "force_context_length", "pretrained_image", "pretrained_hf", "load_weights"}


def create_model_and_transforms(arch: str = "ViT-B-32", compression: float = 4, upsample: bool = False,
                                **overrides):
    """open_clip's `(model, preprocess_train, preprocess_val)` for a DTP-ViT CLIP.

    `overrides` may hold DTPConfig fields (pre_layers, temperature, pool, ...) and open_clip's
    create_model_and_transforms keyword arguments (precision, device, ...). compression=1 is the plain ViT
    on the same code path. Any ratio >= 1 works; 1, 2, 4 and 10 also have registered names.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    dtp_fields = {f.name for f in fields(DTPConfig)}
    unknown = set(overrides) - dtp_fields - _OPEN_CLIP_KWARGS
    if unknown:
        raise ValueError(f"unknown keyword(s) {sorted(unknown)}: not a DTPConfig field nor an open_clip option")
    spec = ARCHS[arch]
    dtp = tower_config(spec, compression, upsample)
    dtp_overrides = {k: v for k, v in overrides.items() if k in dtp_fields}
    dtp = DTPConfig(**{**dtp.__dict__, **dtp_overrides})
    dtp.validate(spec.depth)
    base_compression = compression if compression in COMPRESSIONS else (2 if compression > 1 else 1)
    base_upsample = upsample if base_compression > 1 else False
    open_clip_kwargs = {k: v for k, v in overrides.items() if k in _OPEN_CLIP_KWARGS}
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        dtp_name(arch, base_compression, base_upsample), **open_clip_kwargs)
    tower = get_tower(model)
    if any(getattr(dtp, f) != getattr(tower.dtp, f) for f in STRUCTURAL_FIELDS):  # no registered name: rebuild
        new = _build_tower(spec, dtp).to(device=tower.pos_embed.device, dtype=tower.pos_embed.dtype)
        if new.patch_embed.img_size != tower.patch_embed.img_size:  # force_image_size
            new.set_input_size(tower.patch_embed.img_size)
        new.load_state_dict(tower.state_dict(), strict=False)  # identical ViT parameters; the predictor is new
        model.visual.trunk = new
    else:  # fields read at run time only: no second build, so the random stream is the registered model's
        tower.dtp = dtp
    return model, preprocess_train, preprocess_val


# ----------------------------------------------------------------------------------------------------------
# Models by name, from training flags, from a training checkpoint


def _close_model_names(name: str, cutoff: float = 0.4) -> list[str]:
    """A few registered open_clip names (dtplib's included) that look like `name`, for error messages."""
    return difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=cutoff)


def check_model_name(name: str) -> None:
    """ValueError naming a few close open_clip names when `name` is not registered (hf-hub:/local-dir: pass)."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; close names: {_close_model_names(name, 0.5) or 'none'} "
                         "(all: open_clip.list_models())")


def check_pretrained(name: str, pretrained: str) -> None:
    """Make sure the weights of a pretrained tag are on disk (fetching them when online), with a clear error."""
    if os.path.isfile(pretrained):
        return
    config = open_clip.get_pretrained_cfg(name, pretrained)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"pretrained {pretrained!r} is neither a file nor a tag of {name} (tags: {tags or 'none'})")
    try:
        download_pretrained(config)  # the local cache when HF_HUB_OFFLINE=1
    except Exception as exn:  # huggingface_hub, urllib and open_clip each raise their own kinds
        source = f"Hugging Face repo {config['hf_hub'].rstrip('/')}" if config.get("hf_hub") else config.get("url")
        reason = str(exn).splitlines()[0][:200] if str(exn) else type(exn).__name__
        raise RuntimeError(
            f"pretrained weights {name} / {pretrained} ({source}) are not on disk and could not be fetched "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}; {reason}). Get them on a machine with "
            f"network: python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\", "
            "then copy its Hugging Face cache (~/.cache/huggingface/hub) here, or pass the weights file's path "
            "as --pretrained.") from None


def resolve_model(model: str, compression: float | None = None, upsample: bool = False,
                  ) -> tuple[str, float | None, bool]:
    """(arch or open_clip name, compression or None for a plain open_clip model, upsample) from the training
    flags --model, --compression and --upsample; contradictions and unknown names raise ValueError."""
    if model.startswith("DTP-ViT-"):
        parsed = parse_dtp_name(model)
        if parsed is None:
            raise ValueError(f"unknown DTP model {model!r}; registered: {_close_model_names(model)}")
        stem, named_compression, named_upsample = parsed
        if compression is not None and compression != named_compression:
            raise ValueError(f"--model {model} means compression {named_compression:g}, but --compression "
                             f"{compression:g} was given; pass one of them")
        if upsample and not named_upsample:
            raise ValueError(f"--upsample contradicts --model {model} (use {model}-up)")
        return stem, named_compression, named_upsample
    if compression is not None:
        if model not in ARCHS:
            raise ValueError(f"--compression needs --model to be one of {sorted(ARCHS)}, got {model!r}")
        return model, compression, upsample
    if upsample:
        raise ValueError("--upsample needs a DTP model: give --compression or a DTP-ViT-* name")
    if model not in open_clip.list_models():
        raise ValueError(f"unknown model {model!r}; close names: {_close_model_names(model)}")
    return model, None, False


def _open_clip_name(model: str, compression: float | None = None, upsample: bool = False) -> str:
    """The open_clip name of what the training flags build (`DTP-ViT-B-32-4x`, or the peer's own name)."""
    arch, compression, upsample = resolve_model(model, compression, upsample)
    return arch if compression is None else dtp_name(arch, compression, upsample)


def build_model(model: str, compression: float | None = None, upsample: bool = False, *,
                force_patch_dropout: float | None = None, force_image_size: int | None = None, **dtp_fields):
    """(model, preprocess_train, preprocess_val, tokenizer) for the training flags: a DTP-ViT CLIP (an arch with
    a compression, or a DTP-ViT-* name; `dtp_fields` are DTPConfig fields such as boundary_loss_weight,
    boundaries, execution), or any open_clip model as the peer. `force_patch_dropout` (FLIP) and
    `force_image_size` (CLIPA's low resolution: the tower's grid and both preprocessings at that size) are
    open_clip's."""
    arch, compression, upsample = resolve_model(model, compression, upsample)
    forced = {"force_patch_dropout": force_patch_dropout, "force_image_size": force_image_size}
    options = {k: v for k, v in forced.items() if v is not None}
    if compression is None:
        if dtp_fields:
            raise ValueError(f"{sorted(dtp_fields)} need a DTP model; {arch} is a plain open_clip model")
        built, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(arch, **options)
        return built, preprocess_train, preprocess_val, open_clip.get_tokenizer(arch)
    built, preprocess_train, preprocess_val = create_model_and_transforms(arch, compression, upsample,
                                                                          **dtp_fields, **options)
    tokenizer = open_clip.get_tokenizer(ARCHS[arch].name)  # the DTP variants share the peer's text tower
    return built, preprocess_train, preprocess_val, tokenizer










# ----------------------------------------------------------------------------------------------------------
# Loading weights


@dataclass
class LoadReport:
    """What `load_vit_weights` copied into the model and what it left at initialisation."""

    loaded: list[str]
    left: list[str]


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict (torch.load with weights_only=True, or safetensors). A zero-byte, cut short or
    foreign file is a ValueError that names it ("empty or not a checkpoint"), not torch's bare EOFError; a pickle
    that weights_only refuses is named with the refused global (`unreadable_reason`), never loaded otherwise. The
    ValueError's cause is torch's own error, whole (`--debug` shows it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty or not a checkpoint (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except SafetensorError as exn:
                raise ValueError(str(exn)) from exn
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exn:
        raise ValueError(f"{path}: {unreadable_reason(exn)}") from exn  # --debug: torch's whole message


def unreadable_reason(exn: BaseException) -> str:
    """Why torch.load could not read a file, in one line: a file that `weights_only=True` refuses (a pickle that
    names a function or class, which a plain `torch.load` would run: the way a malicious file runs code) keeps the
    refused global and the warning; anything else is "empty or not a checkpoint (<torch's first words>)"."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exn)).split()) or type(exn).__name__
    if isinstance(exn, pickle.UnpicklingError) and "weights_only" in text:
        found = re.search(r"WeightsUnpickler error: (.*?)(?= Please use| Check the documentation|$)", text)
        detail = found.group(1) if found else text[:200]
        return (f"not a checkpoint that loads safely: torch.load(weights_only=True) refused it ({detail[:200]}); "
                "loading it without weights_only could run arbitrary code, so it is not loaded")
    return f"empty or not a checkpoint ({text[:200]})"


def read_state_dict(checkpoint: str | Path | dict) -> dict[str, torch.Tensor]:
    """A state dict from an open_clip checkpoint file or dict (optional `state_dict` key, `module.` prefix); anything
    else (a pickle of other objects, a dict of settings) is a ValueError naming the file."""
    source = f"{checkpoint}: " if isinstance(checkpoint, (str, Path)) else ""
    if isinstance(checkpoint, (str, Path)):
        checkpoint = read_checkpoint(checkpoint)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}a checkpoint must be a state dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    odd = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)) if isinstance(state, dict) \
        else [type(state).__name__]
    if odd:
        raise ValueError(f"{source}not a state dict of tensors (names to weights): {', '.join(odd[:3])}"
                         f"{', ...' if len(odd) > 3 else ''} {'are' if len(odd) > 1 else 'is'} not a tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_vit_weights(model: torch.nn.Module, checkpoint: str | Path | dict) -> LoadReport:
    """Load a plain CLIP ViT (open_clip layout) into a DTP-ViT CLIP; the boundary predictor stays new.

    The text tower and logit scale load as they are; every tensor of the ViT image tower is mapped onto the
    DTP tower (conv1 -> patch_embed.proj, resblocks -> blocks, ln_pre/ln_post -> norm_pre/norm, proj -> the
    open_clip head). Raises ValueError if a ViT tensor has no place or a shape differs.
    """
    state = read_state_dict(checkpoint)
    tower = get_tower(model)
    visual_prefix = next(name for name, module in model.named_modules() if module is tower).removesuffix("trunk")
    if "visual.proj" not in state or "visual.conv1.weight" not in state:
        raise ValueError("checkpoint has no open_clip ViT image tower (visual.conv1.weight / visual.proj missing)")
    mapped = {k: v for k, v in state.items() if not k.startswith("visual.")}
    converted = _convert_openai_clip(state, tower, prefix="visual.")
    converted.pop("head.bias")  # timm's head has a bias; open_clip's projection has none
    mapped[f"{visual_prefix}head.proj.weight"] = converted.pop("head.weight")
    mapped.update({f"{visual_prefix}trunk.{k}": v for k, v in converted.items()})

    return _place_weights(model, mapped, hint="is it a ViT of the same size and depth?")


def load_dtp_weights(model: torch.nn.Module, checkpoint: str | Path | dict) -> LoadReport:
    """Load a DTP-ViT CLIP's weights (any ratio, e.g. the plain DTP-1x of `dtplib.train`) into another of the
    same size: every tensor of the source must fit, and only the target's boundary predictor may be left out."""
    state = read_state_dict(checkpoint)
    target = model.state_dict()
    mapped = {k: v for k, v in state.items() if k in target or ".predictor." not in k}  # a 4x source into a 1x
    return _place_weights(model, mapped, hint="is it the same arch and layer split?")


def _place_weights(model: torch.nn.Module, mapped: dict[str, torch.Tensor], hint: str) -> LoadReport:
    """Load `mapped` into the model when every tensor has a place of its shape and only the boundary predictor
    is left at its initialisation; else a ValueError naming the first offenders and `hint`."""
    target = model.state_dict()
    unplaced = sorted(k for k in mapped if k not in target)
    if unplaced:
        raise ValueError(f"checkpoint tensors with no place in the DTP-ViT CLIP: {unplaced[:8]}"
                         f"{' ...' if len(unplaced) > 8 else ''} ({hint})")
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
                  if v.shape != target[k].shape]
    if mismatched:
        raise ValueError(f"shape mismatch (checkpoint vs model): {mismatched[:4]} ({hint})")
    left = sorted(set(target) - set(mapped))
    not_predictor = [k for k in left if ".predictor." not in k]
    if not_predictor:
        raise ValueError(f"checkpoint lacks tensors of the model: {not_predictor[:8]}")
    model.load_state_dict({**target, **mapped}, strict=True)
    return LoadReport(loaded=sorted(mapped), left=left)
