"""The DTP-ViT tower: exact transfer, pooling properties, batch invariance, gradients, prior, bad input."""

import open_clip
import pytest
import torch
from conftest import flickr_captions, flickr_photos

import dtplib
from dtplib.common.images import load_images
from dtplib.tower.boundaries import downsample, membership, upsample
from dtplib.tower.config import DTPConfig
from dtplib.tower.model import DTPVisionTransformer, segment_ids


@pytest.fixture(scope="module")
def ti_images():
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    return load_images(flickr_photos(8), preprocess)  # 8 x 3 x 64 x 64


def open_clip_checkpoint(model, path):
    """Save as open_clip_train does: a `state_dict` key and DDP's `module.` prefix."""
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("arch", ["ViT-Ti-8-64", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_exact_transfer_from_open_clip_vit(arch, tmp_path):
    vit, _, preprocess = open_clip.create_model_and_transforms(arch)
    vit.eval()
    images = load_images(flickr_photos(2), preprocess)
    checkpoint = open_clip_checkpoint(vit, tmp_path / "vit.pt")

    dtp, _, _ = dtplib.create_model_and_transforms(arch, compression=4)
    report = dtplib.load_vit_weights(dtp, checkpoint)
    dtp.eval()
    assert report.left and all(".predictor." in k for k in report.left)
    assert len(report.loaded) == len(vit.state_dict())
    tokens = open_clip.get_tokenizer(arch)(flickr_captions(flickr_photos(2)))
    with torch.no_grad(), dtplib.forced_boundaries(dtp, "all"), dtplib.trace(dtp) as t:
        expected, got = vit.encode_image(images), dtp.encode_image(images)
        assert torch.equal(vit.encode_text(tokens), dtp.encode_text(tokens))
    assert (t.tokens == t.boundaries.shape[1]).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    plain, _, _ = dtplib.create_model_and_transforms(arch, compression=1)  # the fair baseline, no pooling
    dtplib.load_vit_weights(plain, checkpoint)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), expected, atol=1e-4, rtol=0)


def test_load_vit_weights_rejects_other_sizes(tmp_path):
    vit, _, _ = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    dtp, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, upsample=True)
    dtplib.load_vit_weights(dtp, vit.state_dict())  # 6 layers split 2 + 2 + 2: loads
    deeper, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=2)
    del deeper.visual.trunk.blocks[5]  # a 5-layer tower cannot hold a 6-layer ViT
    with pytest.raises(ValueError, match="no place"):
        dtplib.load_vit_weights(deeper, vit.state_dict())
    with pytest.raises(ValueError, match="no open_clip ViT image tower"):
        dtplib.load_vit_weights(dtp, {"logit_scale": torch.zeros(())})
    with pytest.raises(FileNotFoundError):
        dtplib.load_vit_weights(dtp, tmp_path / "missing.pt")


