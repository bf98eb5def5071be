"""ToMe (dtplib.tower.tome): the matching against its definition, r = 0 is the plain ViT, static token counts,
sizes and groups, batch invariance, gradients, one compiled graph, the MAC schedule against DTP's budget, and the
analytic count against fvcore's."""

import math

import pytest
import timm
import torch
import torch.nn as nn
from conftest import flickr_photos
from fvcore.nn import FlopCountAnalysis
from timm.data import create_transform, resolve_data_config

import dtplib  # noqa: F401  (registers the DTP towers with timm)
from dtplib.common.images import load_images
from dtplib.measure import flops
from dtplib.tower import tome
from dtplib.tower.clip import ARCHS

TI_PATCHES, B32_PATCHES = 64, 49  # ViT-Ti-8-64: 8 x 8 patches; ViT-B/32 at 224 px: 7 x 7


@pytest.fixture(scope="module")
def ti_tower():
    torch.manual_seed(0)
    return timm.create_model("dtp_vit_tiny_patch8_clip_64_1x").eval()  # the plain Ti ViT on DTP's code path


@pytest.fixture(scope="module")
def ti_short(ti_tower):
    pre, short = ARCHS["ViT-Ti-8-64"].split
    return list(ti_tower.blocks[pre:pre + short])


@pytest.fixture(scope="module")
def ti_tokens(ti_tower):
    """The pre-layers' output on 6 real photos: B x (1 + N) x D, CLS first."""
    photos = load_images(flickr_photos(6), create_transform(**resolve_data_config({}, model=ti_tower)))
    pre = ARCHS["ViT-Ti-8-64"].split[0]
    with torch.no_grad():
        patches, cls = ti_tower.forward_intermediates(photos, indices=[pre - 1], output_fmt="NLC",
                                                      return_prefix_tokens=True, intermediates_only=True)[0]
    return torch.cat([cls, patches], dim=1)  # 6 x 65 x 192


def ti_schedule(short, compression):
    return tome.merge_schedule(short, TI_PATCHES, tome.dense_macs(short, 1 + math.ceil(TI_PATCHES / compression)))


def naive_matching(metric: torch.Tensor, r: int) -> list[set[tuple[int, int]]]:
    """Per image, the merged (A token, B token) pairs by ToMe's definition, with loops."""
    pairs = []
    for image in metric:
        unit = image / image.norm(dim=-1, keepdim=True)
        side_a, side_b = range(2, len(unit), 2), range(1, len(unit), 2)  # token 0 (CLS) never merges
        best = {a: max(side_b, key=lambda b: float(unit[a] @ unit[b])) for a in side_a}
        ranked = sorted(side_a, key=lambda a: -float(unit[a] @ unit[best[a]]))
        pairs.append({(a, best[a]) for a in ranked[:r]})
    return pairs


