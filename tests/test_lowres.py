"""CLIPA's low resolution (--force-image-size) and a grid's [finish]: the refusals of bad sizes, the benchmark's
label, the position embedding between grids, and one tiny grid of a low-resolution arm with a full-resolution
finish, trained on the embedded sample shards: where its final evaluation comes from, what its costs add up to, and
that a second call trains nothing."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from open_clip import get_model_preprocess_cfg

from dtplib import experiment, train
from dtplib.common.cli import run_cli
from dtplib.common.paths import REPO_ROOT
from dtplib.grid import spec
from dtplib.measure import evaluate
from dtplib.measure.specs import parse_spec, trained_label
from dtplib.tower.clip import read_checkpoint
from dtplib.tower.weights import weights_info
from dtplib.training.checkpoint import POSITION_EMBEDDINGS, build_from_config, export_weights, fit_position_embeddings
from dtplib.training.config import TrainConfig

SAMPLE = REPO_ROOT / "data" / "sample"
GRID = f"""
seeds = [0]

[shared]
model = "ViT-Ti-8-64"
compression = 1
train_data = "{SAMPLE / 'train'}"
val_data = "{SAMPLE / 'val'}"
train_num_samples = 32
epochs = 1
batch_size = 16
warmup = 1
workers = 0
threads = 1
report_to = "none"

[final]
val_data = "{SAMPLE / 'test'}"

[timing]
steps = 1
warmup = 1
batch_size = 4

[finish]
epochs = 1
force_image_size = 64

[arms.lowres-4x]
force_image_size = 32

[arms.lowres-4x.finish]
lr = 1e-9
"""  # CLIPA on Ti: 32 px, 16 patches; then one epoch at 64 px, at an lr so small that its weights stay the start's


def write_grid(folder: Path, text: str = GRID) -> Path:
    path = folder / "grid.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("size", "message"), [
    ("36", "--force-image-size 36 is not a multiple of ViT-Ti-8-64's patch size 8 (try 32 or 40)"),
    ("0", "--force-image-size must be a whole number of pixels > 0, got 0"),
    ("-32", "--force-image-size must be a whole number of pixels > 0, got -32"),
])
def test_bad_sizes_are_one_line_before_the_run_folder(tmp_path, capsys, size, message):
    argv = ["--train-data", str(SAMPLE / "train"), "--model", "ViT-Ti-8-64", "--compression", "1",
            "--force-image-size", size, "--logs", str(tmp_path), "--name", "run", "--report-to", "none"]
    with pytest.raises(SystemExit) as stopped:
        run_cli(train.main, argv, prog="python -m dtplib.train")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == f"python -m dtplib.train: error: {message} (--debug for the traceback)"
    assert not (tmp_path / "run").exists()


def test_the_benchmark_labels_the_input_size():
    assert parse_spec("DTP-ViT-Ti-8-64-1x+px32").label == "DTP-ViT-Ti-8-64-1x+px32"
    assert parse_spec("ViT-B-16+px112+pd0.5") == parse_spec("ViT-B-16+pd0.5+px112")
    config = TrainConfig.from_options(train_data="x", model="ViT-Ti-8-64", compression=1, force_image_size=32)
    assert trained_label(config) == "DTP-ViT-Ti-8-64-1x+px32"  # a run matches the benchmark row that times it
    with pytest.raises(ValueError, match="not a multiple of ViT-B-16's patch size 16"):
        parse_spec("ViT-B-16+px100")


@pytest.mark.parametrize("compression", [None, 1])  # open_clip's own ViT; the DTP tower (timm)
def test_the_position_embedding_follows_the_grid(compression):
    """Weights trained at 32 px load into the model at 64 px: the class row kept, a constant grid stays constant
    (bicubic), the same grid passes unchanged, and the other tensors are the same objects."""
    options = {} if compression is None else {"compression": compression}
    small, large = (build_from_config(TrainConfig.from_options(train_data="x", model="ViT-Ti-8-64",
                                                               force_image_size=size, **options))[0]
                    for size in (32, 64))
    key = next(k for k in POSITION_EMBEDDINGS if k in small.state_dict())
    state = small.state_dict()
    state[key] = torch.cat([state[key][..., :1, :], torch.full_like(state[key][..., 1:, :], 0.25)], dim=-2)
    fitted = fit_position_embeddings(state, large)
    assert fitted[key].shape == large.state_dict()[key].shape and fitted[key].shape[-2] == 65
    assert torch.equal(fitted[key][..., :1, :], state[key][..., :1, :])  # the class token's row
    assert torch.allclose(fitted[key][..., 1:, :], torch.tensor(0.25), atol=1e-6)
    large.load_state_dict(fitted)  # strict: every other tensor fits as it is
    assert fit_position_embeddings(state, small)[key] is state[key]


@pytest.mark.parametrize(("edit", "message"), [
    (("epochs = 1\nforce_image_size = 64", "force_image_size = 64"), r"needs epochs \(the finish's length"),
    (("lr = 1e-9", 'pretrained = "x.pt"'), r"\[arms.lowres-4x.finish\]: 'pretrained' is set by the driver"),
    (("lr = 1e-9", "lrr = 1e-9"), r"\[arms.lowres-4x.finish\]: unknown flag 'lrr'.*did you mean 'lr'"),
    (("force_image_size = 64", "force_image_size = 64\nseed = 1"), r"\[finish\]: 'seed' is set by the driver"),
    (("[finish]", "finish = 3\n[finishh]"), "unknown key 'finishh'"),
])
def test_bad_finish_tables_fail_before_any_training(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        experiment.main(["--grid", str(write_grid(tmp_path, GRID.replace(*edit))), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_arm_can_go_without_the_finish(tmp_path):
    grid = spec.load_grid(write_grid(tmp_path, GRID + "\n[arms.1x]\nfinish = false\n"))
    assert grid.finish_flags("1x") is None and grid.finish_options("1x", 0) is None
    assert grid.finish_flags("lowres-4x") == {"epochs": 1, "force_image_size": 64, "lr": 1e-9}
    assert spec.stage_epochs(grid, "1x") == (1, 0) and spec.stage_epochs(grid, "lowres-4x") == (1, 1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The grid run once: (grid file, out folder, main's result)."""
    folder = tmp_path_factory.mktemp("lowres")
    grid = write_grid(folder)
    return grid, folder / "out", experiment.main(["--grid", str(grid), "--out", str(folder / "out")])


