"""Evaluation: metrics on hand-worked score matrices, zero-shot and retrieval end to end with a colour-seeing model
whose right answers are known, real tiny CLIPs on CIFAR-10 and the embedded COCO sample, checkpoints, and the CLI."""

import csv
import io
import json
import logging
import math
import shutil
import tarfile

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import FLICKR, flickr_photos
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from shard_io import write_shard
from timm.data import ImageNetInfo
from torch import nn

import dtplib
from dtplib import evaluate as evaluate_command
from dtplib.common.images import load_images
from dtplib.common.paths import data_root
from dtplib.data import imagefolder
from dtplib.data.shards import SAMPLE_DIR, split_shards
from dtplib.measure import evaluate as ev

CIFAR = data_root() / "cifar10-test"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TINY = "DTP-ViT-Ti-8-64-4x"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A random DTP-ViT Ti CLIP (4x), its eval transform and tokenizer."""
    model, _, preprocess = dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY)


class ColourOracle(nn.Module):
    """A CLIP-shaped model that sees colour: an image's feature is its mean normalised RGB, a text's feature counts
    the words red, green and blue in it. After CLIP's normalisation a red image is (+1.9, -1.8, -1.5), so the prompt
    that names an image's colour scores highest; every right answer is known."""

    def __init__(self, tokenizer):
        super().__init__()
        self.words = nn.Embedding(49408, 3)  # CLIP vocabulary -> (red, green, blue) counts
        nn.init.zeros_(self.words.weight)
        with torch.no_grad():
            for channel, word in enumerate(COLOURS):
                self.words.weight[tokenizer([word])[0, 1], channel] = 1.0  # token after <start_of_text>

    def encode_image(self, images, normalize=False):
        features = images.mean(dim=(2, 3))  # B x 3
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens, normalize=False):
        features = self.words(tokens).sum(dim=1)  # B x 3
        return F.normalize(features, dim=-1) if normalize else features


@pytest.fixture(scope="module")
def oracle():
    """The colour model, a 16-pixel eval transform and the CLIP tokenizer."""
    tokenizer = open_clip.get_tokenizer("ViT-Ti-8-64")
    return ColourOracle(tokenizer), open_clip.image_transform(16, is_train=False), tokenizer


