"""Weights-only files: a DTP-ViT CLIP's state dict as safetensors that describe themselves, and loading them back.

A weights file `NAME.safetensors` holds the model's state dict exactly as open_clip loads it (keys of
`model.state_dict()`, fp32 or fp16) and, in its safetensors metadata under `dtp_vit`, a json header: the open_clip
model name, the tower's whole `DTPConfig`, and where the weights come from (run, epoch, commits). `NAME.json` next
to it repeats the header for people and tools that do not read safetensors headers. So either route loads it:

    import dtplib, open_clip
    path = "weights/flickr8k-ti-learned-4x.safetensors"
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x", pretrained=path)
    model, preprocess, tokenizer, header = dtplib.load_weights(path)  # or load_weights("flickr8k-ti-learned-4x")

An open_clip name carries the tower's structure, not every run-time setting (open_clip 3.3.0 passes no keyword
arguments to timm): the header's `settings_not_in_name` lists the settings in which the named model differs from the
trained one (e.g. `boundaries: topk`). `load_weights` builds the tower with all of them; after open_clip's route,
`dtplib.use_config(model, **header["settings_not_in_name"])` sets them. `python -m dtplib.export` writes such files
from a training checkpoint (`dtplib.training.checkpoint.export_weights`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import open_clip
import torch

from ..common.files import atomic_write_bytes, atomic_write_text
from ..common.paths import REPO_ROOT, repo_path
from .clip import ARCHS, COMPRESSIONS, build_model, parse_dtp_name, tower_config
from .config import STRUCTURAL_FIELDS, DTPConfig

WEIGHTS_DIR = REPO_ROOT / "weights"  # the shipped weights files; `load_weights("name")` looks here
METADATA_KEY = "dtp_vit"  # the safetensors metadata entry that holds the json header
FORMAT = "dtp-vit-weights/1"  # the header's `format`: bump when its meaning changes


# ----------------------------------------------------------------------------------------------------------
# The header: what a weights file says about itself


def settings_not_in_name(model_name: str, dtp: DTPConfig | None) -> tuple[bool, dict]:
    """(open_clip builds these parameters from `model_name`, {DTPConfig field: value} where the trained tower
    differs from the one the name builds}). A structural difference (`STRUCTURAL_FIELDS`, the layer split) means
    the name cannot hold the weights; a run-time one (boundaries, execution, ...) is set after loading."""
    if dtp is None:  # a plain open_clip model: the name is the whole model
        return model_name in open_clip.list_models(), {}
    parsed = parse_dtp_name(model_name)
    if parsed is None:
        raise ValueError(f"{model_name!r} is not a DTP-ViT name (dtplib.dtp_name)")
    arch, compression, upsample = parsed
    named = tower_config(ARCHS[arch], compression, upsample)
    differs = {f.name: getattr(dtp, f.name) for f in fields(DTPConfig)
               if getattr(dtp, f.name) != getattr(named, f.name)}
    return compression in COMPRESSIONS and not set(differs) & set(STRUCTURAL_FIELDS), differs


def weights_header(model_name: str, dtp: DTPConfig | None, source: dict) -> dict:
    """The json header of a weights file (the dtype and tensor counts are added when it is written)."""
    loads, differs = settings_not_in_name(model_name, dtp)
    return {"format": FORMAT, "open_clip_model": model_name, "open_clip_loads": loads,
            "settings_not_in_name": differs, "dtp": None if dtp is None else asdict(dtp), "source": source}


# ----------------------------------------------------------------------------------------------------------
# Writing and reading


def write_weights(state: dict[str, torch.Tensor], path: str | Path, header: dict, fp16: bool = False,
                  overwrite: bool = False) -> Path:
    """Write `state` (a model's state dict) as `path` (.safetensors, floating tensors in fp16 with `fp16`) with
    `header` in its metadata, and the header as `path` with .json; each written atomically. Returns the path."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out must end with .safetensors, got {path}")
    sidecar = path.with_suffix(".json")
    existing = [str(p) for p in (path, sidecar) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} exist(s): pass --overwrite to replace")
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous().clone()
               for k, v in state.items()}
    infinite = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if infinite:
        raise ValueError(f"{len(infinite)} tensors are not finite in {str(dtype).removeprefix('torch.')} "
                         f"({', '.join(infinite[:3])}): not written")
    header = {**header, "dtype": str(dtype).removeprefix("torch."), "tensors": len(tensors),
              "elements": sum(v.numel() for v in tensors.values())}  # parameters and buffers
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(header)}))
    atomic_write_text(sidecar, json.dumps(header, indent=2) + "\n")
    return path


def weights_file(weights: str | Path) -> Path:
    """The weights file meant by `weights`: a path to a file (from the working folder, else from the repository
    root, as notebooks give paths), or the name of a shipped one in `weights/` (with or without .safetensors)."""
    path = Path(weights)
    for candidate in (path, repo_path(path)):
        if candidate.is_file():
            return candidate
    shipped = WEIGHTS_DIR / (path.name if path.suffix == ".safetensors" else f"{path.name}.safetensors")
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))
    raise FileNotFoundError(f"weights not found: {weights} (neither a file nor one of the shipped {names or 'none'})")


def weights_info(weights: str | Path) -> dict:
    """The json header of a weights file (from its safetensors metadata), or a ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = weights_file(weights)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exn:
        raise ValueError(f"{path}: not a safetensors file ({' '.join(str(exn).split())[:200]})") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: a safetensors file without a DTP-ViT header (write one with python -m "
                         "dtplib.export)")
    return json.loads(metadata[METADATA_KEY])


def is_weights_file(path: str | Path) -> bool:
    """Whether `path` is a weights file with a DTP-ViT header (False for a training checkpoint or any other file)."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def load_weights(weights: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, preprocess_val, tokenizer, header) from a weights file or a shipped name: the tower is
    built with every setting it was trained with (and the input size, the source's force_image_size), then
    open_clip's own `load_checkpoint` loads the file (strict)."""
    path = weights_file(weights)
    header = weights_info(path)
    name, dtp = header["open_clip_model"], header["dtp"]
    size = (header.get("source") or {}).get("force_image_size")  # a run trained at another input size
    if dtp is None:
        model, _, preprocess, tokenizer = build_model(name, force_image_size=size)
    else:
        settings = {k: v for k, v in dtp.items() if k not in ("compression", "upsample")}
        model, _, preprocess, tokenizer = build_model(parse_dtp_name(name)[0], dtp["compression"], dtp["upsample"],
                                                      force_image_size=size, **settings)
    open_clip.load_checkpoint(model, str(path))
    return model.to(device).eval(), preprocess, tokenizer, header
