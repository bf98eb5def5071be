"""The method: the DTP-ViT image tower and how it runs.

- `config`: `DTPConfig`, the tower's hyper-parameters, their choice lists and checks;
- `model`: `DTPVisionTransformer` (boundary predictor, pooling, the padded, packed and static executions);
- `intermediates`: timm's `forward_intermediates` along the merged path (a mixin of the tower);
- `boundaries`: drawing, capping and pooling boundaries, and their binomial prior (tensor functions);
- `control`: handles on any model holding towers: `get_tower`, `trace`, `use_config`, `forced_boundaries`,
  `fit_boundary_prior`;
- `packed`: the variable-length shortened layers (host-planned buckets and the device-side static buffer);
- `order`: the order patches are read into runs (raster or Hilbert);
- `cost`: the MACs of linear maps and attention read from the modules (shared by the FLOP model and ToMe's schedule);
- `reductions`: the field's token reductions at DTP's budget (EViT, TokenLearner, k-means grouping, learned
  pruning), chosen by `DTPConfig.reduction`;
- `clip`: the registered timm and open_clip names, `build_model`, weight transfer from a plain CLIP ViT;
- `tome`: ToMe (Bolya et al. 2023), bipartite token merging in the shortened layers, and its MAC-matched schedule;
- `weights`: weights-only safetensors files that describe themselves (`load_weights`, written by `dtplib.export`).
"""

__all__ = ["boundaries", "clip", "config", "control", "cost", "intermediates", "model", "order", "packed", "reductions",
           "tome", "weights"]
