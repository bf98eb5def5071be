"""FLOPs: the published ViT-B/32 profile, analytic model == fvcore (attention counted) == torch's FlopCounterMode,
realised boundaries, CLI."""

import contextlib
import math

import open_clip
import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import FLICKR, flickr_photos
from fvcore.nn import FlopCountAnalysis
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dtplib
from dtplib import flops as flops_command
from dtplib.common.images import load_images
from dtplib.measure import flops

TI_PATCHES = 64  # ViT-Ti-8-64: 64 x 64 images, 8 x 8 patches


@pytest.fixture(scope="module")
def ti_photos():
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    return load_images(flickr_photos(16), preprocess)  # 16 x 3 x 64 x 64


def test_open_clip_vit_b32_matches_published_profile():
    """open_clip's docs/model_profile.csv: ViT-B-32 image tower 4.41 GMACs, text tower 2.98 GMACs."""
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
    counted = flops.clip_macs(model)
    assert counted["image"] == pytest.approx(4.41e9, rel=0.01)
    assert counted["text"] == pytest.approx(2.98e9, rel=0.01)
    assert flops.total(flops.analytic_macs(model)) == counted["image"]
    assert flops.total(flops.text_macs(model)) == counted["text"]
    assert flops.clip_macs_at(model) == counted
    assert flops.attention_macs(model) == 12 * 2 * 50 ** 2 * 768  # QK^T + AV, 12 layers, 50 tokens

    # the pitfall: fvcore's defaults in eval mode without gradients, MultiheadAttention on its fast path
    assert torch.backends.mha.get_fastpath_enabled()  # mha_fastpath_disabled restored it
    model.eval()
    with torch.no_grad():
        naive = FlopCountAnalysis(model.visual, torch.zeros(1, 3, 224, 224)).unsupported_ops_warnings(False)
        naive_macs = naive.total() - naive.by_operator()["layer_norm"]
    assert naive_macs == pytest.approx(2.95e9, rel=0.01)  # the published "2.95 GFLOPs": MLP + patch embedding


TI_VARIANTS = [(1, False), (2, False), (4, False), (10, False), (2, True), (4, True), (10, True)]


@pytest.mark.parametrize(("arch", "compression", "upsample"),
                         [("ViT-Ti-8-64", c, up) for c, up in TI_VARIANTS]
                         + [("ViT-B-32", 4, False), ("ViT-B-32", 10, True)])
def test_analytic_equals_fvcore_at_fixed_boundaries(arch, compression, upsample, ti_photos):
    model, _, _ = dtplib.create_model_and_transforms(arch, compression=compression, upsample=upsample)
    tower = dtplib.get_tower(model)
    images = ti_photos[:2] if arch == "ViT-Ti-8-64" else None  # B-32: one random image
    if compression == 1:
        assert tower.predictor is None
        expected = flops.analytic_macs(model)
        assert expected["predictor"] == expected["downsample"] == expected["upsample"] == 0
        assert flops.total(expected) == flops.image_fvcore_macs(model, images)
        return
    segments = flops.fixed_segments(tower.num_patches, compression)
    assert segments == math.ceil(tower.num_patches / compression)
    expected = flops.analytic_macs(model, segments)
    assert expected["predictor"] > 0  # forced boundaries replace the logits, the predictor still runs
    assert expected["downsample"] == expected["upsample"] == 0  # equal counts: pooled by scatter and gather
    padded = flops.analytic_macs(model, segments, execution="padded")  # the reference path's membership einsums
    assert padded["downsample"] > 0 and (padded["upsample"] > 0) == upsample
    assert (expected["post_layers"] > 0) == upsample
    with dtplib.forced_boundaries(model, compression), dtplib.trace(model) as t:
        counted = flops.image_fvcore_macs(model, images)
    assert (t.tokens == segments).all()
    assert flops.total(expected) == pytest.approx(counted, rel=1e-12)  # equal, not just within 1%
    if arch == "ViT-Ti-8-64" and compression == 4:  # a boundary on every patch: S = N, dearer than the plain ViT
        with dtplib.forced_boundaries(model, 1):
            assert flops.total(flops.analytic_macs(model, TI_PATCHES)) == flops.image_fvcore_macs(model, images)


def torch_macs(model: nn.Module, images: torch.Tensor, backend: SDPBackend | None = None) -> float:
    """MACs per image of encode_image by torch's own counter (FLOPs, 2 per MAC), in eval mode without gradients."""
    kernel = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), flops.mha_fastpath_disabled(), kernel:
        model.encode_image(images)
    return counter.get_total_flops() / 2 / len(images)


@pytest.mark.parametrize(("dtp", "boundaries"), [(None, None), ({"compression": 4}, 4),
                                                 ({"compression": 10, "upsample": True, "boundaries": "topk"}, None)],
                         ids=["open_clip-ViT-Ti", "uniform-4x", "topk-10x-upsample"])