def solid(colour: str, fmt: str = "PNG") -> bytes:
    """An 8 x 8 image of one colour, encoded (PNG keeps the colour exact)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[colour]).save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# metrics


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0],  # target 0 is highest: rank 0
                           [0.2, 0.5, 0.3],  # target 2 is below 0.5: rank 1
                           [0.4, 0.4, 0.2],  # target 1 ties class 0, ties count against: rank 1
                           [0.7, 0.2, 0.1]])  # target 2 is last: rank 2
    targets = torch.tensor([0, 2, 1, 2])
    # top-1: row 0 only = 1/4; top-2: rows 0-2 = 3/4; top-5 is top-3 with 3 classes = 4/4
    assert ev.topk_accuracy(logits, targets, ks=(1, 2, 5)) == {1: 0.25, 2: 0.75, 5: 1.0}
    # a collapsed model (all equal, or NaN) gets nothing below k = C
    assert ev.topk_accuracy(torch.zeros(4, 3), targets, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    nan_rows = torch.full((4, 3), float("nan"))
    assert ev.topk_accuracy(nan_rows, targets, ks=(1, 2)) == {1: 0.0, 2: 0.0}
    with pytest.raises(ValueError, match="targets must lie"):
        ev.topk_accuracy(logits, torch.tensor([0, 1, 2, 3]))


def test_retrieval_recall_by_hand():
    text_image = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 images x 2 captions
    similarity = torch.tensor([
        #  t0   t1   t2   t3   t4   t5
        [0.1, 0.8, 0.3, 0.9, 0.2, 0.0],  # image 0: best caption t1 (its 2nd) = 0.8, one other text above -> rank 1
        [0.5, 0.1, 0.7, 0.2, 0.6, 0.4],  # image 1: best caption t2 = 0.7, nothing above -> rank 0
        [0.9, 0.8, 0.7, 0.6, 0.1, 0.5],  # image 2: best caption t5 = 0.5, t0..t3 above -> rank 4
    ])
    # image to text, ranks (1, 0, 4): R@1 = 1/3, R@2 = 2/3, R@3 = 2/3, R@5 = R@10 = 1.
    # text to image, down each column: t0 0.1 < 0.5, 0.9 -> rank 2; t1 0.8 ties image 2 -> 1; t2 0.7 ties image 2
    # -> 1; t3 0.2 < 0.9, 0.6 -> 2; t4 0.1 < 0.2, 0.6 -> 2; t5 0.5 is highest -> 0.
    # Ranks (2, 1, 1, 2, 2, 0): R@1 = 1/6, R@2 = 3/6, R@3 = 1.
    assert ev.retrieval_recall(similarity, text_image, ks=(1, 2, 3)) == pytest.approx({
        "image_to_text_R@1": 1 / 3, "image_to_text_R@2": 2 / 3, "image_to_text_R@3": 2 / 3,
        "text_to_image_R@1": 1 / 6, "text_to_image_R@2": 3 / 6, "text_to_image_R@3": 1.0})
    default = ev.retrieval_recall(similarity, text_image)
    assert list(default) == [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert default["image_to_text_R@5"] == default["text_to_image_R@10"] == 1.0
    with pytest.raises(ValueError, match="images without one: \\[2\\]"):
        ev.retrieval_recall(similarity, torch.tensor([0, 0, 1, 1, 1, 1]))


# ---------------------------------------------------------------------------------------------------------
# zero-shot classification


def test_zeroshot_classes_layouts(tmp_path):
    assert imagefolder.zeroshot_classes(CIFAR) == (CIFAR_NAMES, "names")
    def class_folder(path):  # a class folder holds an image (an empty one is refused)
        path.mkdir(parents=True)
        (path / "a.png").write_bytes(red)

    red = solid("red")
    named = tmp_path / "named"
    for folder in ("sea_lion", "apple", ".ipynb_checkpoints"):
        class_folder(named / folder)
    assert imagefolder.zeroshot_classes(named) == (["apple", "sea lion"], "names")

    subset = tmp_path / "subset"  # goldfish is index 1, tench 0, toilet paper 999 in the standard order
    for wnid in ("n15075141", "n01443537", "n01440764"):
        class_folder(subset / wnid)
    assert imagefolder.zeroshot_classes(subset) == (["tench", "goldfish", "toilet paper"], "imagenet")

    full = tmp_path / "full"
    for wnid in ImageNetInfo("imagenet-1k").label_names():
        class_folder(full / wnid)
    assert imagefolder.zeroshot_classes(full) == (list(IMAGENET_CLASSNAMES), "imagenet")
    assert ev.templates_for("imagenet") is open_clip.OPENAI_IMAGENET_TEMPLATES
    assert len(ev.templates_for("names")) == 18 and ev.templates_for("names")[0] == "a photo of a {}."


def test_zeroshot_classes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        imagefolder.zeroshot_classes(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"{tmp_path} has no class folders"):
        imagefolder.zeroshot_classes(tmp_path)
    (tmp_path / "n99999999").mkdir()
    with pytest.raises(ValueError, match="not ImageNet-1k classes"):
        imagefolder.zeroshot_classes(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="mixes WordNet-id folders"):
        imagefolder.zeroshot_classes(tmp_path)


@pytest.fixture
def colour_folders(tmp_path):
    """blue/ green/ red/ with one image mislabelled (a blue image in red/) and one corrupt file in green/."""
    files = {"red/a.png": "red", "red/b.png": "red", "red/c.png": "blue", "green/a.png": "green",
             "blue/a.png": "blue"}
    for name, colour in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(solid(colour))
    (tmp_path / "green/broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_zero_shot_with_known_answers(oracle, colour_folders, workers):
    model, preprocess, tokenizer = oracle
    model.train()
    model.words.eval()
    metrics = ev.zero_shot_eval(model, preprocess, tokenizer, colour_folders, batch_size=2, workers=workers)
    # 5 readable images, all right but the blue one filed under red/; top-5 of 3 classes would be everything: NaN
    assert math.isnan(metrics.pop("zeroshot_top5"))
    assert metrics == {"zeroshot_top1": 0.8, "zeroshot_images": 5, "zeroshot_skipped": 1}
    assert model.training and not model.words.training  # each module's own mode comes back
    first = ev.zero_shot_eval(model, preprocess, tokenizer, colour_folders, max_per_class=1)
    assert math.isnan(first.pop("zeroshot_top5"))
    assert first == {"zeroshot_top1": 1.0, "zeroshot_images": 3, "zeroshot_skipped": 0}


def test_zero_shot_tiny_dtp_on_cifar(tiny):
    model, preprocess, tokenizer = tiny
    metrics = ev.zero_shot_eval(model, preprocess, tokenizer, CIFAR, batch_size=8, max_per_class=2,
                                templates=["a photo of a {}."])
    assert metrics["zeroshot_images"] == 20 and metrics["zeroshot_skipped"] == 0
    assert 0.0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] <= 1.0

    # the same top-1 straight from the model, one image at a time (DTP-ViT is batch invariant)
    files = [path for name in CIFAR_NAMES for path in sorted((CIFAR / name).glob("*.jpg"))[:2]]
    labels = torch.arange(10).repeat_interleave(2)  # 20
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {name}." for name in CIFAR_NAMES]), normalize=True)
        image = torch.cat([model.encode_image(load_images([f], preprocess), normalize=True) for f in files])
    predicted = (image @ text.T).argmax(dim=1)  # 20
    assert metrics["zeroshot_top1"] == (predicted == labels).sum().item() / 20


def test_zero_shot_errors_before_model_work(oracle, tmp_path):
    model, preprocess, tokenizer = oracle
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"found no valid file for the classes \['cat'\]"):
        ev.zero_shot_eval(model, preprocess, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="every class folder is empty"):
        ev.zero_shot_eval(model, preprocess, tokenizer, tmp_path, skip_empty_classes=True)
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of the 1 images"):
        ev.zero_shot_eval(model, preprocess, tokenizer, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# retrieval


def test_retrieval_with_known_answers(oracle, tmp_path):
    model, preprocess, tokenizer = oracle
    samples = [
        {"__key__": "r", "png": solid("red"), "txt": "a red square",
         "json": json.dumps({"captions": ["a red square", "red"]})},
        {"__key__": "b", "png": solid("blue"), "txt": "blue",
         "json": json.dumps({"captions": ["a blue one", "blue", "something blue"]})},
        {"__key__": "g", "png": solid("green"), "txt": "green"},  # no json: the txt caption
    ]
    write_shard(tmp_path / "000000.tar", samples)
    # 3 images in two batches: every text finds its image and back only if captions stay with their image
    metrics = ev.retrieval_eval(model, preprocess, tokenizer, str(tmp_path / "000000.tar"), batch_size=2)
    assert metrics == {**{f"{d}_R@{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)},
                       "retrieval_images": 3, "retrieval_texts": 6, "retrieval_skipped_no_caption": 0}


def test_retrieval_tiny_dtp_on_embedded_sample(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    shards = split_shards(SAMPLE_DIR, "test")
    with tarfile.open(SAMPLE_DIR / "test" / "000000.tar") as tar:  # counted without dtplib or webdataset
        captions = [len(json.load(tar.extractfile(m))["captions"]) for m in tar if m.name.endswith(".json")]
    metrics = ev.retrieval_eval(model, preprocess, tokenizer, shards, batch_size=10)
    assert (metrics["retrieval_images"], metrics["retrieval_texts"]) == (len(captions), sum(captions))
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1.0
    first = ev.retrieval_eval(model, preprocess, tokenizer, shards, max_images=5)
    assert (first["retrieval_images"], first["retrieval_texts"]) == (5, sum(captions[:5]))

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(ValueError, match="no readable samples"):
        ev.retrieval_eval(model, preprocess, tokenizer, str(tmp_path / "empty.tar"))
    with pytest.raises(FileNotFoundError):
        ev.retrieval_eval(model, preprocess, tokenizer, str(tmp_path / "{000000..000001}.tar"))


def test_evaluate_names_imagenet_keys(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    for wnid, photo in zip(("n01440764", "n01443537"), flickr_photos(2), strict=True):
        (tmp_path / wnid).mkdir()
        (tmp_path / wnid / "val.JPEG").write_bytes(photo.read_bytes())
    metrics = ev.evaluate(model, preprocess, tokenizer, imagenet_val=tmp_path,
                          val_data=split_shards(SAMPLE_DIR, "test"), max_images=4)
    assert metrics["imagenet_images"] == 2 and math.isnan(metrics["imagenet_top5"])  # 2 classes: no top-5
    assert metrics["imagenet_missing_classes"] == 998
    assert metrics["retrieval_images"] == 4 and not any(k.startswith("zeroshot_") for k in metrics)
    assert ev.evaluate(model, preprocess, tokenizer) == {}
    with pytest.raises(FileNotFoundError, match="missing"):
        ev.evaluate(model, preprocess, tokenizer, zeroshot_data=tmp_path / "missing", val_data="x.tar")


def test_imagenet_val_with_missing_classes_warns_and_has_no_top5(tmp_path, caplog, capsys):
    """The probe: --imagenet-val on 3 of the 1000 class folders (real CIFAR-10 photos) reported top-5 = 100%."""
    for wnid, name in zip(("n01440764", "n01443537", "n01484850"), CIFAR_NAMES, strict=False):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for photo in sorted((CIFAR / name).glob("*.jpg"))[:2]:
            shutil.copy(photo, tmp_path / "val" / wnid / photo.name)
    before = sorted(tmp_path.rglob("*"))
    with caplog.at_level(logging.WARNING, logger=ev.log.name):
        metrics = evaluate_command.main(["--model", TINY, "--imagenet-val", str(tmp_path / "val"), "--batch-size", "6",
                                         "--bootstrap", "20"])  # returns: exit status 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("997 of the 1000 ImageNet-1k classes are missing (3 class folders with images)" in w for w in warnings)
    assert any("top-5 not reported (NaN): 3 classes, and top-5 needs more than 5" in w for w in warnings)
    assert metrics["imagenet_missing_classes"] == 997 and metrics["imagenet_images"] == 6
    assert math.isnan(metrics["imagenet_top5"]) and "imagenet_top5_ci_low" not in metrics  # no interval of nothing
    assert 0.0 <= metrics["imagenet_top1"] <= 1.0 and "imagenet_top1_ci_low" in metrics
    table = capsys.readouterr().out
    assert "imagenet_top5" in table and "nan" in table.split("imagenet_top5", 1)[1].splitlines()[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written beside the photos


# ---------------------------------------------------------------------------------------------------------
# load_model and the command line


def save_checkpoint(model, path):
    """As our training loop saves: DDP's `module.` prefix, plus optimizer, plain args and RNG state."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "args": {"model": TINY, "lr": 1e-3},
                "rng_state": torch.get_rng_state()}, path)
    return path