def test_matching_is_tomes_definition():
    torch.manual_seed(0)
    metric, r = torch.randn(3, 11, 8), 4  # 3 images, CLS + 10 tokens
    merge = tome.bipartite_soft_matching(metric, r)
    assert merge.tokens == 7 and merge.slot.shape == (3, 11)
    for image, expected in zip(merge.slot, naive_matching(metric, r), strict=True):
        assert sorted(set(image.tolist())) == list(range(7))  # every slot filled
        assert image[0] == 0  # CLS first, alone
        shared = {(a, b) for a in range(0, 11, 2) for b in range(1, 11, 2) if image[a] == image[b]}
        assert shared == expected
    with pytest.raises(ValueError, match="one bipartite round merges 0..5 of 11 tokens, got r=6"):
        tome.bipartite_soft_matching(metric, 6)
    x, size = torch.randn(3, 11, 5), torch.randint(1, 4, (3, 11, 1)).float()
    merged, merged_size = merge.weighted_mean(x, size)
    for slot in range(7):  # each merged token: the size-weighted mean of its members
        members = (merge.slot == slot).unsqueeze(-1).float()  # 3 x 11 x 1
        assert torch.allclose(merged_size[:, slot], (members * size).sum(1))
        assert torch.allclose(merged[:, slot], (members * size * x).sum(1) / (members * size).sum(1), atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_r0_equals_the_plain_blocks(ti_short, ti_tokens, fused):
    for block in ti_short:
        block.attn.fused_attn = fused
    try:
        plain = ti_tokens
        with torch.no_grad():
            for block in ti_short:
                plain = block(plain)
            result = tome.run_tome(ti_short, ti_tokens, [0] * (len(ti_short) + 1), source=True)
            ones = torch.ones(*ti_tokens.shape[:2], 1)
            one_block, size, _ = tome.tome_block(ti_short[0], ti_tokens, ones, r=0)  # log(1) = 0 in the logits
    finally:
        for block in ti_short:
            block.attn.fused_attn = True
    assert torch.allclose(result.tokens, plain, atol=1e-5)
    assert result.size is None and torch.equal(result.groups, torch.arange(TI_PATCHES).expand(6, -1))
    assert torch.allclose(one_block, ti_short[0](ti_tokens), atol=1e-5) and size is ones


def test_token_counts_sizes_and_groups(ti_short, ti_tokens):
    schedule = ti_schedule(ti_short, 4)
    assert schedule[0] > 0  # Ti's 4 shortened layers at 4x need the entrance merge
    record = []
    with torch.no_grad():
        result = tome.run_tome(ti_short, ti_tokens, schedule, source=True, record=record)
    seen = tome.tome_layer_tokens(TI_PATCHES, schedule)
    assert [tokens.shape[1] for tokens, _ in record] == [t - r for t, r in zip(seen, schedule[1:], strict=True)]
    out = 1 + TI_PATCHES - sum(schedule)
    assert result.tokens.shape == (6, out, 192) and result.size.shape == (6, out, 1)
    assert torch.all(result.size.sum(1) == 1 + TI_PATCHES) and torch.all(result.size[:, 0] == 1)  # CLS alone
    assert result.groups.shape == (6, TI_PATCHES) and result.groups.min() >= 0 and result.groups.max() == out - 2
    counts = torch.stack([torch.bincount(g, minlength=out - 1) for g in result.groups])  # 6 x (out-1)
    assert torch.equal(counts, result.size[:, 1:, 0].long())  # each patch in one token; sizes count them
    assert torch.equal(record[-1][1], result.groups)
    assert not torch.equal(result.groups[0], result.groups[1])  # grouped by content


def test_batch_invariance_and_determinism_in_eval(ti_short, ti_tokens):
    schedule = ti_schedule(ti_short, 4)
    with torch.no_grad():
        batch = tome.run_tome(ti_short, ti_tokens, schedule, source=True)
        again = tome.run_tome(ti_short, ti_tokens, schedule, source=True)
        alone = [tome.run_tome(ti_short, ti_tokens[i:i + 1], schedule, source=True) for i in range(6)]
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.groups, again.groups)
    assert torch.allclose(batch.tokens, torch.cat([a.tokens for a in alone]), atol=1e-5)
    assert torch.equal(batch.groups, torch.cat([a.groups for a in alone]))


