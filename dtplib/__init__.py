"""DTP-ViT: CLIP image towers that learn where to merge patch tokens (dynamic token pooling).

Importing dtplib registers the DTP-ViT variants in timm and open_clip, so
`open_clip.create_model_and_transforms("DTP-ViT-B-32-4x")` works unchanged; the names below are the public API.

The package is laid out by job, one folder per job, from the bottom up (a folder imports only the folders before
it, so each can be read without the ones after it; tests/test_structure.py holds the order):
- `common`: paths, files, images, runtime, provenance, command-line plumbing;
- `tower`: the method: the tower and its config, packed execution, patch order, registered names;
- `data`: image-caption shards, downloads, the loader, folder-per-class datasets;
- `training`: TrainConfig (every setting of a run, the tower's DTPConfig nested), the optimisation step,
  models from checkpoints;
- `measure`: evaluation, statistics, FLOPs, the benchmark, the tables behind the figures;
- `figures`: drawing, and boundaries on photos;
- `grid`: the experiment driver (grid files, child runs, reports).
The top-level modules are the command lines (`python -m dtplib.train|evaluate|bench|flops|viz|export|experiment|demo`,
and `python -m dtplib.data`) and the notebooks' entry points (`train.run(config)`, `finetune`): nothing in the
folders imports them, so the library never depends on a command line's flags.
"""


from .common.cli import quiet_open_clip_random_init
from .common.paths import warn_if_other_checkout
from .tower.boundaries import boundary_loss
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
from .tower.config import DTPConfig
from .tower.control import (
    fit_boundary_prior,
    forced_boundaries,
    get_tower,
    last_boundary_loss,
    realised_compression,
    trace,
    use_config,
    use_execution,
)
from .tower.model import DTPVisionTransformer, token_budget
from .tower.weights import load_weights
from .training.checkpoint import load_trained
from .training.config import TrainConfig

quiet_open_clip_random_init()  # open_clip's "initialized randomly" warning: dtplib builds models that way on purpose
register()
warn_if_other_checkout()  # one environment, two clones: the outputs go to the working one, the code is another's

__all__ = [
    "ARCHS", "DTPConfig", "DTPVisionTransformer", "LoadReport", "TrainConfig", "boundary_loss", "build_model",
    "create_model_and_transforms", "dtp_name", "fit_boundary_prior", "forced_boundaries", "get_tower",
    "last_boundary_loss", "load_dtp_weights", "load_trained", "load_vit_weights", "load_weights",
    "realised_compression", "register", "token_budget", "trace", "use_config", "use_execution", "variant_names",
]
