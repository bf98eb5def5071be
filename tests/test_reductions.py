"""The field's token reductions (dtplib.tower.reductions, dtplib.tower.tome) as arms of the DTP tower: the budget,
the FLOP count, the gradient, batch invariance, compile, the plain-ViT limits, the trace and the overlay, training
through the CLI."""

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import QUIET, flickr_photos

import dtplib
from dtplib.common.images import load_images
from dtplib.figures.plots import segment_overlay
from dtplib.measure import flops
from dtplib.tower.config import DTPConfig
from dtplib.tower.model import DTPVisionTransformer
from dtplib.tower.reductions import KMeansGrouping

METHODS = ("evit", "tokenlearner", "kmeans", "prune")
OWN_PARAMETERS = {"tokenlearner", "prune"}  # evit and kmeans are parameter-free
SHAPES = {  # the registered archs' towers: (image size, patch, width, depth, heads, pre, short)
    "Ti": (64, 8, 192, 6, 3, 2, 4),
    "B-32": (224, 32, 768, 12, 12, 2, 10),
}


def tower(shape: str, seed: int = 0, **dtp) -> DTPVisionTransformer:
    size, patch, width, depth, heads, pre, short = SHAPES[shape]
    torch.manual_seed(seed)
    config = DTPConfig(**{"compression": 4.0, "pre_layers": pre, "short_layers": short, **dtp})
    return DTPVisionTransformer(config, img_size=size, patch_size=patch, embed_dim=width, depth=depth,
                                num_heads=heads).eval()


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    files = flickr_photos(6)
    return {"Ti": load_images(files, open_clip.image_transform(64, is_train=False)),
            "B-32": load_images(files[:2], open_clip.image_transform(224, is_train=False))}


class ShortLayerInputs:
    """Records the token count every shortened block sees."""

    def __init__(self, model: DTPVisionTransformer):
        self.shapes: list[tuple] = []
        self.handles = [block.register_forward_pre_hook(lambda _, args: self.shapes.append(tuple(args[0].shape)))
                        for block in model.stages[1]]

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_budget_flops_gradient_and_eval_properties(method, shape, photos, one_thread):
    """At 4x: every shortened layer sees CLS + ceil(N/4) tokens for every image; analytic MACs equal fvcore's and lie
    within 3% of DTP's topk; the CLIP loss is finite and reaches the method's own parameters (and, for every
    method, the pre-layers); eval is deterministic and batch invariant."""
    model = tower(shape, reduction=method)
    images = photos[shape]
    budget = math.ceil(model.num_patches / 4)
    assert model.topk_segments == budget and model.short_layer_tokens() == [1 + budget] * model.dtp.short_layers
    watch = ShortLayerInputs(model)
    with torch.no_grad(), dtplib.trace(model) as t:
        batched = model(images)
    watch.close()
    assert set(watch.shapes) == {(len(images), 1 + budget, model.embed_dim)}
    assert (t.tokens == budget).all() and t.segment_ids.shape == (len(images), model.num_patches)
    assert t.segment_ids.max() < budget and t.segment_ids.min() >= (-1 if method == "prune" else 0)
    assert ((t.segment_ids >= 0).sum(-1) == (budget if method == "prune" else model.num_patches)).all()
    assert ((0 <= t.probs) & (t.probs <= 1)).all()

    analytic = flops.total(flops.analytic_macs(model))
    assert analytic == pytest.approx(flops.fvcore_macs(model, images[:1]), rel=1e-9)  # well within 1%
    assert flops.analytic_macs(model)["predictor"] == model.reduction_macs() > 0
    reference = tower(shape, boundaries="topk")
    assert analytic == pytest.approx(flops.total(flops.analytic_macs(reference, budget)), rel=0.03)

    with torch.no_grad():
        assert torch.equal(model(images), batched)  # deterministic
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)  # batch invariant

    model.train()
    image_features = F.normalize(model(images), dim=-1)
    text_features = F.normalize(torch.randn(len(images), model.embed_dim), dim=-1)  # stands in for the text tower
    logits = 10 * image_features @ text_features.T
    labels = torch.arange(len(images))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    assert loss.isfinite()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if method in OWN_PARAMETERS:
        grads = [p.grad for p in model.reducer.parameters()]
        assert all(g is not None and g.isfinite().all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    else:
        assert not list(model.reducer.parameters())
    if method == "evit":  # the fused token's weights carry the loss to the last pre-layer's attention
        assert model.blocks[model.dtp.pre_layers - 1].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_tome_meets_dtps_macs_with_its_schedule_and_keeps_every_patch(shape, photos, one_thread):
    """ToMe at 4x: each shortened layer sees its schedule's count (the same for every image), the tower's forward
    MACs are DTP's (topk, at its budget) within 3% and fvcore's exactly; every patch ends in exactly one token;
    eval is deterministic and batch invariant; the loss reaches every shortened block; intermediates go on the grid."""
    model = tower(shape, reduction="tome")
    images = photos[shape]
    counts = model.short_layer_tokens()
    assert len(counts) == model.dtp.short_layers and counts == sorted(counts, reverse=True)
    shapes = []  # what each shortened layer's attention reads (ToMe runs the blocks' parts, not their forward)
    handles = [block.attn.qkv.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
               for block in model.stages[1]]
    with torch.no_grad(), dtplib.trace(model) as t:
        batched = model(images)
    for handle in handles:
        handle.remove()
    assert [s[1] for s in shapes] == counts and {s[0] for s in shapes} == {len(images)}
    final = counts[-1] - model.reducer.schedule[-1] - 1  # patch tokens after the last layer's merge
    assert (t.tokens == final).all() and t.segment_ids.min() >= 0 and t.segment_ids.max() == final - 1

    analytic = flops.total(flops.analytic_macs(model))
    assert analytic == pytest.approx(flops.fvcore_macs(model, images[:1]), rel=1e-9)
    reference = tower(shape, boundaries="topk")
    assert analytic == pytest.approx(flops.total(flops.analytic_macs(reference, model.topk_segments)), rel=0.03)
    with torch.no_grad():
        assert torch.equal(model(images), batched)
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
        _, (short,) = model.forward_intermediates(images[:1], indices=[model.dtp.pre_layers + 1])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)
    assert short.shape == (1, model.embed_dim, *model.grid) and short.isfinite().all()

    model.train()
    model(images).square().mean().backward()
    assert all(block.mlp.fc2.weight.grad.abs().sum() > 0 for block in model.stages[1])


