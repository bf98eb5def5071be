"""Tables that describe DTP-ViT variants: parameters, tokens through the network, prior fits (02 notebook)."""

from __future__ import annotations

import pandas as pd
import torch

from .clip import create_model_and_transforms
from .model import fit_boundary_prior, get_tower, realised_compression, trace


def count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def variant_table(arch: str, compressions: list[float], upsample: bool = False) -> pd.DataFrame:
    """Parameters (millions) of each variant's image tower, predictor and text tower."""
    rows = []
    for c in compressions:
        model, _, _ = create_model_and_transforms(arch, compression=c, upsample=upsample and c > 1)
        tower = get_tower(model)
        rows.append({"compression": c, "layers (pre/short/post)":
                     f"{tower.dtp.pre_layers}/{tower.dtp.short_layers}/{tower.dtp.post_layers}",
                     "image tower (M)": count(model.visual) / 1e6, "predictor (M)": count(tower.predictor) / 1e6,
                     "text tower (M)": (count(model) - count(model.visual)) / 1e6, "patches": tower.num_patches})
    return pd.DataFrame(rows)


def token_flow(model: torch.nn.Module, images: torch.Tensor) -> pd.DataFrame:
    """Tokens (CLS included) that each stage of the tower processes on `images`: mean, min, max per image."""
    tower = get_tower(model)
    with torch.no_grad(), trace(model) as t:
        model.encode_image(images)
    full = torch.full_like(t.tokens, tower.num_patches) + 1  # B, CLS + patches
    short = t.tokens + 1  # B, CLS + segments
    stages = [("patch embedding", full, 1), ("pre-layers", full, tower.dtp.pre_layers),
              ("shortened layers", short, tower.dtp.short_layers)]
    if tower.dtp.upsample:
        stages.append(("post-layers", full, tower.dtp.post_layers))
    return pd.DataFrame([{"stage": name, "layers": layers, "tokens (mean)": tokens.float().mean().item(),
                          "tokens (min)": tokens.min().item(), "tokens (max)": tokens.max().item()}
                         for name, tokens, layers in stages])


def prior_fit_table(arch: str, compressions: list[float], images: torch.Tensor, steps: int = 300) -> pd.DataFrame:
    """Realised compression (eval and train mode) before and after fitting the predictor to the prior alone."""
    rows = []
    for c in compressions:
        if c <= 1:
            continue
        model, _, _ = create_model_and_transforms(arch, compression=c)
        row = {"target": c}
        for when in ("before", "after"):
            if when == "after":
                fit_boundary_prior(model, images, steps=steps)
            model.eval()
            row[f"eval {when}"] = realised_compression(model, images)
            model.train()
            row[f"train {when}"] = realised_compression(model, images)
        rows.append(row)
    return pd.DataFrame(rows)