@pytest.mark.slow
class TestALowResolutionArmWithAFinish:
    """One arm, one seed: a main run at 32 px and its finish at 64 px (two dtplib.train children), the [final]
    evaluation (a dtplib.evaluate child) and [timing]; under a minute on 2 cores."""

    def test_the_main_run_trains_and_evaluates_at_its_size(self, finished, tmp_path):
        _, out, result = finished
        assert result["trained"] == result["evaluated"] == ["lowres-4x-seed0"]
        run = out / "runs" / "lowres-4x-seed0"
        assert json.loads((run / "params.json").read_text())["force_image_size"] == 32
        model, preprocess, _ = evaluate.load_model(checkpoint=spec.last_checkpoint(run))  # the size it trained at
        assert get_model_preprocess_cfg(model)["size"] == (32, 32) and model.visual.trunk.num_patches == 16
        assert preprocess.transforms[1].size == (32, 32)  # center crop
        model, _, _ = evaluate.load_model(checkpoint=spec.last_checkpoint(run), force_image_size=64)
        assert model.visual.trunk.num_patches == 64
        assert model.encode_image(torch.zeros(1, 3, 64, 64)).isfinite().all()
        exported = export_weights(spec.last_checkpoint(run), tmp_path / "lowres.safetensors")  # records its size
        assert weights_info(exported)["source"]["force_image_size"] == 32
        assert not weights_info(exported)["open_clip_loads"]  # open_clip's name alone would build 64 px
        model, _, _ = evaluate.load_model(checkpoint=exported)
        assert get_model_preprocess_cfg(model)["size"] == (32, 32) and model.visual.trunk.num_patches == 16

    def test_the_finish_starts_from_the_main_weights_with_a_new_schedule(self, finished):
        _, out, _ = finished
        run = out / "runs" / "lowres-4x-seed0"
        main, finish = (read_checkpoint(spec.last_checkpoint(folder)) for folder in (run, spec.finish_dir(run)))
        assert finish["args"]["force_image_size"] == 64 and finish["args"]["pretrained"].endswith(
            "lowres-4x-seed0/checkpoints/epoch_latest.pt")
        assert finish["step"] == main["step"] == 2 and finish["epoch"] == 1  # its own count, from 0
        assert finish["run_id"] != main["run_id"]
        others = [k for k in main["state_dict"] if k != "visual.trunk.pos_embed"]  # lr 1e-9: two AdamW steps move
        for key in others:  # no weight by more than about 2e-9, so every tensor is still the main run's
            assert torch.allclose(finish["state_dict"][key], main["state_dict"][key], atol=1e-6), key
        position = finish["state_dict"]["visual.trunk.pos_embed"]
        assert position.shape == (1, 65, 192)  # resampled to 64 px's grid
        steps = pd.read_csv(spec.finish_dir(run) / "steps.csv")
        assert steps["step"].tolist() == [0, 1] and steps["lr"].iloc[0] == pytest.approx(1e-9)

    def test_final_and_timing_read_the_right_checkpoints(self, finished):
        _, out, _ = finished
        final = json.loads((out / "runs" / "lowres-4x-seed0" / spec.FINAL_FILE).read_text())
        assert final["checkpoint"].endswith("lowres-4x-seed0/finish/checkpoints/epoch_latest.pt")
        assert final["image_size"] == 64 and final["metrics"]["retrieval_images"] > 0
        timed = pd.read_csv(out / spec.TIMING_FILE)  # the main run's step: what its training is mostly made of
        assert timed["boundary_source"].iloc[0].endswith("lowres-4x-seed0/checkpoints/epoch_latest.pt")
        assert "finish" not in timed["boundary_source"].iloc[0]
        assert (out / ".gitignore").read_text().count("checkpoints/") == 2  # the run's and its finish's

    def test_the_costs_count_main_and_finish(self, finished):
        _, out, _ = finished
        runs = pd.read_csv(out / "runs.csv")
        main, finish = runs.iloc[0], runs.iloc[1]
        assert runs["stage"].tolist() == ["main", "finish"] and runs["epochs_done"].tolist() == [1, 2]
        assert runs["complete"].all() and runs["model"].eq("DTP-ViT-Ti-8-64-1x+px32").all()
        assert runs["samples_seen"].tolist() == [32, 64] and runs["steps"].tolist() == [2, 2]
        assert 0.24 < main["gmacs_per_image"] / finish["gmacs_per_image"] < 0.27  # 16 patches, then 64
        assert finish["train_gmacs"] == pytest.approx(
            main["train_gmacs"] + (finish["gmacs_per_image"] + finish["text_gmacs"]) * 32, rel=1e-12)
        run = out / "runs" / "lowres-4x-seed0"
        step_times = [pd.read_csv(folder / "steps.csv")["step_time_s"].sum() for folder in (run, spec.finish_dir(run))]
        assert finish["train_time_s"] == pytest.approx(sum(step_times), rel=1e-9)
        assert math.isnan(main["final_val_loss"])  # the [final] scores are the finished run's
        assert finish["final_val_loss"] == json.loads((run / spec.FINAL_FILE).read_text())["metrics"]["val_loss"]
        summary = (out / "summary.md").read_text()
        assert "| lowres-4x | `--force-image-size 32` | `--epochs 1 --force-image-size 64 --lr 1e-09` |" in summary
        assert "Runs complete: 1 of 1." in summary

    def test_a_second_call_trains_nothing_and_other_finish_flags_are_refused(self, finished, tmp_path):
        grid, out, _ = finished
        files = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("**/*.csv")}
        again = experiment.main(["--grid", str(grid), "--out", str(out)])
        assert again["trained"] == again["evaluated"] == [] and not again["timed"]
        assert {p: p.stat().st_mtime_ns for p in files} == files
        changed = write_grid(tmp_path, GRID.replace("lr = 1e-9", "lr = 2e-9"))
        with pytest.raises(ValueError, match="lowres-4x-seed0/finish was trained with lr=1e-09, the grid now gives"):
            experiment.main(["--grid", str(changed), "--out", str(out)])
