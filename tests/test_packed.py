"""Packed executions (static capacity, the default; host-planned) and the topk boundary modes: the same values and
gradients as the padded reference path."""

import copy
import itertools
import math
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import flickr_captions, flickr_photos

import dtplib.tower.packed
from dtplib.common.images import load_images
from dtplib.tower.boundaries import cap_boundaries
from dtplib.tower.control import get_tower
from dtplib.tower.packed import Packing, StaticPacking, bucket_splits, varlen_attention_available


def reference_copy(model):
    """A deep copy of the model that runs the padded reference path."""
    padded = copy.deepcopy(model)
    get_tower(padded).dtp.execution = "padded"
    return padded


def assert_attends_each_image_alone(packing, lengths: list[int], rows: int, device: str = "cpu") -> None:
    """The packing's attention over `rows` rows (T x H x hd, the tail past the images included) is finite everywhere
    and equals attention over each image's rows alone. CPU: fp32, 1e-6; CUDA: varlen flash attention with bf16
    inputs, as flash needs, against fp32, 2e-2."""
    cuda = device == "cuda"
    heads, dim = (12, 64) if cuda else (2, 8)
    q, k, v = torch.randn(3, rows, heads, dim, device=device).to(torch.bfloat16 if cuda else torch.float32).unbind(0)
    out = packing.attend(q, k, v, dropout_p=0.0).float()
    assert out.shape == q.shape and torch.isfinite(out).all()
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        expected = F.scaled_dot_product_attention(*(x[part].float().transpose(0, 1) for x in (q, k, v)))
        tolerance = 2e-2 if cuda else 1e-6
        torch.testing.assert_close(out[part], expected.transpose(0, 1), atol=tolerance, rtol=tolerance if cuda else 0)
        start += n


def cuda_b32_and_padded_copy():
    """The B/32 4x CLIP on CUDA, 8 Flickr8k photos there, and the model's padded reference copy."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-B-32", compression=4)
    images = load_images(flickr_photos(8), preprocess).to("cuda")
    model.to("cuda")
    return model, images, reference_copy(model)


def forward_backward(model, images, training: bool, seed: int = 1, backward: bool = True):
    """Image embeddings and every parameter's gradient of (sum of squares + prior); same noise for every call.
    `backward=False`: the forward pass alone, no gradients ({})."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same Gumbel noise, so both paths sample the same boundaries
    with dtplib.trace(model) as t:
        features = model.encode_image(images)
    if not backward:
        return features.detach(), {}, t.tokens.clone()
    (features.square().sum() + get_tower(model).last_boundary_loss).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return features.detach(), grads, t.tokens.clone()