def test_torch_flop_counter_agrees_with_fvcore(dtp, boundaries, ti_photos):
    """A second, independent counter: torch.utils.flop_counter.FlopCounterMode (dispatch level, no tracing) against
    fvcore with our handles, on the plain open_clip ViT-Ti and DTP towers whose every image has the same count.

    Equal to the MAC, after two known differences: FlopCounterMode counts 2 FLOPs per MAC (halved here), and it has
    formulas for the CUDA SDPA kernels only: on CPU, SDPA's fused kernel (`_scaled_dot_product_flash_attention_for_cpu`)
    is invisible to it, so its default count misses QK^T and AV exactly; with SDPA's math backend attention runs as
    bmm, which it counts. Everything else (linear, conv, the predictor, pooling by scatter and gather) agrees."""
    images = ti_photos[:2]
    if dtp is None:
        model, _, _ = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    else:
        model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", **dtp)
    model.eval()
    forced = dtplib.forced_boundaries(model, boundaries) if boundaries else contextlib.nullcontext()
    with forced, dtplib.trace(model) if dtp else contextlib.nullcontext() as t:
        counted = flops.image_fvcore_macs(model, images)
        with_math = torch_macs(model, images, SDPBackend.MATH)
        default = torch_macs(model, images)
    segments = None
    if dtp:
        segments = flops.fixed_segments(TI_PATCHES, dtp["compression"])
        assert (t.tokens == segments).all()  # every image at the same count: the analytic cost is exact
    attention = flops.attention_macs(model, segments)
    assert with_math == pytest.approx(counted, rel=1e-12)  # equal, not within a tolerance
    assert counted - default in (0, pytest.approx(attention, rel=1e-12))  # 0 once torch has a CPU SDPA formula
    assert counted == pytest.approx(flops.total(flops.analytic_macs(model, segments)), rel=1e-12)


def test_realised_at_forced_boundaries_is_the_fixed_ratio(ti_photos):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    fixed = flops.total(flops.analytic_macs(model, flops.fixed_segments(TI_PATCHES, 4))) / 1e9
    with dtplib.forced_boundaries(model, 4):
        stats = flops.realised(model, ti_photos, batch_size=8)
    assert stats["gmacs_mean"] == stats["gmacs_min"] == stats["gmacs_max"] == pytest.approx(fixed, rel=1e-12)
    padded = flops.total(flops.analytic_macs(model, flops.fixed_segments(TI_PATCHES, 4), execution="padded")) / 1e9
    assert stats["gmacs_std"] == 0 and stats["padded_gmacs_mean"] == pytest.approx(padded, rel=1e-12)
    assert padded > fixed  # no padding, but the reference path's membership einsums
    assert stats["compression_mean"] == stats["realised_compression"] == 4


def test_realised_boundaries_of_a_random_init_10x_model(ti_photos):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=10)
    stats = flops.realised(model, ti_photos, batch_size=8)
    assert stats["compression_min"] < stats["compression_max"]  # content-dependent counts
    at = lambda c: flops.total(flops.analytic_macs(model, TI_PATCHES / c)) / 1e9
    assert at(stats["compression_max"]) <= stats["gmacs_mean"] <= at(stats["compression_min"])
    assert stats["gmacs_min"] == pytest.approx(at(stats["compression_max"]), rel=1e-12)
    assert stats["padded_gmacs_mean"] >= stats["gmacs_mean"]

    # packed: each image alone through fvcore; padded: fvcore on each batch of 8, per image
    segments = flops.realised_segments(model, ti_photos, batch_size=8)
    per_image = flops.total(flops.analytic_macs(model, segments))  # 16, one per image
    for i in (int(segments.argmin()), int(segments.argmax())):
        assert per_image[i].item() == flops.image_fvcore_macs(model, ti_photos[i:i + 1])
    with dtplib.use_execution(model, "padded"):
        padded = sum(flops.image_fvcore_macs(model, batch) for batch in ti_photos.split(8)) / 2
    packed = sum(flops.image_fvcore_macs(model, batch) for batch in ti_photos.split(8)) / 2
    assert packed < padded  # the packed path computes nothing for padding
    assert stats["padded_gmacs_mean"] == pytest.approx(padded / 1e9, rel=1e-12)
    assert stats["gmacs_mean"] == pytest.approx(per_image.mean().item() / 1e9, rel=1e-12)


def test_patch_dropout_and_text_of_open_clip_ti(ti_photos):
    """Training-time FLIP patch dropout (the bench's peer) and the Ti text tower, analytic == fvcore."""
    model, _, _ = open_clip.create_model_and_transforms("ViT-Ti-8-64", force_patch_dropout=0.5)
    model.train()
    counted = flops.fvcore_macs(model.visual, ti_photos[:2]) / 2
    assert flops.total(flops.analytic_macs(model, patch_dropout=0.5)) == counted
    assert counted < flops.total(flops.analytic_macs(model))
    assert flops.total(flops.text_macs(model)) == flops.text_fvcore_macs(model)
    assert model.training  # restored