def test_tome_merging_nothing_is_the_plain_vit(photos):
    """ToMe with r = 0 everywhere (no entrance merge either) is the plain ViT with the same weights."""
    plain, merging = tower("Ti", compression=1.0), tower("Ti", reduction="tome")
    merging.load_state_dict(plain.state_dict())
    merging.reducer.schedule = [0] * (1 + merging.dtp.short_layers)
    with torch.no_grad():
        torch.testing.assert_close(merging(photos["Ti"]), plain(photos["Ti"]), atol=1e-5, rtol=0)


def test_evit_keeping_every_patch_is_the_plain_vit(photos):
    """K = N (compression just above 1): N - 1 patches kept, the one fused patch is itself: the plain ViT's output,
    whose token order attention does not see."""
    plain, evit = tower("Ti", compression=1.0), tower("Ti", compression=1.01, reduction="evit")
    assert evit.topk_segments == evit.num_patches
    evit.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(evit(photos["Ti"]), plain(photos["Ti"]), atol=1e-5, rtol=0)
    assert tower("Ti", compression=1.0, reduction="evit").reducer is None  # compression 1: the plain path itself


def test_kmeans_with_one_patch_per_group_is_the_plain_vit(photos):
    """K = N: the grid puts a centre on every patch and each patch stays in its own group, so the tokens are the
    patches (in some order) and the CLS output is the plain ViT's."""
    plain, kmeans = tower("Ti", compression=1.0), tower("Ti", compression=1.01, reduction="kmeans")
    kmeans.load_state_dict(plain.state_dict())
    with torch.no_grad(), dtplib.trace(kmeans) as t:
        grouped = kmeans(photos["Ti"])
    assert (t.segment_ids.sort(-1).values == torch.arange(kmeans.num_patches)).all()  # one patch per group
    with torch.no_grad():
        torch.testing.assert_close(grouped, plain(photos["Ti"]), atol=1e-5, rtol=0)


def test_kmeans_empty_groups_give_zero_tokens_without_nan():
    """Identical patches without positions: every patch joins one centre, the other three groups are empty; their
    tokens are zero (still tokens), and the output and its gradient are finite."""
    grouping = KMeansGrouping(8, 4, (4, 4), position_weight=0.0)
    x = torch.randn(2, 1, 8).expand(2, 17, 8).clone().requires_grad_()  # CLS + 16 identical patches
    short, groups, scores = grouping(x, 4, (4, 4), x, None)
    assert (groups == groups[:, :1]).all() and short.shape == (2, 5, 8)
    for image, group in enumerate(groups[:, 0].tolist()):
        empty = [k for k in range(4) if k != group]
        assert short[image, 1 + torch.tensor(empty)].abs().max() == 0
        torch.testing.assert_close(short[image, 1 + group], x[image, 1])
    short.square().sum().backward()
    assert short.isfinite().all() and scores.isfinite().all() and x.grad.isfinite().all()