@pytest.mark.parametrize("execution", ["static", "packed"])
@pytest.mark.parametrize("arch", ["ViT-Ti-8-64", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
@pytest.mark.parametrize("upsample", [False, True], ids=["short", "upsample"])
def test_packed_matches_padded(arch, upsample, execution, one_thread):
    """Pool "tok" and "avg": outputs in fp32 within 1e-5, eval and train (the same sampled boundaries, which the
    untrained predictor puts above the capacity cap, so the cap binds in training); in training, the gradient of
    every parameter, the predictor's included, within 1e-4 relative. Gradients are compared in float64: the
    predictor's output bias gets a sum of cancelling terms whose fp32 rounding alone exceeds 1e-4 of it."""
    model, _, preprocess = dtplib.create_model_and_transforms(arch, compression=2 if upsample else 4,
                                                              upsample=upsample, execution=execution)
    images = load_images(flickr_photos(8 if arch == "ViT-Ti-8-64" else 3), preprocess)
    padded = reference_copy(model)
    for pool in ("tok", "avg"):
        get_tower(model).dtp.pool = get_tower(padded).dtp.pool = pool
        for training in (False, True):
            # outputs and counts only here (the gradients are compared in float64 below)
            packed_out, _, packed_tokens = forward_backward(model, images, training, backward=False)
            padded_out, _, padded_tokens = forward_backward(padded, images, training, backward=False)
            assert torch.equal(packed_tokens, padded_tokens)
            assert len(set(packed_tokens.tolist())) > 1, "the images must get different segment counts"
            torch.testing.assert_close(packed_out, padded_out, atol=1e-5, rtol=0)

    for clip in (model, padded):  # the image tower: encode_image never reaches the text tower
        clip.visual.double()
    images = images.double()
    for pool in ("tok", "avg"):
        get_tower(model).dtp.pool = get_tower(padded).dtp.pool = pool
        _, packed_grads, _ = forward_backward(model, images, training=True)
        _, padded_grads, _ = forward_backward(padded, images, training=True)
        assert packed_grads.keys() == padded_grads.keys()
        assert any(".predictor." in k for k in packed_grads)
        for name, expected in padded_grads.items():
            error = (packed_grads[name] - expected).norm() / expected.norm().clamp(min=1e-30)
            assert error < 1e-4, f"{pool}, {name}: relative gradient difference {error:.2e}"


def test_normalised_upsampling_cuts_only_the_boundary_gradient_through_upsampling(one_thread):
    """`upsample_weights="normalised"` (Nawrot): the same outputs and the same gradients for every layer after the
    predictor, a different predictor gradient (the upsampling path is gone), and packed = padded as before; the
    weights it upsamples with carry no gradient at all."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=2, upsample=True)
    images = load_images(flickr_photos(6), preprocess).double()
    model = model.double()
    tower = get_tower(model)
    results = {}
    for weights, execution, boundaries in itertools.product(("straight-through", "normalised"),
                                                            ("packed", "padded"), ("threshold", "topk")):
        tower.dtp.upsample_weights, tower.dtp.execution, tower.dtp.boundaries = weights, execution, boundaries
        results[weights, execution, boundaries] = forward_backward(model, images, training=True)
    for execution, boundaries in itertools.product(("packed", "padded"), ("threshold", "topk")):
        (through, through_grads, _), (normalised, normalised_grads, _) = (
            results["straight-through", execution, boundaries], results["normalised", execution, boundaries])
        torch.testing.assert_close(normalised, through, atol=1e-12, rtol=0)
        post = [k for k in through_grads if k.startswith(("visual.trunk.blocks.4.", "visual.trunk.blocks.5."))]
        assert post, "the -up tower has post-layers"
        for name in post + ["visual.trunk.norm.weight"]:
            torch.testing.assert_close(normalised_grads[name], through_grads[name], atol=1e-12, rtol=1e-9)
        predictor = "visual.trunk.predictor.fc2.weight"
        change = (normalised_grads[predictor] - through_grads[predictor]).norm() / through_grads[predictor].norm()
        assert change > 1e-3, f"{execution}, {boundaries}: the predictor's gradient did not change ({change:.1e})"
    for boundaries in ("threshold", "topk"):
        packed_grads, padded_grads = (results["normalised", e, boundaries][1] for e in ("packed", "padded"))
        for name, expected in padded_grads.items():
            error = (packed_grads[name] - expected).norm() / expected.norm().clamp(min=1e-30)
            assert error < 1e-4, f"normalised {boundaries}, {name}: relative gradient difference {error:.2e}"
    through_ids = torch.ones(2, 3, requires_grad=True) * 1.0
    assert not tower.upsampling_weights(through_ids).requires_grad
    tower.dtp.upsample_weights = "straight-through"
    assert tower.upsampling_weights(through_ids).requires_grad
    with pytest.raises(ValueError, match="upsample_weights must be one of"):
        dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=2, upsample=True, upsample_weights="mean")


@pytest.mark.parametrize("execution", ["static", "packed"])
def test_packed_batch_invariance_with_very_different_counts(execution, one_thread):
    """An image's embedding alone equals its embedding in a batch of 8 whose counts run from 1 to 64 segments."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, pool="avg",
                                                              execution=execution)
    model.eval()
    images = load_images(flickr_photos(8), preprocess)
    counts = [1, 2, 5, 11, 23, 40, 57, 64]
    generator = torch.Generator().manual_seed(0)
    boundaries = torch.zeros(8, 64)
    for row, count in enumerate(counts):  # count - 1 random boundaries plus the last patch
        boundaries[row, torch.randperm(63, generator=generator)[:count - 1]] = 1
        boundaries[row, -1] = 1
    with torch.no_grad(), dtplib.trace(model) as t:
        with dtplib.forced_boundaries(model, boundaries):
            batched = model.encode_image(images)
        assert t.tokens.tolist() == counts
        alone = []
        for row in range(8):
            with dtplib.forced_boundaries(model, boundaries[row:row + 1]):
                alone.append(model.encode_image(images[row:row + 1]))
    torch.testing.assert_close(torch.cat(alone), batched, atol=1e-5, rtol=0)


@pytest.mark.parametrize("compression", [2, 3, 4, 10])
def test_topk_keeps_exactly_ceil_n_over_c_segments(compression, one_thread):
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=compression,
                                                              boundaries="topk")
    images = load_images(flickr_photos(8), preprocess)
    expected = math.ceil(64 / compression)
    for training in (True, False):
        model.train(training)
        with torch.no_grad(), dtplib.trace(model) as t:
            model.encode_image(images)
        assert t.tokens.tolist() == [expected] * 8
        assert t.boundaries[:, -1].all()  # the last patch closes the last segment