def test_gradient_reaches_every_block(ti_short, ti_tokens):
    schedule = ti_schedule(ti_short, 4)
    for block in ti_short:
        block.train().zero_grad()
    try:
        tokens = ti_tokens.clone().requires_grad_()
        result = tome.run_tome(ti_short, tokens, schedule)
        result.tokens.square().mean().backward()
    finally:
        for block in ti_short:
            block.eval()
    assert tokens.grad.abs().sum() > 0
    for block in ti_short:
        for name in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            grad = block.get_parameter(name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_compiled_run_is_one_graph(ti_short, ti_tokens):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    schedule = ti_schedule(ti_short, 4)
    run = torch.compile(lambda x: tome.run_tome(ti_short, x, schedule, source=True), backend=counting_backend,
                        fullgraph=True)
    with torch.no_grad():
        first, second = run(ti_tokens[:3]), run(ti_tokens[3:])
        eager = tome.run_tome(ti_short, ti_tokens[3:], schedule, source=True)
    assert len(graphs) == 1
    assert torch.allclose(second.tokens, eager.tokens, atol=1e-5) and torch.equal(second.groups, eager.groups)
    assert not torch.equal(first.groups, second.groups)


@pytest.fixture(scope="module")
def b32_short():
    tower = timm.create_model("dtp_vit_base_patch32_clip_224_1x")
    pre, short = ARCHS["ViT-B-32"].split
    return list(tower.blocks[pre:pre + short])


@pytest.fixture(scope="module")
def ti_short_10():
    """Ti-sized blocks with 10 shortened layers (a depth-12 Ti split 2 + 10) on the 8 x 8 grid."""
    return [timm.models.vision_transformer.Block(192, 3, qkv_bias=True) for _ in range(10)]


@pytest.mark.parametrize("compression", [2, 4, 10])
@pytest.mark.parametrize("grid", ["ti", "ti_10", "b32"])
def test_schedule_meets_dtps_macs(grid, compression, request):
    short = request.getfixturevalue({"ti": "ti_short", "ti_10": "ti_short_10", "b32": "b32_short"}[grid])
    patches = B32_PATCHES if grid == "b32" else TI_PATCHES
    target = tome.dense_macs(short, 1 + math.ceil(patches / compression))
    schedule = tome.merge_schedule(short, patches, target)
    tome.check_schedule(patches, schedule, len(short))
    assert abs(tome.tome_macs(short, patches, schedule) / target - 1) <= 0.01
    assert all(t >= 2 for t in tome.tome_layer_tokens(patches, schedule))
    if compression == 2:
        assert schedule[0] == 0  # reached by merging inside the layers alone


def test_schedule_rule_prefers_constant_r(ti_short_10):
    target = tome.tome_macs(ti_short_10, TI_PATCHES, [0] + [3] * 10)  # ToMe's r = 3 costs exactly this
    assert tome.merge_schedule(ti_short_10, TI_PATCHES, target, tolerance=0) == [0] + [3] * 10


@pytest.mark.parametrize("grid,compression", [("ti", 4), ("ti", 10), ("b32", 4)])
def test_analytic_equals_fvcore(grid, compression, request, ti_short, ti_tokens):
    short = ti_short if grid == "ti" else request.getfixturevalue("b32_short")
    patches = TI_PATCHES if grid == "ti" else B32_PATCHES
    schedule = tome.merge_schedule(short, patches, tome.dense_macs(short, 1 + math.ceil(patches / compression)))

    class Run(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(short)

        def forward(self, x):
            return tome.run_tome(list(self.blocks), x, schedule).tokens

    x = ti_tokens[:2] if grid == "ti" else torch.randn(2, 1 + patches, 768)
    analysis = FlopCountAnalysis(Run().eval(), (x,)).clear_op_handles().set_op_handle(**flops.mac_handles())
    analysis = analysis.set_op_handle(**dict.fromkeys(flops.NO_MAC_OPS + tome.ELEMENTWISE_OPS))
    with torch.no_grad():
        counted = analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total() / 2
    assert not analysis.unsupported_ops()
    assert abs(counted / tome.tome_macs(short, patches, schedule) - 1) <= 0.01
    assert counted == tome.tome_macs(short, patches, schedule)  # exact, in fact


@pytest.mark.parametrize("schedule,message", [
    ([0, 0, 0], "5 counts"),
    ([0, 40, 0, 0, 0], "at most 32"),
    ([64, 0, 0, 0, 0], "at least 2"),
    ([0, 1.5, 0, 0, 0], "counts >= 0"),
])
def test_bad_schedules(ti_short, ti_tokens, schedule, message):
    with pytest.raises(ValueError, match=message):
        tome.run_tome(ti_short, ti_tokens, schedule)


def test_unreachable_target_is_an_error(ti_short):
    with pytest.raises(ValueError, match="no ToMe schedule"):
        tome.merge_schedule(ti_short, TI_PATCHES, tome.dense_macs(ti_short, 1.5))