@pytest.mark.parametrize("every", [1, 2, 3, 4, 10])
def test_forced_boundaries_every_c_patches_average_pool(every, ti_images):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    model.eval()
    tower = dtplib.get_tower(model)
    seen = {}
    tower.blocks[1].register_forward_hook(lambda m, args, out: seen.update(patches=out[:, 1:]))
    tower.blocks[2].register_forward_pre_hook(lambda m, args, kwargs: seen.update(short=args[0][:, 1:]),
                                              with_kwargs=True)
    with torch.no_grad(), dtplib.forced_boundaries(model, every), dtplib.trace(model) as t:
        model.encode_image(ti_images[:3])
    patches, segments = seen["patches"], seen["short"]  # B x 64 x D, B x S x D
    n = patches.shape[1]
    assert segments.shape[1] == -(-n // every) == t.tokens[0]
    for s in range(segments.shape[1]):
        expected = patches[:, s * every:(s + 1) * every].mean(1)  # the last segment may be shorter
        torch.testing.assert_close(segments[:, s], expected, atol=1e-6, rtol=1e-6)


def test_pooling_properties_on_random_boundaries():
    tokens = torch.randn(4, 30, 8)
    boundaries = (torch.rand(4, 30) < 0.3).float()
    boundaries[:, -1] = 1
    counts = boundaries.sum(-1)
    weights = membership(boundaries, int(counts.max()))  # B x N x S
    assert torch.equal(weights.sum(-1), torch.ones(4, 30))  # every patch in exactly one segment
    segments, valid = downsample(tokens, weights)
    assert torch.equal(valid.sum(-1), counts.long())
    ids = segment_ids(boundaries).long()
    for b in range(4):
        for s in range(int(counts[b])):
            torch.testing.assert_close(segments[b, s], tokens[b][ids[b] == s].mean(0))
        assert segments[b, int(counts[b]):].abs().sum() == 0  # padding stays zero
    restored = upsample(segments, weights)  # each patch gets its segment's mean
    torch.testing.assert_close(restored, torch.stack([segments[b, ids[b]] for b in range(4)]))


@pytest.mark.parametrize("variant", [dict(compression=4), dict(compression=2, upsample=True),
                                     dict(compression=4, pool="avg")])
def test_batch_invariance(variant, ti_images):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", **variant)
    model.eval()
    with torch.no_grad(), dtplib.trace(model) as t:
        batched = model.encode_image(ti_images)
        assert len(set(t.tokens.tolist())) > 1, "the images must get different segment counts"
        alone = torch.cat([model.encode_image(image[None]) for image in ti_images])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


def test_contrastive_loss_alone_trains_the_predictor():
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4, boundary_loss_weight=0)
    files = flickr_photos(8)
    images, texts = load_images(files, preprocess), open_clip.get_tokenizer("ViT-Ti-8-64")(flickr_captions(files))
    model.train()
    image_features, text_features, logit_scale = model(images, texts)
    loss = open_clip.ClipLoss()(image_features, text_features, logit_scale)  # no boundary loss at all
    loss.backward()
    predictor = dtplib.get_tower(model).predictor
    grads = [p.grad for p in predictor.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_trace_records_without_second_forward(ti_images):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    model.eval()
    calls = []
    dtplib.get_tower(model).predictor.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), dtplib.trace(model) as t:
        model.encode_image(ti_images)
    assert len(calls) == 1 and len(t.records) == 1
    assert t.boundaries.dtype == torch.bool and t.boundaries.shape == (8, 64)
    assert t.boundaries[:, -1].all()
    assert torch.equal(t.tokens, t.boundaries.sum(-1))
    assert torch.equal(t.segment_ids[:, -1] + 1, t.tokens)
    assert torch.all(t.segment_ids.diff(dim=1) == t.boundaries[:, :-1].long())
    torch.testing.assert_close(t.compression, 64 / t.tokens.float())
    assert t.probs.shape == (8, 64)
    assert torch.equal(t.boundaries[:, :-1], t.probs[:, :-1] > 0.5)  # eval: deterministic threshold
    assert t.boundary_loss.ndim == 0 and t.boundary_loss > 0

    plain, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=1)
    with torch.no_grad(), dtplib.trace(plain) as t:
        plain.encode_image(ti_images[:2])
    assert t.boundaries.all() and (t.compression == 1).all()
    with pytest.raises(ValueError, match="does not pool"):
        with dtplib.forced_boundaries(plain, "all"):
            pass


def fit_prior_and_measure(compression: int) -> tuple[float, float]:
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=compression)
    images = load_images(flickr_photos(64), preprocess)
    dtplib.fit_boundary_prior(model, images, steps=300)
    model.eval()
    eval_ratio = dtplib.realised_compression(model, images)
    model.train()
    return eval_ratio, dtplib.realised_compression(model, images)


@pytest.mark.slow
@pytest.mark.parametrize("compression", [2, 4, 10])
def test_boundary_prior_alone_reaches_target(compression):
    eval_ratio, train_ratio = fit_prior_and_measure(compression)
    assert eval_ratio == pytest.approx(compression, rel=0.10)  # the deterministic budget FLOPs are reported at
    assert train_ratio == pytest.approx(compression, rel=0.10)  # the sampled budget training runs at


