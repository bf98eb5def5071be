"""Pretrained zero-shot rows, ImageFolder splits, the linear probe, finetuning, and a DTP-ViT from a ViT."""

import open_clip
import pytest
import torch
from PIL import Image

import dtplib
from dtplib import finetune as ft
from dtplib import train
from dtplib.common.cli import flags
from dtplib.common.images import load_images
from dtplib.common.paths import REPO_ROOT, data_root
from dtplib.measure.evaluate import imagefolder_split

CIFAR = data_root() / "cifar10-test"
TI = "ViT-Ti-8-64"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    """A real open_clip ViT checkpoint: two training steps of the Ti peer on the embedded sample."""
    logs = tmp_path_factory.mktemp("runs")
    result = train.main(flags(model=TI, train_data=REPO_ROOT / "data/sample/train/{000000..000001}.tar",
                                    epochs=1, max_steps=2, batch_size=8, warmup=1, workers=0, logs=logs,
                                    name="vit", report_to="none"))
    return result["checkpoint"]


@pytest.fixture(scope="module")
def tiny_split():
    return imagefolder_split(CIFAR, per_class_train=3, per_class_test=2, seed=0)


def blobs(num_classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable features: class c is 3 x the c-th unit vector plus Gaussian noise of std 0.5 in every dimension
    (class means 8.5 noise stds apart: the Bayes error is about 1e-5)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # N
    noise = 0.5 * torch.randn(len(labels), dim, generator=generator)  # N x D
    features = 3 * torch.nn.functional.one_hot(labels, dim).float() + noise  # N x D
    return features, labels


def test_linear_probe_separates_separable_classes():
    x_train, y_train = blobs(5, 40, 64, seed=0)
    x_test, y_test = blobs(5, 40, 64, seed=1)
    probe = ft.linear_probe(x_train, y_train, x_test, y_test)
    assert probe.top1 >= 0.95 and probe.top5 == 1.0
    assert probe.weight_decay in [row["weight_decay"] for row in probe.search] and len(probe.search) == 5
    assert ft.head_accuracy(probe.classifier, x_test, y_test)["top1"] == probe.top1  # acts on raw features


def test_linear_probe_pulls_towards_its_init():
    x_train, y_train = blobs(4, 40, 8, seed=0)
    x_test, y_test = blobs(4, 40, 8, seed=1)
    wrong = torch.nn.Linear(8, 4)  # a confident head that calls class c "c + 1"
    with torch.no_grad():
        wrong.weight.copy_(10 * torch.eye(4, 8).roll(1, dims=0))
        wrong.bias.zero_()
    assert ft.head_accuracy(wrong, x_test, y_test)["top1"] < 0.1
    kept = ft.linear_probe(x_train, y_train, x_test, y_test, init=wrong, weight_decays=[1e4])
    assert kept.top1 < 0.1  # a strong pull keeps the prior
    fitted = ft.linear_probe(x_train, y_train, x_test, y_test, init=wrong, weight_decays=[1e-4])
    assert fitted.top1 >= 0.95


def test_pretrained_zeroshot_reports_missing_weights(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # surely not there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    weights = tmp_path / "ti.pt"
    torch.save(open_clip.create_model(TI).state_dict(), weights)
    table = ft.pretrained_zeroshot(f"ViT-B-32/laion2b_s34b_b79k, RN50x16,{TI}/{weights}", CIFAR, max_per_class=1)
    assert table["model"].tolist() == ["ViT-B-32", "RN50x16", TI]
    assert table["pretrained"].tolist()[:2] == ["laion2b_s34b_b79k", "openai"]  # no tag: the first one
    assert table["status"].tolist() == ["weights not on disk", "weights not on disk", "ok"]
    assert "create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')" in table["message"][0]
    assert table["top1"][:2].isna().all() and 0 <= table["top1"][2] <= 1 and table["images"][2] == 10
    assert {"hardware", "dtype", "batch_size", "commit"} <= set(table.columns)
    with pytest.raises(ValueError, match="close names"):
        ft.pretrained_zeroshot(["ViT-B-33/openai"], CIFAR)
    with pytest.raises(ValueError, match="neither a file nor a tag of ViT-B-32"):
        ft.pretrained_zeroshot(["ViT-B-32/laion9b"], CIFAR)


def test_imagefolder_split_is_deterministic_and_disjoint():
    split = imagefolder_split(CIFAR, per_class_train=5, per_class_test=3, seed=0)
    assert split.classnames[:2] == ["airplane", "automobile"] and split.layout == "names"
    assert len(split.train) == 50 and len(split.test) == 30
    assert not {path for path, _ in split.train} & {path for path, _ in split.test}
    assert all(path.parent.name == split.classnames[label].replace(" ", "_") for path, label in split.train)
    assert imagefolder_split(CIFAR, 5, 3, seed=0) == split
    assert imagefolder_split(CIFAR, 5, 3, seed=1).train != split.train
    assert imagefolder_split(CIFAR, 8, 3, seed=0).train[:5] == split.train[:5]  # a larger split extends it
    with pytest.raises(ValueError, match="too few images"):
        imagefolder_split(CIFAR, 999, 2)


def test_imagefolder_split_imagenet_layout_with_test_dir(tmp_path):
    for root in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):  # tench, goldfish
            (tmp_path / root / wnid).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / root / wnid / f"{i}.png")
    split = imagefolder_split(tmp_path / "train", 2, None, test_dir=tmp_path / "val")
    assert split.classnames == ["tench", "goldfish"] and split.layout == "imagenet"
    assert len(split.train) == 4 and len(split.test) == 6
    assert all("val" in path.parts for path, _ in split.test)


