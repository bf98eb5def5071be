"""TrainConfig is the one description of the training flags; the optimisation step both loops use."""

import argparse
import copy
import dataclasses
import json

import pytest
import torch

from dtplib import train
from dtplib.tower.clip import build_model, resolve_model
from dtplib.tower.config import DTPConfig
from dtplib.tower.control import get_tower, use_config
from dtplib.training.checkpoint import build_from_config, load_trained, training_config
from dtplib.training.config import TrainConfig
from dtplib.training.optim import NonFiniteLoss, lr_at, make_optimizer, train_step, use_adamw_impl


def test_every_field_is_a_flag_with_its_default_and_meaning():
    """Each TrainConfig field is a flag; the nested tower gives one flag per DTPConfig setting (absent unless
    given), so a DTP setting is declared once, in DTPConfig."""
    parser = TrainConfig.parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "debug")}  # the command line's own
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "dtp"}
    settings = {f.name: f for f in DTPConfig.settings()}
    assert set(actions) == set(fields) | set(settings) and not set(fields) & set(settings)
    for name, field in fields.items():
        assert actions[name].default == field.default, name
        assert field.metadata["help"], f"{name} has no meaning"
    for name, setting in settings.items():
        assert actions[name].default == argparse.SUPPRESS and setting.metadata["help"], name
        assert actions[name].choices == setting.metadata["choices"], name
    assert "compression" in settings and "pre_layers" not in settings  # the layer split is the arch's
    help_text = parser.format_help()
    assert "--boundary-loss-weight" in help_text and "--force-patch-dropout" in help_text
    assert "--allow-changed-flags" in help_text and "--debug" in help_text


def test_command_line_and_keyword_construction_agree():
    config = train.parse_args(["--train-data", "x.tar", "--model", "ViT-Ti-8-64", "--compression", "4",
                               "--boundaries", "topk", "--upsample", "--upsample-weights", "normalised",
                               "--lr", "1e-3"])
    assert config == TrainConfig.from_options(train_data="x.tar", model="ViT-Ti-8-64", compression=4.0,
                                              boundaries="topk", upsample=True, upsample_weights="normalised",
                                              lr=1e-3)
    dtp = get_tower(build_from_config(config)[0]).dtp
    assert (dtp.boundaries, dtp.upsample, dtp.upsample_weights) == ("topk", True, "normalised")
    assert dtp == config.dtp  # the nested field is the tower's whole config, the arch's layer split included
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "ViT-Ti-8-64"])  # --train-data is required
    with pytest.raises(ValueError, match="not TrainConfig fields or flags"):
        TrainConfig.from_options(train_data="x.tar", learning_rate=1.0)


