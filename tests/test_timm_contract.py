"""timm's and open_clip's model contract on every registered DTP-ViT timm name: what timm's tests/test_models.py checks
of a ViT (forward, backward, grad checkpointing, forward_features/forward_head, reset_classifier, forward_intermediates,
prune_intermediate_layers, features_only, the pretrained cfg), along the merged path, and the clear errors where a timm
feature cannot follow it. Tiny towers (a 4 x 4 grid of 8-pixel patches, width 32) of real photos."""

from contextlib import nullcontext
from dataclasses import replace

import open_clip
import pytest
import timm
import torch
from conftest import flickr_photos
from timm.data import create_transform, resolve_data_config

import dtplib
from dtplib.common.images import load_images, open_rgb
from dtplib.tower.clip import ARCHS
from dtplib.tower.model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

NAMES = sorted(timm.list_models("dtp_vit_*"))  # registered at `import dtplib`
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}  # a 4 x 4 grid; the arch's depth and split
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **TINY, **kwargs)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """4 Flickr8k photos through timm's transform of a DTP model's pretrained_cfg (CLIP's preprocessing), 32 px."""
    transform = create_transform(**resolve_data_config(model=tiny(NAMES[0])))
    return torch.stack([transform(open_rgb(path)) for path in flickr_photos(4)])


def test_every_arch_ratio_and_upsampling_has_a_timm_name():
    assert len(NAMES) == 21  # 3 archs x (1x, and 2x, 4x, 10x with and without upsampling)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_grad_checkpointing(name, photos):
    model = tiny(name).eval()
    with torch.no_grad():
        out = model(photos)
        model.set_grad_checkpointing()
        again = model(photos)
    assert out.shape == (4, model.num_features) and out.isfinite().all()
    torch.testing.assert_close(again, out)
    model = tiny(name, num_classes=42).train()
    logits = model(photos)
    logits.mean().backward()
    assert logits.shape == (4, 42)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_head_reset_classifier_and_cfg(name, photos):
    model = tiny(name, num_classes=5).eval()
    with torch.no_grad():
        features = model.forward_features(photos)  # B x T x D
        pre_logits = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(model.forward_head(features), model(photos))
        model.reset_classifier(0)
        pooled = model(photos)
        model.reset_classifier(0, "")
        unpooled = model(photos)
    assert features.ndim == 3 and features.shape[-1] == model.num_features
    assert pre_logits.shape == (4, model.head_hidden_size) and model.num_classes == 0
    torch.testing.assert_close(pooled, pre_logits)
    torch.testing.assert_close(unpooled, features)  # no pool, no head: forward_features' tokens

    cfg, registered = model.pretrained_cfg, timm.models.get_pretrained_cfg(name)
    assert cfg["input_size"] == (3, 32, 32) and cfg["fixed_input_size"] and registered.fixed_input_size
    arch = next(a for a in ARCHS.values() if name.startswith(a.timm_prefix))
    assert registered.input_size == (3, arch.image_size, arch.image_size)
    assert (cfg["mean"], cfg["std"], cfg["interpolation"], cfg["crop_pct"]) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                                                               "bicubic", 1.0)
    assert cfg["num_classes"] == 0 and cfg["pool_size"] is None and not registered.has_weights
    state = tiny(name, num_classes=5).state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_follow_the_merged_path(name, photos):
    """Pre-layers at full length, shortened layers as segments (NLC) or each patch with its segment's token (NCHW),
    the final output forward_features'; indices, stop_early, intermediates_only, prefix tokens and norm as timm's."""
    model = tiny(name).eval()
    depth, pre, short, width = len(model.blocks), model.dtp.pre_layers, model.dtp.short_layers, model.num_features
    with torch.no_grad(), dtplib.trace(model) as t:
        final, spatial = model.forward_intermediates(photos)
        out, features = model(photos), model.forward_features(photos)
        _, tokens = model.forward_intermediates(photos, output_fmt="NLC")
        last_two = model.forward_intermediates(photos, indices=2, intermediates_only=True)
        early = model.forward_intermediates(photos, indices=[0, pre], stop_early=True, intermediates_only=True)
        (first, cls_token), = model.forward_intermediates(photos, indices=[0], return_prefix_tokens=True,
                                                          output_fmt="NLC", intermediates_only=True)
        normed, = model.forward_intermediates(photos, indices=[0], norm=True, output_fmt="NLC",
                                              intermediates_only=True)
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(model.forward_head(final), out)
    assert len(spatial) == len(tokens) == depth and all(y.shape == (4, width, 4, 4) for y in spatial)
    ids, counts = t.segment_ids, t.tokens  # B x N at grid positions, B
    for index, (y, z) in enumerate(zip(spatial, tokens, strict=True)):
        per_patch = y.flatten(2).transpose(1, 2)  # B x N x D at grid positions
        if model.pools and pre <= index < pre + short:
            assert z.shape[1] == counts.max()  # segments, padded to the batch's largest count
            torch.testing.assert_close(per_patch, torch.stack([z[b, ids[b]] for b in range(4)]))
            assert all(z[b, counts[b]:].abs().sum() == 0 for b in range(4))  # the padding zero
        else:
            torch.testing.assert_close(per_patch, z)
    for got, want in zip(last_two + early, spatial[-2:] + [spatial[0], spatial[pre]], strict=True):
        torch.testing.assert_close(got, want)
    assert cls_token.shape == (4, 1, width)
    torch.testing.assert_close(first, tokens[0])
    torch.testing.assert_close(normed, model.norm(torch.cat([cls_token, first], dim=1))[:, 1:])
    with torch.no_grad():
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(photos)[0], final)