def test_load_model_checkpoint_round_trip(tiny, tmp_path):
    original = tiny[0].eval()
    checkpoint = save_checkpoint(original, tmp_path / "epoch_1.pt")
    torch.manual_seed(1)  # a different initialisation, which the checkpoint must overwrite
    model, preprocess, tokenizer = ev.load_model(TINY, checkpoint=checkpoint)
    fresh, _, _ = ev.load_model(TINY)
    images = load_images(flickr_photos(2), preprocess)  # 2 x 3 x 64 x 64
    with torch.no_grad():
        assert not model.training
        assert torch.equal(model.encode_image(images), original.encode_image(images))
        assert not torch.allclose(fresh.encode_image(images), original.encode_image(images))
    assert tokenizer(["a dog"]).shape == (1, 32)
    with pytest.raises(ValueError, match="does not fit model ViT-Ti-8-64: .*missing keys"):
        ev.load_model("ViT-Ti-8-64", checkpoint=checkpoint)


def test_load_model_errors(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # surely not there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="weights ViT-B-32 / laion2b_s34b_b79k .* are not on disk") as error:
        ev.load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')" in str(error.value)
    with pytest.raises(ValueError, match="close names: \\['DTP-ViT-Ti-8-64-4x'"):
        ev.load_model("DTP-ViT-Ti-8-64-3x")
    with pytest.raises(ValueError, match="neither a file nor a tag of ViT-B-32"):
        ev.load_model("ViT-B-32", pretrained="laion9b")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ev.load_model(TINY, checkpoint=tmp_path / "none.pt")


def test_command_line(tiny, tmp_path, capsys):
    checkpoint = save_checkpoint(tiny[0], tmp_path / "epoch_1.pt")
    output = tmp_path / "results.json"
    metrics = evaluate_command.main(["--model", TINY, "--checkpoint", str(checkpoint), "--zeroshot-data", str(CIFAR),
                       "--max-per-class", "1", "--val-data", split_shards(SAMPLE_DIR, "test"), "--max-images", "3",
                       "--batch-size", "4", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["metrics"] == metrics and record["model"] == TINY and record["batch_size"] == 4
    assert metrics["zeroshot_images"] == 10 and metrics["retrieval_images"] == 3
    assert "zeroshot_top1" in capsys.readouterr().out

    for argv, message in [([], "at least one of --zeroshot-data"),
                          (["--zeroshot-data", str(tmp_path / "nowhere")], "nowhere"),
                          (["--val-data", str(tmp_path / "{000000..000002}.tar")], "do not exist"),
                          (["--val-data", "x.tar", "--checkpoint", str(tmp_path / "no.pt")], "checkpoint not found")]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_command.main(["--model", TINY, *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# data that is not there: samples without captions, empty class folders


def test_retrieval_skips_and_counts_samples_without_captions(oracle, tmp_path):
    model, preprocess, tokenizer = oracle
    samples = [
        {"__key__": "r", "png": solid("red"), "txt": "red"},
        {"__key__": "x", "png": solid("blue")},  # neither json captions nor txt
        {"__key__": "b", "png": solid("blue"), "json": json.dumps({"captions": ["blue", " "]})},
        {"__key__": "y", "png": solid("green"), "json": json.dumps({"captions": []}), "txt": ""},
        {"__key__": "g", "png": solid("green"), "txt": "green"},
    ]
    write_shard(tmp_path / "000000.tar", samples)
    metrics = ev.retrieval_eval(model, preprocess, tokenizer, str(tmp_path / "000000.tar"), batch_size=2)
    assert metrics == {**{f"{d}_R@{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)},
                       "retrieval_images": 3, "retrieval_texts": 3, "retrieval_skipped_no_caption": 2}
    assert ev.retrieval_eval(model, preprocess, tokenizer, str(tmp_path / "000000.tar"),
                             max_images=2)["retrieval_images"] == 2  # the first 2 scored images

    write_shard(tmp_path / "bare.tar", [{"__key__": "x", "png": solid("red")}])
    with pytest.raises(ValueError, match=r"bare\.tar.*1 sample.*no caption"):
        ev.retrieval_eval(model, preprocess, tokenizer, str(tmp_path / "bare.tar"))


def test_zero_shot_refuses_or_skips_an_empty_class_folder(oracle, colour_folders):
    model, preprocess, tokenizer = oracle
    (colour_folders / "yellow").mkdir()
    (colour_folders / "yellow" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="found no valid file for the classes \\['yellow'\\]"):
        imagefolder.zeroshot_classes(colour_folders)
    with pytest.raises(ValueError, match="yellow"):
        ev.zero_shot_eval(model, preprocess, tokenizer, colour_folders)
    with pytest.raises(ValueError, match="yellow"):
        ev.evaluate(model, preprocess, tokenizer, zeroshot_data=colour_folders)
    assert imagefolder.zeroshot_classes(colour_folders, skip_empty_classes=True) == (["blue", "green", "red"], "names")
    metrics = ev.zero_shot_eval(model, preprocess, tokenizer, colour_folders, skip_empty_classes=True)
    assert math.isnan(metrics.pop("zeroshot_top5"))  # 3 classes
    assert metrics == {"zeroshot_top1": 0.8, "zeroshot_images": 5, "zeroshot_skipped": 1,
                       "zeroshot_skipped_classes": 1}
    metrics = ev.evaluate(model, preprocess, tokenizer, imagenet_val=None, zeroshot_data=colour_folders,
                          skip_empty_classes=True)
    assert metrics["zeroshot_skipped_classes"] == 1 and metrics["zeroshot_top1"] == 0.8


def test_command_line_refuses_or_skips_an_empty_class_folder(tmp_path, capsys):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.jpg").write_bytes(sorted((CIFAR / name).glob("*.jpg"))[0].read_bytes())
    (tmp_path / "frog").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_command.main(["--model", TINY, "--zeroshot-data", str(tmp_path)])
    assert exit_info.value.code == 2 and "found no valid file for the classes ['frog']" in capsys.readouterr().err
    metrics = evaluate_command.main(["--model", TINY, "--zeroshot-data", str(tmp_path), "--zeroshot-skip-empty"])
    assert metrics["zeroshot_images"] == 2 and metrics["zeroshot_skipped_classes"] == 1


# ---------------------------------------------------------------------------------------------------------
# held-out contrastive loss, bootstrap intervals, paired comparisons, the linear probe


def flickr_captioned(count: int) -> list[tuple]:
    """(photo, its first two captions from captions.tsv) for the first `count` Flickr8k photos."""
    files, captions = flickr_photos(count), {}
    for line in (FLICKR / "captions.tsv").read_text().splitlines():
        name, _, caption = line.partition("\t")
        captions.setdefault(name, []).append(caption)
    return [(path, captions[path.name][:2]) for path in files]


@pytest.fixture(scope="module")
def flickr_shards(tmp_path_factory):
    """10 Flickr8k photos with two captions each, in two shards; and the (photo, captions) pairs in shard order."""
    folder, pairs = tmp_path_factory.mktemp("flickr"), flickr_captioned(10)
    for shard in range(2):
        write_shard(folder / f"00000{shard}.tar", [
            {"__key__": f"{shard}{i:03d}", "jpg": path.read_bytes(), "json": json.dumps({"captions": captions})}
            for i, (path, captions) in enumerate(pairs[5 * shard:5 * shard + 5])])
    return str(folder / "{000000..000001}.tar"), pairs


def test_val_loss_is_clip_loss_over_fixed_batches(tiny, flickr_shards):
    model, preprocess, tokenizer = tiny
    shards, pairs = flickr_shards
    model.train()  # evaluation puts it in eval mode (deterministic boundaries) and gives its modes back
    metrics = ev.val_loss_eval(model, preprocess, tokenizer, shards, batch_size=4)
    assert model.training
    again = ev.val_loss_eval(model, preprocess, tokenizer, shards, batch_size=4)
    assert metrics == again and metrics["val_loss_images"] == 8  # 10 images: batches 0-3, 4-7; the last 2 dropped

    model.eval()  # by hand: open_clip's forward and ClipLoss on the same batches, each image with its first caption
    with torch.no_grad():
        losses = []
        for start in (0, 4):
            images = load_images([path for path, _ in pairs[start:start + 4]], preprocess)
            texts = tokenizer([captions[0] for _, captions in pairs[start:start + 4]])
            losses.append(open_clip.ClipLoss()(*model(images, texts)[:3]).item())
    assert metrics["val_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)

    short = ev.val_loss_eval(model, preprocess, tokenizer, shards, batch_size=64)  # fewer than a batch: one of all
    assert short["val_loss_images"] == 10
    full = ev.evaluate(model, preprocess, tokenizer, val_data=shards, loss_batch_size=4, batch_size=3)
    assert full["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)  # the embedding batch does not matter
    assert full | ev.retrieval_eval(model, preprocess, tokenizer, shards) == full  # same recalls, one pass


def test_retrieval_items_by_hand():
    text_image = torch.tensor([0, 0, 1, 1, 2])  # image 2 has one caption
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.0],  # image 0 finds t0: hit
                               [0.1, 0.8, 0.2, 0.3, 0.4],  # image 1: t1 (not its own) is best: miss at 1
                               [0.0, 0.0, 0.9, 0.1, 0.5]])  # image 2: t2 is best: miss at 1
    # text to image at 1: t0 -> 0 yes, t1 -> 1 (0.8) no, t2 -> 2 (0.9) no, t3 -> 0 (0.3 ties 1) no, t4 -> 2 (0.5) yes
    items = ev.retrieval_items(similarity, text_image, ks=(1,))
    assert items["image_to_text_R@1"].scores.tolist() == [1.0, 0.0, 0.0]
    assert items["text_to_image_R@1"].scores.tolist() == [0.5, 0.0, 1.0]  # share of each image's captions
    assert items["text_to_image_R@1"].weights.tolist() == [2.0, 2.0, 1.0]
    recalls = ev.retrieval_recall(similarity, text_image, ks=(1,))
    for key, scores in items.items():
        assert scores.value == pytest.approx(recalls[key])  # the weighted mean is the recall over texts


def test_bootstrap_intervals_hold_the_estimates(tiny, flickr_shards, capsys):
    model, preprocess, tokenizer = tiny
    shards, _ = flickr_shards
    plain = ev.evaluate(model, preprocess, tokenizer, val_data=shards, zeroshot_data=CIFAR, max_per_class=2,
                        loss_batch_size=4)
    metrics = ev.evaluate(model, preprocess, tokenizer, val_data=shards, zeroshot_data=CIFAR, max_per_class=2,
                          loss_batch_size=4, bootstrap=200)
    assert {k: v for k, v in metrics.items() if "_ci_" not in k} == plain  # the estimates are unchanged
    with_ci = [k for k in plain if f"{k}_ci_low" in metrics]
    assert set(with_ci) == {*(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
                            "zeroshot_top1", "zeroshot_top5", "val_loss"}
    for key in with_ci:
        assert metrics[f"{key}_ci_low"] - 1e-12 <= metrics[key] <= metrics[f"{key}_ci_high"] + 1e-12, key
    assert "_ci_" not in ev.format_table(metrics) and "[" in ev.format_table(metrics).splitlines()[1]


@pytest.mark.slow
def test_compare_a_checkpoint_with_itself_and_another(tiny, flickr_shards, tmp_path, capsys):
    shards, _ = flickr_shards
    a = save_checkpoint(tiny[0], tmp_path / "a.pt")
    torch.manual_seed(3)
    b = save_checkpoint(dtplib.create_model_and_transforms("ViT-Ti-8-64", compression=4)[0], tmp_path / "b.pt")
    data = ["--model", TINY, "--val-data", shards, "--zeroshot-data", str(CIFAR), "--max-per-class", "1",
            "--loss-batch-size", "4", "--bootstrap", "100"]
    same = evaluate_command.main(["--compare", str(a), str(a), *data, "--output", str(tmp_path / "same.csv")])
    assert same["a"] == same["b"] and len(same["differences"]) == 9
    for row in same["differences"]:
        assert (row["difference"], row["ci_low"], row["ci_high"]) == (0.0, 0.0, 0.0), row
    assert "A - B" in capsys.readouterr().out
    with open(tmp_path / "same.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and rows[0]["checkpoint_a"] == str(a) and rows[0]["commit"] and rows[0]["metric"]

    single = evaluate_command.main(["--checkpoint", str(b), *data[:-2]])
    other = evaluate_command.main(["--compare", str(a), str(b), *data])
    assert other["b"] == single
    for row in other["differences"]:
        assert row["difference"] == pytest.approx(row["a"] - row["b"])
        assert row["ci_low"] <= row["difference"] + 1e-12 and row["difference"] - 1e-12 <= row["ci_high"]
    assert any(row["difference"] != 0 for row in other["differences"])


@pytest.mark.slow
def test_linear_probe_on_cifar(tiny):
    model, preprocess, tokenizer = tiny
    split = imagefolder.imagefolder_split(CIFAR, per_class_train=5, per_class_test=5, seed=0)
    assert not {path for path, _ in split.train} & {path for path, _ in split.test}  # disjoint
    options = dict(probe_data=CIFAR, probe_per_class=5, probe_test_per_class=5, seed=0)
    metrics = ev.evaluate(model, preprocess, tokenizer, bootstrap=100, **options)
    assert metrics == ev.evaluate(model, preprocess, tokenizer, bootstrap=100, **options)  # deterministic
    assert (metrics["probe_train_images"], metrics["probe_test_images"]) == (50, 50)
    assert 0.0 <= metrics["probe_top1_ci_low"] <= metrics["probe_top1"] <= metrics["probe_top1_ci_high"] <= 1.0
    # the probe scored here is the one dtplib.finetune's notebook fits
    train_x, train_y = ev.extract_features(model, preprocess, split.train)
    test_x, test_y = ev.extract_features(model, preprocess, split.test)
    assert ev.linear_probe(train_x, train_y, test_x, test_y, num_classes=10).top1 == metrics["probe_top1"]
    print("probe_top1", metrics["probe_top1"], metrics["probe_top1_ci_low"], metrics["probe_top1_ci_high"])


def test_training_writes_val_loss_per_epoch(tmp_path):
    """`train.run_evaluations` passes --val-data to `evaluate`, so the held-out loss lands in epochs.csv."""
    from dtplib import train
    from dtplib.common.cli import flags
    from dtplib.common.paths import REPO_ROOT

    sample = REPO_ROOT / "data/sample"
    train.main(flags(model="ViT-Ti-8-64", compression=4, train_data=sample / "test/000000.tar",
                     val_data=sample / "val/000000.tar", epochs=1, batch_size=8, warmup=1, workers=0, logs=tmp_path,
                     name="vl", report_to="none"))
    with open(tmp_path / "vl" / "epochs.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["val_loss"]) > 0 and row["val_loss_images"] == "24"  # 24 images: one batch of all