@pytest.mark.parametrize("argv", [
    ["--model", "ViT-Ti-8-64"],
    ["--model", "ViT-Ti-8-64", "--force-patch-dropout", "0.5", "--epochs", "3"],
    ["--model", "ViT-Ti-8-64", "--compression", "4", "--boundaries", "batch-topk", "--capacity", "1.5"],
    ["--model", "DTP-ViT-Ti-8-64-4x-up", "--upsample-weights", "normalised", "--torchcompile"],
    ["--model", "ViT-Ti-8-64", "--forced-boundaries", "4", "--patch-order", "hilbert", "--execution", "padded"],
    ["--model", "ViT-Ti-8-64", "--compression", "2.5", "--prior-scope", "image", "--boundary-loss-weight", "0"],
    ["--model", "ViT-Ti-8-64", "--compression", "1", "--force-image-size", "32", "--pretrained", "run/epoch_1.pt"],
])
def test_flags_objects_and_stored_dicts_round_trip(argv):
    """parse -> to_argv -> parse, and to_dict -> from_dict, give the same config: what a new process (torchrun,
    the grid's children) receives is what the caller built."""
    config = TrainConfig.parse(["--train-data", "x.tar", *argv])
    assert TrainConfig.parse(config.to_argv()) == config
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_tower_comes_from_the_model_name_or_the_flags():
    named = TrainConfig.from_options(train_data="x", model="DTP-ViT-Ti-8-64-4x", boundaries="topk")
    flagged = TrainConfig.from_options(train_data="x", model="ViT-Ti-8-64", compression=4, boundaries="topk")
    assert named.dtp == flagged.dtp and named.model_name == flagged.model_name == "DTP-ViT-Ti-8-64-4x"
    assert flagged.dtp.short_layers == 4  # the Ti arch's split, not DTPConfig's B/32 default
    uniform = TrainConfig.from_options(train_data="x", model="ViT-Ti-8-64", forced_boundaries=4)
    assert uniform.dtp.compression == 4 and uniform.target_compression == 4
    plain = TrainConfig.from_options(train_data="x", model="ViT-Ti-8-64", boundaries="topk")
    assert plain.dtp is None and plain.model_name == "ViT-Ti-8-64"  # a plain tower has no boundaries to set
    for options, message in [({"model": "DTP-ViT-Ti-8-64-4x", "compression": 2}, "means compression 4"),
                             ({"model": "ViT-Ti-8-64", "patch_order": "hilbert"}, "need a DTP model"),
                             ({"model": "ViT-Ti-8-64", "forced_boundaries": 1}, "needs C >= 2"),
                             ({"model": "ViT-Ti-8-64", "compression": 4, "forced_boundaries": 2},
                              "means compression 2"),
                             ({"model": "ViT-Ti-8-64", "compression": 0.5}, "--compression must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_options(train_data="x", **options)


def test_stored_dicts_rebuild_with_defaults_for_missing_fields():
    old = {"model": "ViT-Ti-8-64", "compression": 4.0, "upsample": False, "lr": 1e-3,  # before prior_scope etc.
           "name": "run", "world_size": 2, "commit": "abc1234", "steps_per_epoch": 10}  # params.json extras
    config = TrainConfig.from_dict(old)
    assert config.lr == 1e-3 and config.name == "run"
    assert (config.dtp.prior_scope, config.dtp.boundaries, config.dtp.execution) == ("batch", "threshold", "packed")
    assert config.dtp.capacity == 0  # runs from before the cap had none
    # a changed default: runs from before --adamw-impl used torch's AdamW, new ones the fused kernel
    assert config.adamw_impl == "torch" and TrainConfig().adamw_impl == "fused"
    assert TrainConfig.from_dict({**old, "adamw_impl": "fused"}).adamw_impl == "fused"
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert training_config({"args": old}) == config
    assert training_config({"state_dict": {}}) is None  # not written by dtplib.train
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        config.replace(learning_rate=1.0)


def test_an_older_checkpoint_without_the_newer_flags_loads(tmp_path):
    config = TrainConfig.from_options(model="ViT-Ti-8-64", compression=3, boundary_loss_weight=2.5)
    model = build_from_config(config)[0]
    stored = {k: v for k, v in config.flag_values().items() if k not in ("prior_scope", "boundaries", "execution")}
    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": model.state_dict(), "args": stored}, path)
    loaded, _, _, read = load_trained(path)
    tower = get_tower(loaded)
    assert read.dtp.compression == 3 and tower.dtp.compression == 3 and tower.dtp.execution == "packed"
    assert tower.dtp.boundary_loss_weight == 2.5  # the weight lives in the tower's DTPConfig
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_resolve_and_build_refuse_contradictions():
    assert resolve_model("DTP-ViT-Ti-8-64-4x") == ("ViT-Ti-8-64", 4, False)
    assert resolve_model("ViT-B-32") == ("ViT-B-32", None, False)
    with pytest.raises(ValueError, match="means compression 4"):
        resolve_model("DTP-ViT-Ti-8-64-4x", compression=2)
    with pytest.raises(ValueError, match="need a DTP model"):
        build_model("ViT-Ti-8-64", boundaries="topk")


def test_train_step_adds_the_towers_weighted_prior_and_skips_non_finite_losses():
    model = build_model("ViT-Ti-8-64", 4)[0]
    images = torch.randn(4, 3, 64, 64)
    optimizer = make_optimizer(model, lr=1e-3, wd=0.1)

    def task():
        return model.encode_image(images).square().mean(), None

    for weight in (0.0, 3.0):
        with use_config(model, boundary_loss_weight=weight):
            result = train_step(model, optimizer, task, lr=1e-4, step=0, device=torch.device("cpu"))
        assert result.boundary_loss is not None and result.finite.item()
        assert result.segments.shape == (4,) and result.dropped.ndim == 0
        expected = result.task_loss + weight * result.boundary_loss
        torch.testing.assert_close(result.loss, expected)
        assert optimizer.param_groups[0]["lr"] == 1e-4
    assert get_tower(model).dtp.boundary_loss_weight == 1.0  # use_config restores the tower's own
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps_before = {s["step"].item() for s in optimizer.state.values()}

    def nan_loss():
        return model.encode_image(images).square().mean() * float("nan"), None

    # the fused AdamW (the default) skips the update on the device; the flag comes back for the loop to read
    result = train_step(model, optimizer, nan_loss, lr=1e-4, step=7, device=torch.device("cpu"))
    assert not result.finite.item() and not hasattr(optimizer, "found_inf")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update from a non-finite loss
    assert {s["step"].item() for s in optimizer.state.values()} == steps_before  # nor a step counted
    # torch's own AdamW cannot skip on the device: the step checks on the host and stops before the update
    looped = make_optimizer(model, lr=1e-3, wd=0.1, impl="torch")
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 7: stopping; lower it"):
        train_step(model, looped, nan_loss, lr=1e-4, step=7, device=torch.device("cpu"), hint="lower it")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="shape the tower's parameters"):
        with use_config(model, compression=2):
            pass


def test_the_fused_adamw_is_the_default_and_follows_torchs_own_to_rounding():
    torch.manual_seed(0)
    model = build_model("ViT-Ti-8-64", 4)[0]
    images = torch.randn(4, 3, 64, 64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {}
    for impl in ("fused", "torch"):
        model.load_state_dict(start)
        optimizer = make_optimizer(model, lr=1e-3, wd=0.1, impl=impl)
        assert optimizer.defaults["fused"] is (True if impl == "fused" else None)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1]  # the same groups either way
        for step in range(5):
            torch.manual_seed(step)  # the same Gumbel noise, so the same boundaries and gradients
            train_step(model, optimizer, lambda: (model.encode_image(images).square().mean(), None), lr=1e-3,
                       step=step, device=torch.device("cpu"))
        weights[impl] = {k: v.clone() for k, v in model.state_dict().items()}
    moved = max((weights["fused"][k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point())
    assert moved > 1e-3  # the steps did update the weights
    torch.testing.assert_close(weights["fused"], weights["torch"], rtol=1e-4, atol=1e-5)
    assert make_optimizer(model, lr=1e-3, wd=0.1).defaults["fused"] is True
    # a resumed run takes its flag's kernel, not the checkpoint's: a torch-kernel state goes on fused, and back
    saved = optimizer.state_dict()  # the "torch" run's, 5 steps in
    for impl in ("fused", "torch"):
        resumed = make_optimizer(model, lr=1e-3, wd=0.1, impl=impl)
        resumed.load_state_dict(copy.deepcopy(saved))  # as torch.load gives it: tensors of its own
        use_adamw_impl(resumed, impl)
        assert all(g["fused"] is (True if impl == "fused" else None) for g in resumed.param_groups)
        train_step(model, resumed, lambda: (model.encode_image(images).square().mean(), None), lr=1e-3, step=5,
                   device=torch.device("cpu"))
        assert {s["step"].item() for s in resumed.state.values()} == {6.0}
    with pytest.raises(ValueError, match="AdamW impl 'apex'"):
        make_optimizer(model, lr=1e-3, wd=0.1, impl="apex")


def test_lr_schedules():
    assert lr_at(10, lr=1.0, warmup=4, total_steps=14, scheduler="const") == 1.0
    assert lr_at(13, lr=1.0, warmup=4, total_steps=14) < 0.03


@pytest.mark.parametrize("report_to, backends", [
    ("tensorboard", ("tensorboard",)), ("wandb", ("wandb",)), ("tensorboard,wandb", ("tensorboard", "wandb")),
    ("wandb, tensorboard", ("tensorboard", "wandb")), ("all", ("tensorboard", "wandb")), ("none", ()), ("", ()),
])
def test_report_to_is_open_clip_trains_comma_list(report_to, backends):
    assert train.parse_args(["--train-data", "x.tar", "--report-to", report_to]).reporters == backends


def test_report_to_refuses_an_unknown_backend():
    config = TrainConfig.from_options(train_data="x.tar", report_to="tensorboard,wandbb")
    with pytest.raises(ValueError, match="--report-to tensorboard,wandbb: unknown 'wandbb'"):
        config.check()  # before the data checks: no run folder, no shards read