def test_unhandled_ops_are_not_silently_zero():
    class Distances(nn.Module):
        def forward(self, x):
            return torch.cdist(x, x)  # a matrix product fvcore has no handle for

    with pytest.raises(RuntimeError, match="no MAC handle"):
        flops.fvcore_macs(Distances(), torch.zeros(4, 8))
    assert flops.fvcore_macs(Distances(), torch.zeros(4, 8), strict=False) == 0


def test_bad_segment_counts(ti_photos):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    with pytest.raises(ValueError, match="segments per image"):
        flops.analytic_macs(model, TI_PATCHES + 1)
    plain, _, _ = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    with pytest.raises(ValueError, match="does not pool"):
        flops.analytic_macs(plain, 16)
    with pytest.raises(ValueError, match="need a DTP-ViT tower"):
        flops.realised(plain, ti_photos[:2])
    with pytest.raises(ValueError, match="patch dropout"):
        flops.analytic_macs(model, 16, patch_dropout=0.5)


def test_cli_table_and_csv(tmp_path, capsys):
    output = tmp_path / "flops.csv"
    flops_command.main(["--model", "DTP-ViT-Ti-8-64-4x-up", "--images", str(FLICKR / "images"), "--num-images", "8",
                "--compressions", "1,4", "--output", str(output)])
    printed = capsys.readouterr().out
    for text in ("GMACs", "GFLOPs", "total, fvcore", "fixed 4x", "realised, padded", "text tower"):
        assert text in printed
    frame = pd.read_csv(output)
    assert {"hardware", "dtype", "batch_size", "torch", "commit"} <= set(frame.columns)
    fixed = frame[frame["setting"].str.startswith("fixed")]
    assert list(fixed["segments"]) == [64, 16]
    assert (fixed["analytic GMACs"] - fixed["fvcore GMACs"]).abs().max() < 1e-12
    assert (frame["analytic GFLOPs"] == 2 * frame["analytic GMACs"]).all()


def test_cli_reads_a_reduction_label(tmp_path, capsys):
    """`--model NAME+METHOD`, as the benchmark labels a reduction: one row at the method's budget, analytic = fvcore."""
    output = tmp_path / "flops.csv"
    flops_command.main(["--model", "DTP-ViT-Ti-8-64-4x+tome", "--output", str(output)])
    assert "DTP-ViT-Ti-8-64-4x+tome: image tower" in capsys.readouterr().out
    image = pd.read_csv(output).query("tower == 'image'")
    assert list(image["setting"]) == ["tome 4x"] and list(image["model"]) == ["DTP-ViT-Ti-8-64-4x+tome"]
    assert list(image["segments"]) == [16] and (image["analytic GMACs"] - image["fvcore GMACs"]).abs().max() < 1e-12


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "DTP-ViT-B-32-3x"], "unknown model"),
    (["--model", "DTP-ViT-Ti-8-64-4x+padded"], "the only modifier here is a reduction"),
    (["--model", "DTP-ViT-Ti-8-64-1x+tome"], "needs a DTP tower that pools"),
    (["--model", "ViT-Ti-8-64", "--images", "/nonexistent/photos"], "image folder not found"),
    (["--model", "ViT-Ti-8-64", "--compressions", "1,2.5"], "whole numbers"),
    (["--model", "ViT-Ti-8-64", "--force-image-size", "36"], "not a multiple of ViT-Ti-8-64's patch size 8"),
    (["--model", "ViT-Ti-8-64", "--force-image-size", "0"], "whole number of pixels > 0"),
])
def test_cli_rejects_bad_input_before_building(args, message, capsys, monkeypatch):
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit):
        flops_command.main(args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["DTP-ViT-Ti-8-64-1x", "ViT-Ti-8-64"])
def test_low_resolution_counts_the_patches_it_has(name):
    """CLIPA's low resolution (open_clip's force_image_size): at 32 px the Ti tower has 16 patches, DTP-4x's budget,
    and analytic == fvcore on a 32 px image; the image tower's forward costs about a quarter of 64 px's (the token-wise
    MACs scale with the tokens, 17 against 65; attention with their square)."""
    costs = {}
    for size in (32, 64):
        model = open_clip.create_model_and_transforms(name, force_image_size=size)[0].eval()
        assert flops.patch_count(flops.image_tower(model)) == (size // 8) ** 2
        assert flops.image_size(model) == (size, size)
        costs[size] = flops.total(flops.analytic_macs(model))
        assert costs[size] == flops.image_fvcore_macs(model)  # a random image at the model's own size
    assert 0.24 < costs[32] / costs[64] < 0.27


def test_cli_reports_the_forced_size(capsys):
    frame = flops_command.main(["--model", "DTP-ViT-Ti-8-64-1x", "--force-image-size", "32", "--compressions", "1"])
    image = frame[frame["tower"] == "image"].iloc[0]
    assert image["model"] == "DTP-ViT-Ti-8-64-1x+px32" and image["segments"] == 16  # the benchmark's spec label
    assert image["analytic GMACs"] == pytest.approx(image["fvcore GMACs"], rel=1e-12)