def test_boundary_loss_is_binomial_on_the_batch_total():
    """Nawrot's per-image prior for one image; for a batch, its minimum sits at N*p per image, not at the mode."""
    boundaries = (torch.rand(1, 64) < 0.1).float()
    per_image = torch.distributions.Binomial(64, torch.tensor(0.1)).log_prob(boundaries.sum())
    torch.testing.assert_close(dtplib.boundary_loss(boundaries, 0.1), -per_image / 64)

    def slope(per_image_count, batch):  # d loss / d count, through a straight-through-like continuous count
        boundaries = torch.full((batch, 64), per_image_count / 64, requires_grad=True)
        dtplib.boundary_loss(boundaries, 0.1).backward()
        return boundaries.grad[0, 0].item()

    assert slope(6.3, batch=64) < 0 < slope(6.5, batch=64)  # minimum within 0.1 of N*p = 6.4
    assert slope(6.3, batch=1) > 0  # one image: the mode, (N+1)p - 1/2 = 6.0
    batch = (torch.rand(8, 64) < 0.1).float()  # Nawrot's per-image form, kept as prior_scope="image"
    counts = batch.sum(-1)
    expected = -torch.distributions.Binomial(64, torch.tensor(0.1)).log_prob(counts).mean() / 64
    torch.testing.assert_close(dtplib.boundary_loss(batch, 0.1, per_image=True), expected)


def test_grad_checkpointing_gives_same_gradients(ti_images):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    model.eval()  # deterministic boundaries
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model.encode_image(ti_images).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.visual.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_every_registered_name_builds_in_open_clip():
    names = dtplib.variant_names()
    assert {"DTP-ViT-B-32-4x", "DTP-ViT-B-16-10x-up", "DTP-ViT-Ti-8-64-1x", "ViT-Ti-8-64"} <= set(names)
    for name in names:
        assert name in open_clip.list_models()
        if "Ti" in name:
            model, _, preprocess = open_clip.create_model_and_transforms(name)
            assert preprocess.transforms[0].size in (64, (64, 64))
            assert open_clip.get_tokenizer(name)(["a photo"]).shape == (1, 32)
    config = open_clip.get_model_config("DTP-ViT-B-16-4x-up")
    assert config["vision_cfg"]["timm_model_name"] == "dtp_vit_base_patch16_clip_224_4x_up"


def test_create_model_and_transforms_overrides():
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=3, pre_layers=1, short_layers=5,
                                                     temperature=1.0)
    tower = dtplib.get_tower(model)
    assert (tower.dtp.compression, tower.dtp.pre_layers, tower.dtp.temperature) == (3, 1, 1.0)
    assert tower.predictor is not None
    with pytest.raises(ValueError, match="unknown keyword"):
        dtplib.create_model_and_transforms("ViT-Ti-8-64", compresion=4)
    with pytest.raises(ValueError, match="unknown arch"):
        dtplib.create_model_and_transforms("ViT-H-14")


@pytest.mark.parametrize("kwargs, message", [
    (dict(compression=0.5), "compression must be a number >= 1"),
    (dict(compression=4, pre_layers=3), "does not add up to depth=6"),
    (dict(compression=4, post_layers=1, short_layers=3), "needs upsample=True"),
    (dict(compression=4, pool="max"), "pool must be"),
    (dict(compression=4, prior_scope="sequence"), "prior_scope must be"),
])
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dtplib.create_model_and_transforms("ViT-Ti-8-64", **kwargs)


def test_bad_image_size_and_input_shape():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DTPVisionTransformer(DTPConfig(compression=2, pre_layers=1, short_layers=1), img_size=60, patch_size=8,
                             embed_dim=64, depth=2, num_heads=1)
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    with pytest.raises(ValueError, match=r"expected images of shape B x 3 x 64 x 64, got \(2, 3, 32, 32\)"):
        model.encode_image(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="expected images of shape"):
        model.encode_image(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="B x 64"):
        with dtplib.forced_boundaries(model, torch.ones(2, 10)):
            pass
