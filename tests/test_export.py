"""Weights-only files (`python -m dtplib.export`, `dtplib.tower.weights`) and open_clip's registry of the DTP names.

The acceptance test: a `dtplib.train`-style checkpoint exported, loaded back through open_clip's own
`create_model_and_transforms(name, pretrained=file)`, gives the checkpoint's image and text embeddings on real
Flickr8k photos and captions (fp32 within 1e-6, fp16 within 1e-3)."""

import json

import open_clip
import pytest
import torch
from conftest import flickr_captions, flickr_photos

import dtplib
from dtplib.common.images import open_rgb
from dtplib.export import main as export_main
from dtplib.figures import plots, viz
from dtplib.measure.evaluate import load_model
from dtplib.tower import clip
from dtplib.tower.weights import is_weights_file, load_weights, weights_info
from dtplib.training.checkpoint import build_from_config, export_weights, load_trained
from dtplib.training.config import TrainConfig


def test_registered_names_come_from_the_shipped_json_files_through_open_clips_public_api():
    shipped = {p.stem: json.loads(p.read_text()) for p in clip.MODEL_CONFIGS.glob("*.json")}
    assert shipped == clip.open_clip_configs(), \
        "model_configs/ is out of date with ARCHS: run dtplib.tower.clip.write_open_clip_configs()"
    assert set(shipped) == set(clip.variant_names())
    names = open_clip.list_models()
    assert set(clip.variant_names()) <= set(names) and "DTP-ViT-B-32-4x-up" in names
    assert all(open_clip.get_model_config(name) == config for name, config in shipped.items())
    dtplib.register()  # idempotent
    assert open_clip.list_models() == names


def _checkpoint(tmp_path, **settings):
    """A checkpoint as `dtplib.train` writes it, <run>/checkpoints/epoch_3.pt next to <run>/params.json, of a Ti-4x
    model at initialisation (its predictor's logits spread over several units: varied boundaries per photo)."""
    config = TrainConfig.from_options(model="ViT-Ti-8-64", compression=4, execution="packed", seed=7, **settings)
    model = build_from_config(config)[0]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.json").write_text(json.dumps({"commit": "abc1234"}))
    path = run / "checkpoints" / "epoch_3.pt"
    torch.save({"epoch": 3, "step": 12, "name": "run", "run_id": "r1", "mid_epoch": False,
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},  # as DDP saves it
                "args": config.to_dict()}, path)
    return path


def _photos_and_captions(preprocess, n=8):
    files = flickr_photos(n)
    images = torch.stack([preprocess(open_rgb(f)) for f in files])  # n x 3 x 64 x 64
    return images, open_clip.get_tokenizer("ViT-Ti-8-64")(flickr_captions(files))


def _embeddings(model, images, texts):
    """The CLIP embeddings (normalised, as open_clip's forward returns them) of the images and texts."""
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


def test_an_exported_checkpoint_loads_through_open_clip_with_the_checkpoints_embeddings(tmp_path):
    checkpoint = _checkpoint(tmp_path)
    trained, preprocess, _, _ = load_trained(checkpoint)
    images, texts = _photos_and_captions(preprocess)
    expected = _embeddings(trained, images, texts)
    with dtplib.trace(trained) as traced:
        trained.encode_image(images)
    assert traced.last().tokens.unique().numel() > 1  # photos keep different token counts: segments to get right
    for fp16, atol in ((False, 1e-6), (True, 1e-3)):
        out = tmp_path / "weights" / f"ti4x-{'fp16' if fp16 else 'fp32'}.safetensors"
        export_main([str(checkpoint), "--out", str(out), *(["--fp16"] if fp16 else [])])
        header = json.loads(out.with_suffix(".json").read_text())
        assert header == weights_info(out) and is_weights_file(out) and not is_weights_file(checkpoint)
        assert header["open_clip_model"] == "DTP-ViT-Ti-8-64-4x" and header["open_clip_loads"]
        assert header["dtype"] == ("float16" if fp16 else "float32") and header["dtp"]["compression"] == 4
        assert header["source"] | {"exported_by": None} == {
            "run": "run", "run_id": "r1", "checkpoint": "epoch_3.pt", "epoch": 3, "epochs": 32, "step": 12,
            "seed": 7, "train_data": None, "commit": "abc1234", "exported_by": None}
        size = sum(v.numel() * 4 for v in trained.state_dict().values())
        assert out.stat().st_size < (0.6 if fp16 else 1.1) * size

        model = open_clip.create_model_and_transforms(header["open_clip_model"], pretrained=str(out))[0].eval()
        with dtplib.trace(model) as loaded:
            got = _embeddings(model, images, texts)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        same = (loaded.last().boundaries == traced.last().boundaries).float().mean()
        assert same == 1 if not fp16 else same > 0.99  # the same segments (fp16: a logit near 0 may flip)