def test_topk_predictor_learns_from_the_contrastive_loss_alone(one_thread):
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries="topk",
                                                              boundary_loss_weight=0)
    files = flickr_photos(8)
    images, texts = load_images(files, preprocess), open_clip.get_tokenizer("ViT-Ti-8-64")(flickr_captions(files))
    model.train()
    loss = open_clip.ClipLoss()(*model(images, texts)[:3])  # no boundary loss at all
    loss.backward()
    grads = [p.grad for p in get_tower(model).predictor.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_topk_prior_keeps_the_threshold_count_at_the_budget(one_thread):
    """In topk mode the prior acts on the threshold boundaries: a prior-only fit brings them to about N / c."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries="topk")
    images = load_images(flickr_photos(32), preprocess)
    dtplib.fit_boundary_prior(model, images, steps=150)
    model.eval()
    with torch.no_grad(), dtplib.trace(model) as t:
        model.encode_image(images)
    threshold = (t.probs > 0.5).float()
    threshold[:, -1] = 1
    assert 64 / threshold.sum(-1).mean().item() == pytest.approx(4, rel=0.15)
    assert t.tokens.tolist() == [16] * 32


def brute_force_cost(lengths: np.ndarray, buckets: int) -> float:
    best = math.inf
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, len(lengths)), k)
                                              for k in range(buckets)):
        edges = [0, *cuts, len(lengths)]
        best = min(best, sum((e - s) * lengths[e - 1] ** 2 for s, e in itertools.pairwise(edges)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_bucket_splits_are_optimal(seed):
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, 30, size=9))
    for buckets in (1, 2, 3, 4):
        splits = bucket_splits(lengths, buckets)
        assert splits[-1] == len(lengths) and len(splits) <= buckets and splits == sorted(set(splits))
        edges = [0, *splits]
        cost = sum((e - s) * lengths[e - 1] ** 2 for s, e in itertools.pairwise(edges))
        assert cost == brute_force_cost(lengths, buckets)
    assert bucket_splits(np.full(7, 5), 4) == [7]  # equal lengths: one bucket, no padding


def test_packing_indices_describe_the_batch():
    packing = Packing.plan([3, 0, 5, 1], torch.device("cpu"), buckets=2)
    assert packing.lengths == [4, 1, 6, 2] and packing.num_tokens == 13 and packing.max_length == 6
    assert packing.cu_seqlens.tolist() == [0, 4, 5, 11, 13]
    assert packing.starts.tolist() == [0, 4, 5, 11]
    assert packing.segment_rows.tolist() == [1, 2, 3, 6, 7, 8, 9, 10, 12]
    assert packing.image_of_token.tolist() == [0] * 4 + [1] + [2] * 6 + [3] * 2
    tokens = torch.arange(13.0)[:, None]
    rows = torch.cat([tokens, tokens.new_zeros(1, 1)])
    for bucket in packing.buckets:  # every real slot points at its token, padding at the zero row
        assert (bucket.gather <= 13).all()
    gathered = torch.cat([rows[b.gather].flatten(0, 1) for b in packing.buckets])
    assert torch.equal(gathered[packing.bucket_inverse], tokens)


def test_packed_attention_keeps_images_apart(one_thread):
    """Bucketed attention over packed tokens equals attention of each image alone."""
    lengths = [1, 7, 3, 12, 2, 12]
    packing = Packing.plan([n - 1 for n in lengths], torch.device("cpu"), buckets=3)
    assert_attends_each_image_alone(packing, lengths, sum(lengths))


def test_grad_checkpointing_keeps_packed_gradients(one_thread):
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    images = load_images(flickr_photos(4), preprocess)
    plain_out, plain_grads, _ = forward_backward(model, images, training=True)
    model.set_grad_checkpointing(True)
    checkpointed_out, checkpointed_grads, _ = forward_backward(model, images, training=True)
    torch.testing.assert_close(checkpointed_out, plain_out, atol=1e-6, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_bad_execution_and_boundary_modes_are_refused():
    with pytest.raises(ValueError, match="execution must be"):
        dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, execution="ragged")
    with pytest.raises(ValueError, match="boundaries must be"):
        dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries="quantile")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_varlen_attention_and_one_synchronisation_per_forward():
    """On CUDA: varlen flash attention against masked padded attention in fp32 (bf16 inputs, as flash needs), the
    whole tower packed against padded in fp32, and host synchronisations that do not grow with the layers."""
    device = torch.device("cuda")
    assert varlen_attention_available(device, torch.bfloat16)
    lengths = [1, 17, 5, 50, 33, 2, 50, 9]
    packing = Packing.plan([n - 1 for n in lengths], device)
    assert_attends_each_image_alone(packing, lengths, sum(lengths), "cuda")
    model, images, padded = cuda_b32_and_padded_copy()
    for training in (False, True):
        packed_out, packed_grads, _ = forward_backward(model, images, training)
        padded_out, padded_grads, _ = forward_backward(padded, images, training)
        torch.testing.assert_close(packed_out, padded_out, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the varlen path inside the tower
        packed_bf16, _, _ = forward_backward(model, images, True)
    assert torch.isfinite(packed_bf16).all()

    def synchronisations(short_layers: int) -> int:
        tower_model, _, _ = dtplib.create_model_and_transforms("ViT-B-32", compression=4, pre_layers=12 - short_layers,
                                                               short_layers=short_layers)
        tower_model.to(device).eval()
        with torch.no_grad():
            tower_model.encode_image(images)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tower_model.encode_image(images)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

    shallow, deep = synchronisations(2), synchronisations(10)
    assert len(shallow) == len(deep) == 1, deep  # reading the segment counts, whatever the depth


@pytest.mark.slow
def test_torch_compile_runs_the_packed_path(one_thread):
    """torch.compile (dynamic shapes) of the host-planned packed tower: eval output equals eager on two batches
    whose counts differ, and a training step gives finite gradients that reach the predictor. The graphs (split
    where the packing reads the host) run under the "eager" backend: dynamo's capture with dynamic shapes, as
    inductor gets it, without AOTAutograd's and inductor's minutes on a CPU (this test took 97 s with inductor,
    126 s with aot_eager on a loaded 2-core machine, 49 s with eager); inductor is exercised by test_bench's
    compiled rows."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, execution="packed")
    images = load_images(flickr_photos(16), preprocess)
    compiled = torch.compile(model.visual, dynamic=True, backend="eager")
    model.eval()
    with torch.no_grad():
        for batch in (images[:8], images[8:]):
            torch.testing.assert_close(compiled(batch), model.visual(batch), atol=1e-4, rtol=1e-4)
    model.train()
    compiled(images[:8]).square().mean().backward()
    grads = [p.grad for p in get_tower(model).predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


# ----------------------------------------------------------------------------------------------------------
# Static capacity: the layout, the cap, batch-topk, no host read, one compiled graph


def test_static_packing_indices_describe_the_batch():
    """Images of 3, 0, 5 and 1 + 1 segments (lengths 4, 1, 6, 2 would be T = 13) in a buffer of 16 rows: the CLS
    rows, each row's image and window slot, the tail cut into pieces of at most L, the unpack slots."""
    lengths = torch.tensor([4, 2, 6, 2])  # every image has at least its closing segment
    packing = StaticPacking.plan(lengths, rows=17, max_length=7)
    assert packing.cu_seqlens.tolist() == [0, 4, 6, 12, 14]
    assert packing.starts.tolist() == [0, 4, 6, 12]
    assert packing.covering_seqlens.tolist() == [0, 4, 6, 12, 14, 17, 17]  # tail: 3 rows, then an empty piece
    assert packing.image_of_token.tolist() == [0] * 4 + [1] * 2 + [2] * 6 + [3] * 2 + [3] * 3  # the tail: last
    real = packing.unpack_slot[:14]
    assert real.tolist() == [0, 1, 2, 3, 7, 8, 14, 15, 16, 17, 18, 19, 21, 22]  # b * L + position
    assert (packing.unpack_slot[14:] == 4 * 7).all()  # the tail goes to the dropped slot
    assert torch.equal(packing.window_slot[:14], real)
    assert packing.key_mask.view(4, 7).sum(1).tolist() == [4, 2, 6, 2]
    tokens = torch.arange(17.0)[:, None]
    padded, keep = dtplib.tower.packed.unpack_static(tokens, packing)
    assert padded.shape == (4, 7, 1) and torch.equal(padded[keep].flatten(), torch.arange(14.0))
    assert (padded[~keep] == 0).all()


def test_static_attention_keeps_images_apart_and_the_tail_finite(one_thread):
    lengths = [2, 7, 3, 12, 2, 12]
    rows = sum(lengths) + 9
    packing = StaticPacking.plan(torch.tensor(lengths), rows=rows, max_length=13)
    assert_attends_each_image_alone(packing, lengths, rows)


def test_cap_keeps_the_closing_boundaries_and_the_highest_scores():
    generator = torch.Generator().manual_seed(0)
    hard = (torch.rand(6, 20, generator=generator) < 0.6).float()
    hard[:, -1] = 1
    soft = torch.rand(6, 20, generator=generator, requires_grad=True)
    boundaries = hard + (soft - soft.detach())
    scores = torch.randn(6, 20, generator=generator)
    capped, dropped = cap_boundaries(boundaries, scores, max_segments=30)
    kept = capped.detach()
    assert kept.sum() == 30 and dropped == hard.sum() - 30
    assert (kept[:, -1] == 1).all() and ((kept == 0) | (kept == 1)).all() and (kept <= hard).all()
    inner_kept, inner_dropped = (kept == 1)[:, :-1], ((hard == 1) & (kept == 0))[:, :-1]
    assert scores[:, :-1][inner_kept].min() > scores[:, :-1][inner_dropped].max()  # the highest scores stay
    capped.sum().backward()
    assert torch.equal(soft.grad, torch.ones_like(soft))  # straight-through, dropped positions included
    same, none = cap_boundaries(boundaries, scores, max_segments=int(hard.sum()))
    assert torch.equal(same, boundaries) and none == 0  # under the cap: untouched


@pytest.mark.parametrize("execution", ["static", "padded"])
def test_capacity_binds_exactly_as_the_policy_says(execution, one_thread):
    """Every logit far above 0 (all patches boundaries) and an untrained predictor (about half of them) both exceed
    1.25 x the budget in training: the batch gets exactly the cap's segments, each image at least one, every patch
    in a segment; eval is never capped."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, execution=execution)
    images = load_images(flickr_photos(8), preprocess)
    tower = get_tower(model)
    cap = math.ceil(1.25 * 8 * 16)
    for bias in (50.0, 0.0):
        with torch.no_grad():
            tower.predictor.fc2.bias.fill_(bias)
        model.train()
        with dtplib.trace(model) as t:
            features = model.encode_image(images)
        assert torch.isfinite(features).all()
        assert t.tokens.sum().item() == cap and (t.tokens >= 1).all()
        assert tower.last_dropped.item() > 0 and tower.last_segments.sum().item() == cap
        assert t.boundaries[:, -1].all()  # every image keeps its closing boundary: no patch is dropped
        assert (t.segment_ids.amax(1) == t.tokens - 1).all()
        model.eval()
        with torch.no_grad(), dtplib.trace(model) as t:
            model.encode_image(images)
        assert t.tokens.sum().item() > cap and tower.last_dropped.item() == 0
    with pytest.raises(ValueError, match="capacity must be 0"):
        dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, capacity=0.5)


def test_batch_topk_shares_one_budget_and_evaluates_per_image(one_thread):
    """Training: exactly B * ceil(N/c) segments over the batch, unequal per image, and a predictor gradient from the
    contrastive loss alone. The running threshold brings the eval count on the training batch to that budget, and
    an eval embedding is the same alone and in a batch of 8. An older checkpoint without the threshold loads."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries="batch-topk",
                                                              boundary_loss_weight=0)
    files = flickr_photos(8)
    images, texts = load_images(files, preprocess), open_clip.get_tokenizer("ViT-Ti-8-64")(flickr_captions(files))
    tower = get_tower(model)
    model.train()
    with dtplib.trace(model) as t:
        loss = open_clip.ClipLoss()(*model(images, texts)[:3])
    assert t.tokens.sum().item() == 8 * 16 and len(set(t.tokens.tolist())) > 1
    loss.backward()
    grads = [p.grad for p in tower.predictor.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    with torch.no_grad():
        for _ in range(80):  # the threshold follows the batch's quantile (momentum 0.1)
            model.encode_image(images)
    model.eval()
    with torch.no_grad():
        with dtplib.trace(model) as t:
            batched = model.encode_image(images)
        alone = torch.cat([model.encode_image(images[i:i + 1]) for i in range(8)])
    assert abs(t.tokens.sum().item() - 8 * 16) <= 2
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("predictor.threshold")}
    fresh, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries="batch-topk")
    fresh.load_state_dict(state)  # strict: the missing threshold is the threshold rule's 0
    assert get_tower(fresh).predictor.threshold.item() == 0


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