def test_dtp_from_vit_loads_every_vit_tensor(vit_checkpoint, tiny_split):
    vit_tensors = len(torch.load(vit_checkpoint, weights_only=True)["state_dict"])
    start = ft.dtp_from_vit(TI, 4, vit_checkpoint, prior_images=tiny_split.train, prior_steps=100)
    assert len(start.report.loaded) == vit_tensors
    assert start.report.left and all(".predictor." in name for name in start.report.left)
    assert 3 <= start.compression <= 5.3  # fitted to 4x on 30 images
    plain = ft.dtp_from_vit(TI, 1, vit_checkpoint)
    assert plain.report.left == [] and plain.prior_fit == []
    again = ft.dtp_from_vit(TI, 2, plain.model.state_dict(), prior_images=tiny_split.train, prior_steps=5)
    assert len(again.report.loaded) == vit_tensors  # a DTP-1x state dict loads too (load_dtp_weights)
    with pytest.raises(ValueError, match="needs prior_images"):
        ft.dtp_from_vit(TI, 4, vit_checkpoint)


def test_finetune_runs_and_keeps_the_token_budget(vit_checkpoint, tiny_split):
    start = ft.dtp_from_vit(TI, 4, vit_checkpoint, prior_images=tiny_split.train, prior_steps=100)
    before = {name: p.detach().clone() for name, p in start.model.visual.named_parameters()}
    text_before = start.model.transformer.resblocks[0].mlp.c_fc.weight.detach().clone()
    result = ft.finetune(start.model, tiny_split, preprocess_train=start.preprocess_train,
                         preprocess_val=start.preprocess, epochs=2, lr=1e-4, batch_size=8)
    assert 0 <= result["top1"] <= result["top5"] <= 1 and result["test_images"] == 20
    assert 2 <= result["compression"] <= 8 and 2 <= result["train_compression"] <= 8  # near 4x, loosely
    assert len(result["history"]) == 2 and result["steps"] == 2 * (30 // 8)
    changed = [name for name, p in start.model.visual.named_parameters() if not torch.equal(p, before[name])]
    assert any("predictor" in name for name in changed) and any("blocks.5" in name for name in changed)
    assert torch.equal(start.model.transformer.resblocks[0].mlp.c_fc.weight, text_before)

    plain = ft.dtp_from_vit(TI, 1, vit_checkpoint)
    result = ft.finetune(plain.model, tiny_split, preprocess_train=plain.preprocess_train,
                         preprocess_val=plain.preprocess, tokenizer=plain.tokenizer, epochs=1, batch_size=16)
    assert result["compression"] == 1.0 and 0 <= result["top1"] <= 1
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        ft.finetune(plain.model, tiny_split, preprocess_train=plain.preprocess_train,
                    preprocess_val=plain.preprocess, head="zeroshot")


def test_zeroshot_head_gives_clip_logits(vit_checkpoint, tiny_split):
    start = ft.dtp_from_vit(TI, 1, vit_checkpoint)
    model = start.model.eval()
    head = ft.zeroshot_head(model, start.tokenizer, tiny_split.classnames)
    images = load_images([path for path, _ in tiny_split.test[:4]], start.preprocess)
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        prompts = start.tokenizer([f"a photo of a {name}." for name in tiny_split.classnames])
        text = model.encode_text(prompts, normalize=True)
        expected = model.logit_scale.exp() * image @ text.T  # one template: CLIP's zero-shot logits
        one_template = ft.zeroshot_head(model, start.tokenizer, tiny_split.classnames, templates=["a photo of a {}."])
        torch.testing.assert_close(one_template(image), expected, atol=1e-4, rtol=1e-4)
    assert head.weight.shape == (10, dtplib.ARCHS[TI].embed_dim)
