"""DTP-ViT: CLIP image towers that learn where to merge patch tokens (dynamic token pooling).

Importing dtplib registers the DTP-ViT variants in timm and open_clip, so
`open_clip.create_model_and_transforms("DTP-ViT-B-32-4x")` works unchanged.
"""

from .clip import (
    ARCHS,
    LoadReport,
    create_model_and_transforms,
    dtp_name,
    load_vit_weights,
    register,
    variant_names,
)
from .model import (
    DTPConfig,
    DTPVisionTransformer,
    boundary_loss,
    fit_boundary_prior,
    forced_boundaries,
    get_tower,
    last_boundary_loss,
    realised_compression,
    trace,
    use_execution,
)

register()

__all__ = [
    "ARCHS", "DTPConfig", "DTPVisionTransformer", "LoadReport", "boundary_loss", "create_model_and_transforms",
    "dtp_name", "fit_boundary_prior", "forced_boundaries", "get_tower", "last_boundary_loss", "load_vit_weights",
    "realised_compression", "register", "trace", "use_execution", "variant_names",
]