class CountHostReads:
    """Counts calls of the Tensor methods that read a value to the host, while inside the block."""

    def __enter__(self):
        self.calls, self.saved = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self.counting(name, method))
        return self

    def counting(self, name, method):
        def wrapped(tensor, *args, **kwargs):
            self.calls.append(name)
            return method(tensor, *args, **kwargs)
        return wrapped

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("boundaries", ["threshold", "batch-topk"])
def test_static_training_forward_and_backward_read_nothing_from_the_host(boundaries, one_thread):
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries=boundaries)
    images = load_images(flickr_photos(8), preprocess)
    model.train()
    model.encode_image(images).square().mean().backward()  # first call: lazy caches (patch order, ...)
    with CountHostReads() as reads:
        loss = model.encode_image(images).square().mean() + get_tower(model).last_boundary_loss
        loss.backward()
    assert reads.calls == []
    with CountHostReads() as reads:  # the counter itself sees what the host-planned path reads
        with dtplib.use_execution(model, "packed"):
            model.encode_image(images)
    assert "tolist" in reads.calls


def test_train_step_reads_nothing_from_the_host(one_thread):
    from dtplib.training.optim import make_optimizer, train_step

    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    files = flickr_photos(8)
    images, texts = load_images(files, preprocess), open_clip.get_tokenizer("ViT-Ti-8-64")(flickr_captions(files))
    optimizer = make_optimizer(model, lr=1e-4, wd=0.1)  # fused, the default

    def compute():
        image_features, text_features, logit_scale = model(images, texts)[:3]
        return open_clip.ClipLoss()(image_features, text_features, logit_scale), logit_scale

    model.train()
    train_step(model, optimizer, compute, lr=1e-4, step=0, device=torch.device("cpu"), grad_clip_norm=1.0)
    with CountHostReads() as reads:
        result = train_step(model, optimizer, compute, lr=1e-4, step=1, device=torch.device("cpu"),
                            grad_clip_norm=1.0)
    assert reads.calls == []
    assert result.finite.item() and result.segments.shape == (8,)