def test_compile_serves_every_method_with_one_graph(photos, one_thread):
    """torch.compile(fullgraph=True) of each method's training forward: two batches of different content, one graph,
    no recompile."""
    from torch._dynamo.testing import CompileCounter

    for method in (*METHODS, "tome"):
        torch._dynamo.reset()
        model = tower("Ti", reduction=method).train()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        first, second = compiled(photos["Ti"][:3]), compiled(photos["Ti"][3:])
        assert counter.frame_count == 1, method
        assert not torch.allclose(first, second) and first.isfinite().all()


def test_trace_overlay_intermediates_and_refusals(photos):
    """A pruned trace draws (dropped patches darkened, untinted); forward_intermediates places a shortened layer on
    the grid (a dropped patch zero); use_config cannot change the reduction; DTP-only settings are refused."""
    model = tower("Ti", reduction="prune")
    with torch.no_grad(), dtplib.trace(model) as t:
        model(photos["Ti"][:1])
    image = np.full((64, 64, 3), 200, np.uint8)
    drawn = segment_overlay(image, t.segment_ids[0], t.grid)
    dropped = (t.segment_ids[0] < 0).reshape(8, 8).numpy()
    row, col = np.argwhere(dropped)[0]
    assert (drawn[row * 8 + 3, col * 8 + 3] == 100).all()  # a dropped patch's middle pixel: darkened, untinted
    assert t.boundaries[0, -1] and t.boundaries.sum() > 1
    with torch.no_grad():
        _, (short,) = model.forward_intermediates(photos["Ti"][:1], indices=[model.dtp.pre_layers])
    assert short.shape == (1, model.embed_dim, 8, 8)
    assert (short[0][:, torch.from_numpy(dropped)] == 0).all() and (short[0][:, ~torch.from_numpy(dropped)] != 0).any()
    with pytest.raises(ValueError, match="shape the tower's parameters"):
        with dtplib.use_config(model, reduction="evit"):
            pass
    with pytest.raises(ValueError, match="reduces tokens by 'prune', not by boundaries"):
        with dtplib.forced_boundaries(model, 4):
            pass
    for bad in ({"upsample": True, "pre_layers": 2, "short_layers": 2, "post_layers": 2},
                {"forced_boundaries": 4}, {"patch_order": "hilbert"}):
        with pytest.raises(ValueError, match="takes none"):
            tower("Ti", reduction="kmeans", **bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        tower("Ti", reduction="tome-ish")


def test_export_and_load_weights_round_trip(tmp_path, photos):
    """A reduction arm's weights file (dtplib.export's writer) rebuilds the same arm and the same embeddings."""
    from dtplib.tower.weights import load_weights, weights_header, write_weights

    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", 4, reduction="tokenlearner")
    dtp = dtplib.get_tower(model).dtp
    path = write_weights(model.state_dict(), tmp_path / "tl.safetensors",
                         weights_header("DTP-ViT-Ti-8-64-4x", dtp, {"test": True}))
    loaded = load_weights(path)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    assert dtplib.get_tower(loaded).dtp.reduction == "tokenlearner"
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(photos["Ti"]), model.encode_image(photos["Ti"]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ("tome", *METHODS))
def test_each_method_trains_through_the_cli_and_resumes_exactly(tmp_path, shards32, method):
    """`python -m dtplib.train --reduction METHOD` (its `main`, in this process): steps at 4x (the logged
    compression is N / K = 4), and a run cut after its first epoch (of one step) and resumed equals the
    uninterrupted one step for step (the Gumbel draws of pruning included)."""
    import csv

    from dtplib import train

    def run(*flags, name):
        train.main(["--train-data", shards32, "--logs", str(tmp_path), "--name", name, *QUIET, "--model",
                    "ViT-Ti-8-64", "--compression", "4", "--reduction", method, "--batch-size", "16", "--epochs",
                    "2", "--train-num-samples", "16", "--lr", "1e-3", "--warmup", "1", "--seed", "3",
                    "--zeroshot-frequency", "0", *flags])
        with (tmp_path / name / "steps.csv").open(newline="") as f:
            return list(csv.DictReader(f))

    full = run(name="full")
    run("--max-steps", "1", name="cut")
    resumed = run("--resume", "latest", name="cut")
    assert len(full) == len(resumed) == 2
    assert len({a["loss"] for a in full}) > 1  # it trains
    for a, b in zip(full, resumed, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5), (a, b)
        assert float(a["compression"]) == pytest.approx(64 / 16)