def test_settings_an_open_clip_name_does_not_carry_are_in_the_header_and_load_weights_sets_them(tmp_path):
    checkpoint = _checkpoint(tmp_path, boundaries="topk")
    out = export_weights(checkpoint, tmp_path / "topk.safetensors")
    header = weights_info(out)
    assert header["settings_not_in_name"] == {"boundaries": "topk", "execution": "packed"}
    trained, preprocess, _, _ = load_trained(checkpoint)
    images, texts = _photos_and_captions(preprocess)
    expected = _embeddings(trained, images, texts)
    named = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x", pretrained=str(out))[0].eval()
    assert not torch.allclose(_embeddings(named, images, texts)[0], expected[0], atol=1e-3)  # threshold, not topk
    with dtplib.use_config(named, **header["settings_not_in_name"]):
        torch.testing.assert_close(_embeddings(named, images, texts), expected, atol=1e-6, rtol=0)
    loaded, _, _, _ = load_weights(out)
    assert dtplib.get_tower(loaded).dtp.boundaries == "topk"
    torch.testing.assert_close(_embeddings(loaded, images, texts), expected, atol=1e-6, rtol=0)
    by_file = load_model(None, out)[0]  # dtplib.viz / dtplib.evaluate --checkpoint take the file too
    torch.testing.assert_close(_embeddings(by_file, images, texts), expected, atol=1e-6, rtol=0)


def test_export_refuses_bad_input_with_one_line(tmp_path, capsys):
    from dtplib.common.cli import run_cli

    checkpoint = _checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    out = tmp_path / "w.safetensors"
    export_weights(checkpoint, out)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases = {(str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a.safetensors")): "checkpoint not found",
             (str(tmp_path / "notes.txt"), "--out", str(tmp_path / "a.safetensors")): "not a checkpoint",
             (str(foreign), "--out", str(tmp_path / "a.safetensors")): "not a checkpoint of python -m dtplib.train",
             (str(checkpoint), "--out", str(out)): "--overwrite",
             (str(checkpoint), "--out", str(tmp_path / "a.pt")): "must end with .safetensors"}
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as stop:
            run_cli(export_main, list(argv), prog="python -m dtplib.export")
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and error.count("\n") == 1, error
    before = out.read_bytes()
    export_main([str(checkpoint), "--out", str(out), "--overwrite", "--fp16"])
    assert out.read_bytes() != before and weights_info(out)["dtype"] == "float16"
    with pytest.raises(FileNotFoundError, match="neither a file nor one of the shipped"):
        load_weights("no-such-weights")


def test_notebook_04_code_path_is_seeded_and_marks_random_weights_in_the_figure(tmp_path):
    """The notebook's cells: a weights file by path, or random init seeded (two runs, the same boundaries), whose
    figures carry the random-weights note."""
    out = export_weights(_checkpoint(tmp_path), tmp_path / "ti4x.safetensors")
    model, preprocess, _, _ = dtplib.load_weights(out)
    images, _ = _photos_and_captions(preprocess, 6)
    record = viz.trace_batches(model, images)
    figure = viz.add_note(plots.boundary_figure(images, record, count=2), "")
    assert figure.get_suptitle() == ""  # trained weights: no note

    records = []
    for _ in range(2):
        torch.manual_seed(3)
        random_model, preprocess, _ = load_model("DTP-ViT-Ti-8-64-4x")
        dtplib.fit_boundary_prior(random_model, images, steps=3, seed=3)
        records.append(viz.trace_batches(random_model, images))
    assert torch.equal(records[0].boundaries, records[1].boundaries)
    assert torch.equal(records[0].probs, records[1].probs)
    figure = viz.add_note(plots.token_grid(images, records[0], count=4))
    assert figure.get_suptitle().startswith(viz.RANDOM_WEIGHTS_NOTE)
    viz.add_note(figure, "second line")
    assert figure.get_suptitle() == f"second line\n{viz.RANDOM_WEIGHTS_NOTE}"