@pytest.mark.slow
@pytest.mark.parametrize("boundaries", ["threshold", "batch-topk"])
def test_static_tower_compiles_to_one_graph_for_every_batch(boundaries, one_thread):
    """torch.compile(fullgraph=True, dynamic=False) of the training tower serves six batches whose boundaries
    differ with one graph and no recompile (a counting backend), and agrees with eager in eval."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundaries=boundaries)
    images = load_images(flickr_photos(48), preprocess)
    counter = CompileCounter()
    compiled = torch.compile(model.visual, backend=counter, fullgraph=True, dynamic=False)
    model.train()
    seen = set()
    for batch in images.split(8):
        compiled(batch).square().mean().backward()
        seen.add(tuple(get_tower(model).last_segments.tolist()))
    assert len(seen) == 6 and counter.frame_count == 1
    model.eval()
    with torch.no_grad():  # compiled eval runs the static buffer at full capacity, eager eval the packed path
        batched = compiled(images[:8])
        torch.testing.assert_close(batched, model.visual(images[:8]), atol=1e-5, rtol=0)
        assert counter.frame_count == 2  # eval is its own graph (no noise, no cap), once
        alone = torch.cat([compiled(images[i:i + 1]) for i in range(8)])  # one more graph, for batch 1
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)  # batch invariance on the static path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_static_path_matches_padded_and_never_synchronises():
    """On CUDA: static varlen attention (bf16, the tail covered by extra sequences) against each image alone; the
    whole B/32 tower static against padded in fp32 (window attention) and in bf16 (varlen), gradients finite; no
    synchronisation in a training forward and backward (torch's sync debug mode)."""
    device = torch.device("cuda")
    lengths = [2, 17, 5, 50, 33, 2, 50, 9]
    rows = sum(lengths) + 70  # a tail longer than one sequence of L = 50
    packing = StaticPacking.plan(torch.tensor(lengths, device=device), rows=rows, max_length=50)
    assert_attends_each_image_alone(packing, lengths, rows, "cuda")
    model, images, padded = cuda_b32_and_padded_copy()
    for training in (False, True):
        static_out, static_grads, static_tokens = forward_backward(model, images, training)
        padded_out, _, padded_tokens = forward_backward(padded, images, training)
        assert torch.equal(static_tokens, padded_tokens)
        torch.testing.assert_close(static_out, padded_out, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        static_bf16, grads_bf16, _ = forward_backward(model, images, True)
        padded_bf16, _, _ = forward_backward(padded, images, True)
    torch.testing.assert_close(static_bf16.float(), padded_bf16.float(), atol=5e-2, rtol=5e-2)
    assert all(torch.isfinite(g).all() for g in grads_bf16.values())

    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.encode_image(images).float().square().mean().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, torch.autocast("cuda", dtype=torch.bfloat16):
            warnings.simplefilter("always")
            model.encode_image(images).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []
