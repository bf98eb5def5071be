"""DTP-ViT: CLIP image towers that learn where to merge patch tokens (dynamic token pooling).

Importing dtplib registers the DTP-ViT variants in timm and open_clip, so
`open_clip.create_model_and_transforms("DTP-ViT-B-32-4x")` works unchanged.

Which module to open for what:
- the tower: `model` (DTPConfig, boundaries, pooling, tracing), `packed` (the variable-length shortened layers),
  `order` (the patch reading order: raster or Hilbert);
- building models: `clip` (registered names, models from training flags or a training checkpoint, weight
  transfer); `config` (TrainConfig: every training flag);
- training: `optim` (optimizer, schedule, the one training step), `train` and `finetune` (command line and
  notebook entry points, imported by no other module);
- data: `shards` (writing webdataset shards), `download` (img2dataset), `loader` (reading shards), `loaderbench`,
  and `data` (their command line);
- measuring: `evaluate` (zero-shot, retrieval, held-out loss, linear probe, paired comparisons), `stats`
  (bootstrap intervals), `flops`, `bench` (step time and memory), `specs` (benchmark
  model specs), `experiment` (grids of training runs from experiments/*.toml: runs.csv, summary.md with
  intervals over seeds, accuracy-against-cost curves);
- looking: `viz` (boundaries on photos, alignment with objects), `plots` (every notebook figure and table);
- `utils`: provenance, atomic writes, CSV appends, the data location (`DTPLIB_DATA`), devices.
"""

from .tower.clip import (
    ARCHS,
    LoadReport,
    build_model,
    create_model_and_transforms,
    dtp_name,
    load_dtp_weights,
    load_vit_weights,
    register,
    variant_names,
)
from .tower.model import (
    DTPConfig,
    DTPVisionTransformer,
    boundary_loss,
    fit_boundary_prior,
    forced_boundaries,
    get_tower,
    last_boundary_loss,
    realised_compression,
    token_budget,
    trace,
    use_config,
    use_execution,
)
from .training.checkpoint import load_trained
from .training.config import TrainConfig

register()

__all__ = [
    "ARCHS", "DTPConfig", "DTPVisionTransformer", "LoadReport", "TrainConfig", "boundary_loss", "build_model",
    "create_model_and_transforms", "dtp_name", "fit_boundary_prior", "forced_boundaries", "get_tower",
    "last_boundary_loss", "load_dtp_weights", "load_trained", "load_vit_weights", "realised_compression", "register",
    "token_budget", "trace", "use_config", "use_execution", "variant_names",
]