@pytest.mark.parametrize("name", [n for n in NAMES if "tiny" in n or n.endswith("_up")])
def test_prune_intermediate_layers_keeps_the_merged_intermediates(name, photos):
    model = tiny(name).eval()
    keep = [model.dtp.pre_layers - 1, model.dtp.pre_layers]  # the last full-length layer and the first shortened
    with torch.no_grad():
        wanted = model.forward_intermediates(photos, indices=keep, intermediates_only=True)
        assert model.prune_intermediate_layers(keep) == keep
        final, got = model.forward_intermediates(photos, indices=keep)
        unpooled = model(photos)
    assert len(model.blocks) == keep[-1] + 1
    for y, z in zip(got, wanted, strict=True):
        torch.testing.assert_close(y, z)
    torch.testing.assert_close(unpooled, final)  # the head and pool pruned: forward returns the tokens


@pytest.mark.parametrize("pool", ["tok", "avg"])
@pytest.mark.parametrize("execution", ["static", "packed", "padded"])
@pytest.mark.parametrize("boundaries", ["threshold", "topk", "uniform"])
@pytest.mark.parametrize("upsample", [False, True])
def test_forward_head_of_forward_features_is_forward(pool, execution, boundaries, upsample, photos):
    """forward_head(forward_features(x)) == forward(x) for every boundary mode, execution and pool, eval and
    training (the same Gumbel draw); forward_intermediates' final output is forward_features'."""
    model = tiny("dtp_vit_tiny_patch8_clip_64_2x" + ("_up" if upsample else ""))
    mode = "threshold" if boundaries == "uniform" else boundaries
    model.dtp = replace(model.dtp, pool=pool, execution=execution, boundaries=mode, patch_order="hilbert")
    with dtplib.forced_boundaries(model, 3) if boundaries == "uniform" else nullcontext():
        for training in (False, True):
            model.train(training)
            torch.manual_seed(1)
            out = model(photos)
            torch.manual_seed(1)
            features = model.forward_features(photos)
            keep = model.last_keep
            torch.testing.assert_close(model.forward_head(features), out)
            torch.manual_seed(1)
            final, _ = model.forward_intermediates(photos, indices=1)
            torch.testing.assert_close(final, features)
    varying = boundaries == "threshold" and not upsample
    assert (keep is not None) == varying  # a validity mask exactly where the counts vary


def test_open_clip_forward_intermediates_give_the_merged_features():
    """open_clip's CLIP.forward_intermediates reaches the trunk's: its image features are encode_image's, and a
    shortened layer's map holds one vector per segment."""
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x")
    model.eval()
    images = load_images(flickr_photos(4), preprocess)  # 4 x 3 x 64 x 64
    with torch.no_grad(), dtplib.trace(model) as t:
        output = model.forward_intermediates(image=images, image_output_extra_tokens=True)
        embedding = model.encode_image(images, normalize=True)
    torch.testing.assert_close(output["image_features"], embedding)
    maps, prefix = output["image_intermediates"], output["image_intermediates_prefix"]
    assert len(maps) == 6 and maps[0].shape == (4, 192, 8, 8) and prefix[0].shape == (4, 1, 192)
    shortened = maps[2].flatten(2).transpose(1, 2)  # B x N x D: the first shortened layer
    distinct = [torch.unique(shortened[b], dim=0).shape[0] for b in range(4)]
    assert distinct == t.tokens.tolist()  # one vector per segment
    assert all(torch.unique(maps[1][b].flatten(1).T, dim=0).shape[0] == 64 for b in range(4))  # full length


def test_features_only_gives_maps_on_the_patch_grid(photos):
    """timm's features_only=True: FeatureGetterNet over forward_intermediates (pruned after the last index)."""
    features = tiny("dtp_vit_tiny_patch8_clip_64_4x", features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        maps = features(photos)
    assert [m.shape for m in maps] == [(4, 32, 4, 4)] * 3
    assert features.feature_info.channels() == [32] * 3


def test_set_input_size_moves_the_grid(photos):
    model = tiny("dtp_vit_tiny_patch8_clip_64_4x").eval()
    model.set_input_size(img_size=48)
    with torch.no_grad():
        _, maps = model.forward_intermediates(torch.nn.functional.interpolate(photos, size=48), indices=1)
    assert model.grid == (6, 6) and model.topk_segments == 9 and maps[0].shape == (4, 32, 6, 6)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)


def test_what_cannot_follow_the_merged_path_says_why(photos):
    model = tiny("dtp_vit_tiny_patch8_clip_64_4x").eval()
    with pytest.raises(TypeError, match="cannot be compiled by TorchScript"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="cannot be traced by torch.fx"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match="forward_intermediates"):
        tiny("dtp_vit_tiny_patch8_clip_64_4x", features_only=True, feature_cls="fx")
    with pytest.raises(ValueError, match="no timm pretrained weights"):
        timm.create_model("dtp_vit_tiny_patch8_clip_64_4x", pretrained=True)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(0, "max")
    with pytest.raises(ValueError, match="takes no attn_mask"):
        model.forward_intermediates(photos, attn_mask=torch.ones(4, 1, 17, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="output_fmt must be"):
        model.forward_intermediates(photos, output_fmt="NHWC")
    model.dtp = replace(model.dtp, pool="avg", execution="padded")
    with torch.no_grad():
        features = model.forward_features(photos)
        model.forward_features(photos[:2])
    with pytest.raises(ValueError, match="validity mask of the last forward"):
        model.forward_head(features)
