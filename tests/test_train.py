"""Training loop on real components: Flickr8k photos and captions in real webdataset shards, real open_clip
models and loss, real torchrun/gloo processes and a real SIGKILL."""

import csv
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import QUIET, TI_4X, TI_4X_RUN, copy_run, flickr_photos, free_port, write_shards

from dtplib import TrainConfig, train
from dtplib import evaluate as evaluate_command
from dtplib.common.cli import CLI_ERRORS, run_cli
from dtplib.common.files import atomic_write_bytes, lock_folder
from dtplib.common.paths import REPO_ROOT
from dtplib.data.shards import SAMPLE_DIR, split_shards
from dtplib.measure import evaluate
from dtplib.tower.control import get_tower
from dtplib.training.optim import lr_at
from dtplib.training.runfolder import newest_checkpoint, truncate_csv

# one process of batch 32 against two of 16 with learned boundaries: rank 1 samples other Gumbel noise and crops, and
# the batch-count prior counts each device's batch; measured loss gaps over 4 steps: 0.15, 0.04, 0.07, 0.02
TWO_RANK_NOISE = 0.2


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run(tmp_path: Path, shards: str, *flags: str, name: str = "run") -> dict:
    return train.main(["--train-data", shards, "--logs", str(tmp_path), "--name", name, *QUIET, *flags])


@pytest.mark.slow
def test_tiny_run_loss_decreases(tmp_path, shards32):
    """Ti-4x overfits 32 real pairs: the contrastive loss falls well below chance (log 32) and every output exists."""
    result = run(tmp_path, shards32, *TI_4X, "--batch-size", "32", "--epochs", "12", "--lr", "5e-4",
                 "--warmup", "2", "--wd", "0.0")
    steps = read_csv(result["run_dir"] / "steps.csv")
    contrastive = [float(r["contrastive_loss"]) for r in steps]
    assert len(steps) == 12
    assert contrastive[0] == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.15)  # chance at init
    assert sum(contrastive[-3:]) / 3 < contrastive[0] - 0.5
    assert all(1 <= float(r["compression"]) <= 64 for r in steps)
    epochs = read_csv(result["run_dir"] / "epochs.csv")
    assert [r["first_epoch"] for r in epochs[:2]] == ["True", "False"]
    params = json.loads((result["run_dir"] / "params.json").read_text())
    assert params["total_steps"] == 12 and params["hardware"] and params["dtype"] == "fp32"
    assert (result["run_dir"] / "checkpoints" / "epoch_12.pt").is_file()
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)  # loads without pickle
    assert state["epoch"] == 12 and state["step"] == 12 and "visual.trunk.predictor.fc1.weight" in state["state_dict"]


@pytest.mark.slow
def test_resume_reaches_the_same_next_loss(tmp_path, shards32):
    """Interrupted after epoch 2 and resumed == uninterrupted, step for step (CPU, fixed seed)."""
    flags = [*TI_4X, "--batch-size", "16", "--epochs", "3", "--lr", "1e-3", "--warmup", "2", "--seed", "3"]
    full = run(tmp_path, shards32, *flags, name="full")
    run(tmp_path, shards32, *flags, "--max-steps", "4", name="cut")  # two epochs of 2 steps, then stops
    assert len(read_csv(tmp_path / "cut" / "steps.csv")) == 4
    run(tmp_path, shards32, *flags, "--resume", "latest", name="cut")
    expected = read_csv(full["run_dir"] / "steps.csv")
    resumed = read_csv(tmp_path / "cut" / "steps.csv")
    assert [r["step"] for r in resumed] == [str(i) for i in range(6)]
    for a, b in zip(expected, resumed, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5), (a, b)
        assert a["compression"] == b["compression"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_resume_is_exact_with_loader_workers(tmp_path, shards32, workers):
    """With persistent loader workers too: a resumed run's fresh workers crop as the uninterrupted run's did."""
    flags = [*TI_4X, "--batch-size", "16", "--epochs", "3", "--lr", "1e-3", "--warmup", "2", "--seed", "3",
             "--workers", str(workers)]
    full = run(tmp_path, shards32, *flags, name="full")
    run(tmp_path, shards32, *flags, "--max-steps", "2", name="cut")  # epoch 0, then stops
    run(tmp_path, shards32, *flags, "--resume", "latest", name="cut")
    expected, resumed = read_csv(full["run_dir"] / "steps.csv"), read_csv(tmp_path / "cut" / "steps.csv")
    assert [r["step"] for r in resumed] == [str(i) for i in range(6)]
    for a, b in zip(expected, resumed, strict=True):
        assert (a["loss"], a["compression"]) == (b["loss"], b["compression"]), (a, b)


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_last_checkpoint(tmp_path):
    """A run killed with SIGKILL mid-epoch resumes with `--resume latest` from its last whole checkpoint."""
    shards = write_shards(tmp_path / "shards", flickr_photos(64), per_shard=32)
    argv = [sys.executable, "-m", "dtplib.train", "--train-data", shards, "--logs", str(tmp_path), "--name", "k",
            *QUIET, *TI_4X, "--batch-size", "8", "--epochs", "4", "--warmup", "1",
            "--log-every-n-steps", "1"]  # steps.csv rows as the steps go, to see where the kill fell
    latest = tmp_path / "k" / "checkpoints" / "epoch_1.pt"  # the default policy: epoch_<n>.pt only
    process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not latest.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert latest.exists(), "no checkpoint was written"
        steps_file = tmp_path / "k" / "steps.csv"  # into the second epoch: a step after the checkpoint's 8
        while len(read_csv(steps_file)) <= 8 and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    state = torch.load(latest, map_location="cpu", weights_only=True)  # the checkpoint survived whole
    assert state["epoch"] >= 1
    steps_before = len(read_csv(tmp_path / "k" / "steps.csv"))
    assert steps_before > state["step"]  # it died mid-epoch, after the checkpoint
    subprocess.run(argv + ["--resume", "latest"], cwd=REPO_ROOT, check=True, capture_output=True)
    steps = read_csv(tmp_path / "k" / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(32))  # no gap, no duplicate
    assert [r["epoch"] for r in read_csv(tmp_path / "k" / "epochs.csv")] == ["0", "1", "2", "3"]
    assert f"at epoch {state['epoch']}" in (tmp_path / "k" / "out.log").read_text()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, shards32):
    """torchrun with 2 gloo processes of batch 16 == 1 process of batch 32 (the same 32 pairs per step).

    The 1x model has no sampling noise; the crop augmentation differs between the runs, hence the tolerance.
    """
    flags = ["--model", "ViT-Ti-8-64", "--compression", "1", "--epochs", "4", "--lr", "1e-3", "--warmup", "1",
             "--train-data", shards32, "--logs", str(tmp_path), *QUIET]
    one = train.main([*flags, "--batch-size", "32", "--name", "one"])
    two = train.launch(train.parse_args([*flags, "--batch-size", "16", "--name", "two"]), nproc_per_node=2,
                       extra_torchrun=["--master_port", str(free_port())])
    params = json.loads((two / "params.json").read_text())
    assert params["world_size"] == 2
    loss_one = [float(r["loss"]) for r in read_csv(one["run_dir"] / "steps.csv")]
    loss_two = [float(r["loss"]) for r in read_csv(two / "steps.csv")]
    assert len(loss_one) == len(loss_two) == 4
    assert loss_one[-1] < loss_one[0] - 0.05  # training moved, so agreement is not just "both at chance"
    for a, b in zip(loss_one, loss_two, strict=True):
        assert a == pytest.approx(b, abs=0.01)


@pytest.mark.slow
def test_two_gloo_processes_of_the_packed_path_match(tmp_path, shards32):
    """DTP-4x, learned boundaries, under torchrun with 2 gloo processes: the packed path gives the padded path's
    losses and compressions step for step (same seeds: the same Gumbel noise and crops on each rank), and the
    losses of one process of batch 32 within the sampling noise of the other rank's boundaries."""
    flags = [*TI_4X, "--epochs", "4", "--lr", "1e-3", "--warmup", "1", "--train-data", shards32,
             "--logs", str(tmp_path), *QUIET]
    one = train.main([*flags, "--batch-size", "32", "--name", "one"])
    runs = {execution: train.launch(train.parse_args([*flags, "--batch-size", "16", "--execution", execution,
                                                      "--name", execution]),
                                    nproc_per_node=2, extra_torchrun=["--master_port", str(free_port())])
            for execution in ("packed", "padded")}
    params = json.loads((runs["packed"] / "params.json").read_text())
    assert params["world_size"] == 2 and params["dtp"]["execution"] == "packed"
    packed, padded = (read_csv(runs[e] / "steps.csv") for e in ("packed", "padded"))
    assert len(packed) == len(padded) == 4
    for a, b in zip(packed, padded, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
        assert float(a["compression"]) == pytest.approx(float(b["compression"]), rel=1e-6)
    single = [float(r["loss"]) for r in read_csv(one["run_dir"] / "steps.csv")]
    for a, b in zip(single, (float(r["loss"]) for r in packed), strict=True):
        assert a == pytest.approx(b, abs=TWO_RANK_NOISE)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shards32, trained_ti4x):
    copy_run(trained_ti4x, tmp_path, "nan")  # a good run of 2 epochs, continued with an absurd learning rate
    latest = tmp_path / "nan" / "checkpoints" / "epoch_2.pt"
    before = latest.read_bytes()
    with pytest.raises(train.NonFiniteLoss, match=f"last good checkpoint is kept: {latest}"):
        run(tmp_path, shards32, *TI_4X_RUN, "--epochs", "4", "--resume", "latest", "--lr", "1e30",
            "--allow-changed-flags", name="nan")
    assert latest.read_bytes() == before
    log = (tmp_path / "nan" / "out.log").read_text()  # the stop is in the run's log, with its traceback
    assert "stopped: loss is" in log and "Traceback" in log


def test_a_state_with_non_finite_tensors_is_never_written(tmp_path):
    checkpoints = train.Checkpoints(tmp_path / "checkpoints")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"step": 4, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    good = checkpoints.save(state, 1, numbered=True, latest=True)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    optimizer.state[model.bias]["exp_avg"][0] = float("inf")
    poisoned = {"step": 8, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    with pytest.raises(train.NonFiniteState, match=rf"2 tensors are not finite \(weight, optimizer state 1.exp_avg, "
                                                   rf"...\) at step 8: no checkpoint written; the last good "
                                                   rf"checkpoint is kept: {good}"):
        checkpoints.save(poisoned, 2, numbered=True, latest=True)
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    assert torch.load(good, weights_only=True)["step"] == 4
    with pytest.raises(train.NonFiniteState, match="there is no checkpoint of this run"):
        train.Checkpoints(tmp_path / "other").save(poisoned, 1, numbered=True, latest=False)


def test_checkpoint_policy_is_open_clip_trains(tmp_path):
    """epoch_<n>.pt alone by default; epoch_latest.pt too with --save-most-recent; only the newest epoch_<n>.pt
    with --delete-previous-checkpoint; a mid-epoch epoch_latest.pt goes once a newer epoch_<n>.pt is written."""
    model = torch.nn.Linear(3, 2)
    state = {"step": 0, "state_dict": model.state_dict(), "optimizer": {}}

    def names(folder):
        return sorted(p.name for p in folder.iterdir())

    default = train.Checkpoints(tmp_path / "run" / "checkpoints")
    default.save(state | {"step": 3}, 1, numbered=False, latest=True)  # a --max-steps stop inside epoch 1
    assert default.latest().name == "epoch_latest.pt"
    for epoch in (1, 2):
        assert default.save(state, epoch, numbered=True, latest=False).name == f"epoch_{epoch}.pt"
    assert names(default.folder) == ["epoch_1.pt", "epoch_2.pt"]
    assert newest_checkpoint(tmp_path / "run") == default.folder / "epoch_2.pt"  # what bench and notebooks read
    assert default.save(state, 3, numbered=False, latest=False) is None  # not a --save-frequency epoch
    recent = train.Checkpoints(tmp_path / "recent", delete_previous=True)
    for epoch in (1, 2, 3):
        recent.save(state | {"step": epoch}, epoch, numbered=epoch != 2, latest=True)
    assert names(recent.folder) == ["epoch_3.pt", "epoch_latest.pt"] and recent.latest().name == "epoch_latest.pt"
    assert torch.load(recent.latest(), weights_only=True)["step"] == 3


@pytest.mark.slow
def test_resume_into_another_runs_folder_is_refused(tmp_path, shards32, trained_ti4x):
    flags = TI_4X_RUN
    other = copy_run(trained_ti4x, tmp_path, "other")  # a run of these flags, and
    run(tmp_path, shards32, *flags, name="victim")  # another one
    victim = tmp_path / "victim"
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    foreign = other / "checkpoints" / "epoch_1.pt"
    with pytest.raises(FileExistsError, match="holds run .* belongs to run"):
        run(tmp_path, shards32, *flags, "--resume", str(foreign), "--max-steps", "3", name="victim")
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before
    forked = run(tmp_path, shards32, *flags, "--resume", str(foreign), name="fork")  # a new folder may start from it
    assert [r["step"] for r in read_csv(forked["run_dir"] / "steps.csv")] == ["2", "3"]
    own = run(tmp_path, shards32, *flags, "--epochs", "3", "--resume", str(other / "checkpoints" / "epoch_2.pt"),
              "--allow-changed-flags", name="other")
    assert len(read_csv(own["run_dir"] / "steps.csv")) == 6  # its own checkpoint, by path, is accepted


@pytest.mark.slow
def test_max_steps_mid_epoch_saves_a_resumable_unfinished_epoch(tmp_path):
    shards = write_shards(tmp_path / "shards", flickr_photos(32), per_shard=16)
    flags = [*TI_4X, "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--seed", "5",
             "--workers", "1"]
    full = run(tmp_path, shards, *flags, name="full")
    cut = run(tmp_path, shards, *flags, "--max-steps", "2", name="cut")  # 4 steps an epoch: stops inside epoch 0
    folder = cut["run_dir"] / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_latest.pt"]  # not labelled as a finished epoch
    state = torch.load(folder / "epoch_latest.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["mid_epoch"], state["batches_done"]) == (0, 2, True, 2)
    assert not (cut["run_dir"] / "epochs.csv").exists()
    run(tmp_path, shards, *flags, "--resume", "latest", name="cut")
    expected, resumed = read_csv(full["run_dir"] / "steps.csv"), read_csv(tmp_path / "cut" / "steps.csv")
    assert [(r["epoch"], r["step"]) for r in resumed] == [(r["epoch"], r["step"]) for r in expected]
    for a, b in zip(expected, resumed, strict=True):
        assert (a["loss"], a["compression"]) == (b["loss"], b["compression"]), (a, b)
    assert [r["epoch"] for r in read_csv(tmp_path / "cut" / "epochs.csv")] == ["0", "1"]
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt", "epoch_2.pt"]  # the mid-epoch one is stale


def test_resume_latest_passes_over_a_corrupt_checkpoint_and_removes_partial_writes(tmp_path, shards32,
                                                                                   trained_ti4x):
    run_dir = copy_run(trained_ti4x, tmp_path, "r")  # a finished run of TI_4X_RUN: 2 epochs
    folder = run_dir / "checkpoints"
    (folder / "epoch_latest.pt").write_bytes(b"PK\x03\x04 torn")  # a disk that lost the latest write
    partial = folder / ".epoch_latest.pt.k2j4.tmp"
    partial.write_bytes(b"half")
    run(tmp_path, shards32, *TI_4X_RUN, "--epochs", "3", "--resume", "latest", "--allow-changed-flags", name="r")
    assert not partial.exists()
    log = (run_dir / "out.log").read_text()
    assert "epoch_latest.pt cannot be read" in log and "resuming from" in log and "epoch_2.pt" in log
    assert [r["step"] for r in read_csv(run_dir / "steps.csv")] == [str(i) for i in range(6)]


def test_epochs_csv_counts_skipped_samples_by_reason(tmp_path):
    photos = flickr_photos(34)
    folder = tmp_path / "shards"
    shards = write_shards(folder, photos[:32], per_shard=16)
    with wds.TarWriter(str(folder / "000002.tar")) as sink:  # one pair without a caption, one without an image
        sink.write({"__key__": photos[32].stem, "jpg": photos[32].read_bytes()})
        sink.write({"__key__": photos[33].stem, "txt": "a caption with no image"})
    sizes = json.loads((folder / "sizes.json").read_text()) | {"000002.tar": 2}
    (folder / "sizes.json").write_text(json.dumps(sizes))
    result = run(tmp_path, shards.replace("000001", "000002"), *TI_4X, "--batch-size", "16", "--epochs", "1",
                 "--warmup", "1")
    row = read_csv(result["run_dir"] / "epochs.csv")[0]  # 34 declared, 32 usable: the epoch passes the bad ones
    no_caption, no_image = int(row["skipped_no_caption"]), int(row["skipped_no_image"])
    assert no_caption >= 1 and no_image >= 1 and int(row["skipped_samples"]) == no_caption + no_image


@pytest.mark.parametrize("flags, error, message", [
    (["--train-data", "/nonexistent/{000000..000003}.tar"], FileNotFoundError, "shards do not exist"),
    (["--model", "ViT-Tiny-8"], ValueError, "unknown model 'ViT-Tiny-8'"),
    (["--model", "DTP-ViT-Ti-8-64-4x", "--compression", "2"], ValueError, "means compression 4"),
    (["--model", "ViT-Ti-8-64", "--upsample"], ValueError, "--upsample needs a DTP model"),
    (["--model", "RN50", "--compression", "4"], ValueError, "--compression needs --model"),
    (["--batch-size", "1"], ValueError, "at least 2 pairs"),
    (["--batch-size", "64"], ValueError, "holds 32 samples, fewer than one global batch"),
    (["--precision", "amp", "--device", "cpu"], ValueError, "on CPU"),
    (["--zeroshot-data", "/nonexistent/cifar"], FileNotFoundError, "/nonexistent/cifar"),
    (["--val-data", "/nonexistent/test.tar"], FileNotFoundError, "shards do not exist"),
    (["--resume", "/nonexistent/epoch_3.pt"], FileNotFoundError, "no such checkpoint"),
    (["--lr", "inf"], ValueError, "--lr must be a finite number"),
    (["--lr", "nan"], ValueError, "--lr must be a finite number"),
    (["--boundary-loss-weight", "nan"], ValueError, "--boundary-loss-weight must be a finite number"),
    (["--compression", "0.5"], ValueError, "--compression must be >= 1"),
    (["--compression", "nan"], ValueError, "--compression must be a finite number"),
    (["--compression", "inf"], ValueError, "--compression must be a finite number"),
    (["--train-num-samples", "-5"], ValueError, "--train-num-samples must be >= 1, got -5"),
    (["--max-steps", "-3"], ValueError, "--max-steps must be >= 1, got -3"),
    (["--threads", "-1"], ValueError, "--threads must be >= 1, got -1"),
    (["--epochs", "0"], ValueError, "--epochs must be >= 1, got 0"),
    (["--workers", "-1"], ValueError, "--workers must be >= 0, got -1"),
    (["--warmup", "-1"], ValueError, "--warmup must be >= 0, got -1"),
    (["--lr", "0"], ValueError, r"--lr must be > 0, got 0.0"),
    (["--beta2", "1"], ValueError, r"--beta2 must be in \[0, 1\), got 1.0"),
    (["--seed", "-1"], ValueError, r"--seed must be in \[0, 4294967295\], got -1"),
    (["--log-every-n-steps", "0"], ValueError, "--log-every-n-steps must be >= 1, got 0"),
    (["--zeroshot-frequency", "-1"], ValueError, "--zeroshot-frequency must be >= 0, got -1"),
    (["--grad-clip-norm", "0"], ValueError, r"--grad-clip-norm must be > 0, got 0.0"),
    (["--workers", "4"], ValueError, "has 2 shards, too few to feed 4 loader workers x 1 processes"),
])
def test_bad_flags_fail_before_training(tmp_path, shards32, flags, error, message):
    argv = ["--train-data", shards32, "--model", "ViT-Ti-8-64", "--batch-size", "16", "--logs", str(tmp_path),
            "--name", "bad", *QUIET]
    with pytest.raises(error, match=message):
        train.main(argv + flags)  # later flags win
    assert not (tmp_path / "bad").exists()  # nothing was started


def test_existing_run_folder_is_not_overwritten(tmp_path, shards32, trained_ti4x):
    copy_run(trained_ti4x, tmp_path, "mine")  # a run of TI_4X_RUN
    before = {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--resume latest"):
        run(tmp_path, shards32, *TI_4X_RUN, name="mine")
    assert {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dtplib.train", "--train-data", str(tmp_path / "none.tar"),
                             "--model", "ViT-Ti-8-64"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "do not exist" in result.stderr and "Traceback" not in result.stderr


def test_lr_schedule_warms_up_then_decays_to_zero():
    args = train.parse_args(["--train-data", "x", "--lr", "1.0", "--warmup", "4"])
    lrs = [lr_at(step, lr=args.lr, warmup=args.warmup, total_steps=14) for step in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.5) and lrs[13] == pytest.approx(0.0245, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_checkpoint_rebuilds_an_unregistered_ratio_for_evaluation(tmp_path, shards32):
    """A checkpoint records its flags: `python -m dtplib.evaluate --checkpoint` rebuilds a 3x tower (no such name)."""
    result = run(tmp_path, shards32, "--model", "ViT-Ti-8-64", "--compression", "3", "--batch-size", "16",
                 "--epochs", "1", "--warmup", "1", name="c3")
    model, _, _ = evaluate.load_model(checkpoint=result["checkpoint"])
    assert get_tower(model).dtp.compression == 3
    trained = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.state_dict()["visual.trunk.predictor.fc2.weight"],
                               trained["visual.trunk.predictor.fc2.weight"])
    metrics = evaluate_command.main(["--checkpoint", str(result["checkpoint"]), "--val-data", shards32])
    assert metrics["retrieval_images"] == 32 and 0 <= metrics["image_to_text_R@1"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("boundaries", ["threshold", "batch-topk"])
def test_torchcompile_trains_in_one_graph_and_matches_eager(tmp_path, shards32, monkeypatch, boundaries):
    """--torchcompile: the CLIP model is traced whole (fullgraph=True, so any graph break would fail the run) into one
    graph that serves every step, with no recompile, and the compiled run's steps equal the eager run's. The graphs
    are run by the "eager" backend here (the same dynamo capture as inductor, without its minutes of code
    generation on a CPU)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(train, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    flags = [*TI_4X, "--boundaries", boundaries, "--batch-size", "8", "--epochs", "1", "--lr", "1e-3",
             "--warmup", "1", "--seed", "5", "--log-every-n-steps", "2"]
    compiled = run(tmp_path, shards32, *flags, "--torchcompile", name="compiled")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    eager = run(tmp_path, shards32, *flags, name="eager")
    expected, got = read_csv(eager["run_dir"] / "steps.csv"), read_csv(compiled["run_dir"] / "steps.csv")
    assert [r["step"] for r in got] == ["0", "1", "2", "3"]
    for a, b in zip(expected, got, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4), (a, b)
        assert a["compression"] == b["compression"]
    assert "fullgraph=True" in (compiled["run_dir"] / "out.log").read_text()


TRAIN_LINE = re.compile(  # open_clip_train's line, with DTP's Boundary_loss and Compression
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\)\] "
    r"Data \(t\): \d+\.\d{3} Batch \(t\): \d+\.\d{3}, [\d.]+/s, [\d.]+/s/gpu LR: \d\.\d{6} Logit Scale: \d+\.\d{3} "
    r"Contrastive_loss: \S+ \(\S+\) Boundary_loss: \S+ \(\S+\) Loss: (?P<loss>\S+) \((?P<mean>\S+)\) "
    r"Compression: \d+\.\d{3} \(\d+\.\d{3}\)$")


@pytest.mark.slow
def test_log_every_n_steps_writes_open_clip_train_lines_to_out_log(tmp_path, shards32):
    """--log-every-n-steps 2 on 4 steps an epoch: a `Train Epoch` line at 16 and 32 of 32 samples in each epoch, with
    the last step's loss and the epoch's mean so far, read from the values the loop already has (steps.csv's)."""
    result = run(tmp_path, shards32, *TI_4X, "--batch-size", "8", "--epochs", "2", "--warmup", "1",
                 "--log-every-n-steps", "2", "--timing-warmup", "0")
    lines = [line for line in (result["run_dir"] / "out.log").read_text().splitlines() if "Train Epoch" in line]
    found = [TRAIN_LINE.search(line) for line in lines]
    assert all(found), lines
    assert [(m["epoch"], m["seen"], m["total"], m["percent"]) for m in found] == [
        ("0", "16", "32", "50"), ("0", "32", "32", "100"), ("1", "16", "32", "50"), ("1", "32", "32", "100")]
    losses = [float(r["loss"]) for r in read_csv(result["run_dir"] / "steps.csv")]
    assert float(found[1]["loss"]) == pytest.approx(losses[3], rel=1e-4)
    assert float(found[1]["mean"]) == pytest.approx(sum(losses[:4]) / 4, rel=1e-4)
    assert float(found[2]["mean"]) == pytest.approx(sum(losses[4:6]) / 2, rel=1e-4)  # the epoch's own mean


@pytest.mark.slow
def test_report_to_tensorboard_and_wandb_offline(tmp_path, shards32, monkeypatch):
    """--report-to tensorboard,wandb: TensorBoard events and an offline wandb run inside the run folder, both with
    the per-step and per-epoch scalars; the wandb run's id is the run's id (a resume continues it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train.main(["--train-data", shards32, "--logs", str(tmp_path), "--name", "wb", "--workers", "0",
                         "--threads", "1", *TI_4X, "--batch-size", "16", "--epochs", "1", "--warmup", "1",
                         "--report-to", "tensorboard,wandb", "--wandb-project-name", "dtp-test"])
    run_id = json.loads((result["run_dir"] / "params.json").read_text())["run_id"]
    offline = list((result["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in offline] == [f"run-{run_id}.wandb"]
    records = offline[0].read_bytes()
    for key in (b"train/contrastive_loss", b"train/boundary_loss", b"train/compression", b"train/lr",
                b"epoch/loss", b"epoch/compression", b"dtp-test"):
        assert key in records, key
    events = EventAccumulator(str(result["run_dir"] / "tensorboard")).Reload()
    assert {"train/loss", "train/compression", "epoch/loss"} <= set(events.Tags()["scalars"])


def test_default_run_name_records_the_dtp_settings():
    """Each setting of the tower that differs from its default is in the default folder name, after the model and
    the boundary mode, so that runs of other settings never share a folder."""
    def name(**options) -> str:
        return train._default_name(TrainConfig.from_options(train_data="x", model="ViT-Ti-8-64", **options))

    assert re.fullmatch(r"\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d-ViT-Ti-8-64-4x-threshold-b64-s0", name(compression=4))
    assert name(compression=4, boundaries="topk", execution="packed", capacity=1.5, seed=2).endswith(
        "-ViT-Ti-8-64-4x-topk-execution=packed-capacity=1.5-b64-s2")
    assert name(compression=2, upsample=True, boundary_loss_weight=0.5, patch_order="hilbert").endswith(
        "-ViT-Ti-8-64-2x-up-threshold-boundary-loss-weight=0.5-patch-order=hilbert-b64-s0")
    assert name(forced_boundaries=4).endswith("-ViT-Ti-8-64-4x-uniform-b64-s0")
    assert name(batch_size=32).endswith("-ViT-Ti-8-64-b32-s0")  # a plain open_clip model: no tower settings
    assert name(compression=1, force_image_size=32).endswith("-ViT-Ti-8-64-1x-px32-b64-s0")  # CLIPA's low resolution


# ----------------------------------------------------------------------------------------------------------
# Refusals before the run folder exists, one writer per folder, resumes that keep their flags


def cli(capsys, main, argv: list[str], prog: str = "python -m dtplib.train") -> tuple[int, list[str]]:
    """A command line's `main` through `run_cli`, in this process: (exit status, its stderr's error lines)."""
    with pytest.raises(SystemExit) as stop:
        run_cli(main, [str(a) for a in argv], prog=prog, errors=(*CLI_ERRORS, train.NonFiniteLoss))
    errors = [line for line in capsys.readouterr().err.splitlines() if f"{prog}: error:" in line]
    return stop.value.code, errors


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_bad_number_flags_are_one_line_each_before_the_run_folder(tmp_path, shards32, capsys):
    argv = ["--train-data", shards32, "--logs", tmp_path, "--name", "bad", *QUIET, *TI_4X, "--batch-size", "16",
            "--train-num-samples", "-5", "--max-steps", "-3", "--threads", "-1"]
    code, errors = cli(capsys, train.main, argv)
    assert code == 2
    assert [line.split("error: ")[1].split(" (--debug")[0] for line in errors] == [
        "--train-num-samples must be >= 1, got -5", "--threads must be >= 1, got -1",
        "--max-steps must be >= 1, got -3"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("data, reason", [
    ("empty", r"000000.tar is empty \(0 bytes\) \(its sizes.json declares 100 samples\)"),
    ("no captions", r"000000.tar has no usable sample \(an image and a caption\): 4 samples, 4 with no caption"),
])
def test_unusable_training_shards_are_refused_before_the_run_folder(tmp_path, capsys, data, reason):
    """A 0-byte tar whose sizes.json says 100, and shards of photos without captions: one line naming the file and
    the reason (with --workers 0: no advice about workers), and no run folder left to block the name."""
    folder = tmp_path / "shards"
    folder.mkdir()
    if data == "empty":
        (folder / "000000.tar").write_bytes(b"")
        (folder / "sizes.json").write_text('{"000000.tar": 100}')
    else:
        with wds.TarWriter(str(folder / "000000.tar")) as sink:
            for photo in flickr_photos(4):
                sink.write({"__key__": photo.stem, "jpg": photo.read_bytes()})
        (folder / "sizes.json").write_text('{"000000.tar": 4}')
    code, errors = cli(capsys, train.main, ["--train-data", folder / "000000.tar", "--logs", tmp_path, "--name", "r",
                                            *QUIET, *TI_4X, "--batch-size", "2"])
    assert code == 2 and len(errors) == 1 and re.search(reason, errors[0]), errors
    assert "workers" not in errors[0]
    assert not (tmp_path / "r").exists()


def test_train_num_samples_beyond_the_declared_size_is_a_warning(shards32, caplog):
    config = TrainConfig.parse(["--train-data", shards32, *TI_4X, "--batch-size", "16", "--workers", "0",
                                "--train-num-samples", "100000"])
    with caplog.at_level("WARNING", logger="dtplib.train"):
        config.check()
    assert "--train-num-samples 100000 exceeds the 32 samples the shards' sizes.json declares" in caplog.text


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, shards32, trained_ti4x, capsys):
    """Another process holds the run folder's lock (taken with `lock_folder`, in a real second process): a resume
    of the same --logs/--name is refused in one line naming that process's PID and host, and writes nothing; once
    the holder is SIGKILLed its lock file blocks nothing."""
    run_dir = copy_run(trained_ti4x, tmp_path, "held")
    holder = subprocess.Popen(  # files.py imports only the standard library: loaded alone, no torch import
        [sys.executable, "-c", "import importlib.util, sys, time\n"
         "spec = importlib.util.spec_from_file_location('files', sys.argv[1])\n"
         "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n"
         "lock = files.lock_folder(sys.argv[2]); print('locked', flush=True); time.sleep(120)",
         str(REPO_ROOT / "dtplib" / "common" / "files.py"), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        code, errors = cli(capsys, train.main, ["--train-data", shards32, "--logs", tmp_path, "--name", "held",
                                                *QUIET, *TI_4X_RUN, "--resume", "latest"])
        assert code == 2 and len(errors) == 1
        assert f"is in use by process {holder.pid} on {socket.gethostname()}" in errors[0]
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    lock_folder(run_dir).release()  # the dead holder's lock went with it


def test_a_resume_with_other_flags_is_refused_in_one_line(tmp_path, shards32, trained_ti4x, capsys):
    """--resume latest with --epochs 4 --lr 2e-3 on a finished run: refused, listing both (runtime flags such as
    --workers and --log-every-n-steps may differ), the run's files untouched; --resume PATH into the same folder too."""
    run_dir = copy_run(trained_ti4x, tmp_path, "r")
    before = snapshot(run_dir)
    for resume in ("latest", run_dir / "checkpoints" / "epoch_1.pt"):
        code, errors = cli(capsys, train.main, ["--train-data", shards32, "--logs", tmp_path, "--name", "r",
                                                *QUIET, *TI_4X_RUN, "--epochs", "4", "--lr", "2e-3", "--resume",
                                                resume, "--log-every-n-steps", "7"])
        assert code == 2 and len(errors) == 1
        assert "--epochs: 2 -> 4, --lr: 0.0005 -> 0.002)" in errors[0] and "--allow-changed-flags" in errors[0]
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_allowed_flag_changes_go_to_history_and_no_row_names_an_unwritten_checkpoint(tmp_path, shards32,
                                                                                     trained_ti4x):
    """--allow-changed-flags --epochs 3: params.json keeps the first flags and records the change (step, old, new).
    The third epoch's checkpoint cannot be written (its path is a folder): the run stops naming it, and epochs.csv
    holds no row for it; the same resume then trains it, writes the row, and records nothing twice."""
    run_dir = copy_run(trained_ti4x, tmp_path, "r")
    (run_dir / "checkpoints" / "epoch_3.pt").mkdir()
    flags = [*TI_4X_RUN, "--epochs", "3", "--resume", "latest", "--allow-changed-flags"]
    with pytest.raises(IsADirectoryError, match="epoch_3.pt"):
        run(tmp_path, shards32, *flags, name="r")
    assert [r["epoch"] for r in read_csv(run_dir / "epochs.csv")] == ["0", "1"]
    params = json.loads((run_dir / "params.json").read_text())
    assert params["epochs"] == 2 and params["lr"] == 5e-4
    assert params["history"] == [{"step": 4, "epoch": 2, "changed": {"epochs": {"old": 2, "new": 3}}}]
    (run_dir / "checkpoints" / "epoch_3.pt").rmdir()
    run(tmp_path, shards32, *TI_4X_RUN, "--epochs", "3", "--resume", "latest", name="r")  # the run's flags now
    rows = read_csv(run_dir / "epochs.csv")
    assert [(r["epoch"], r["checkpoint"]) for r in rows] == [("0", "epoch_1.pt"), ("1", "epoch_2.pt"),
                                                             ("2", "epoch_3.pt")]
    assert json.loads((run_dir / "params.json").read_text())["history"] == params["history"]


def test_a_row_lost_between_checkpoint_and_csv_comes_back_on_resume(tmp_path, shards32, trained_ti4x):
    """A kill after the checkpoint of epoch 1 and before its epochs.csv row: the resume writes the row the
    checkpoint carries."""
    run_dir = copy_run(trained_ti4x, tmp_path, "r")
    rows = read_csv(run_dir / "epochs.csv")
    truncate_csv(run_dir / "epochs.csv", lambda r: r["epoch"] == "0")
    run(tmp_path, shards32, *TI_4X_RUN, "--resume", "latest", name="r")  # finished: nothing trains
    assert read_csv(run_dir / "epochs.csv") == rows


@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_a_checkpoint_of_another_model_is_refused_before_the_run_folder(tmp_path, shards32, trained_ti4x, capsys,
                                                                         flag):
    checkpoint = trained_ti4x / "checkpoints" / "epoch_2.pt"  # DTP-ViT-Ti-8-64-4x, into the plain ViT-Ti-8-64
    code, errors = cli(capsys, train.main, ["--train-data", shards32, "--logs", tmp_path, "--name", "plain", *QUIET,
                                            "--model", "ViT-Ti-8-64", "--batch-size", "16", flag, checkpoint])
    assert code == 2 and len(errors) == 1
    assert str(checkpoint) in errors[0] and re.search(r"\d+ missing keys \(.*\); \d+ unexpected keys \(", errors[0])
    assert not (tmp_path / "plain").exists()


class Canary:
    """A pickle that would write a file when loaded (what a malicious checkpoint does)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('ran')",)


def test_evaluate_refuses_a_malicious_or_foreign_file_in_one_line(tmp_path, trained_ti4x, capsys):
    """--pretrained and --checkpoint with a pickle that would run code: one line naming the file and the refused
    global, the code never runs; --debug has torch's whole message (its warning included). --pretrained of another
    model's checkpoint: one line with the mismatch."""
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Canary(canary)}, evil)
    val = ["--val-data", split_shards(SAMPLE_DIR, "test"), "--max-images", "4"]
    for weights in (["--model", "ViT-Ti-8-64", "--pretrained", evil], ["--checkpoint", evil]):
        code, errors = cli(capsys, evaluate_command.main, [*weights, *val], prog="python -m dtplib.evaluate")
        assert code == 2 and len(errors) == 1
        assert "evil.pt: not a checkpoint that loads safely" in errors[0] and "could run arbitrary code" in errors[0]
        assert "Unsupported global: GLOBAL exec" in errors[0]
    with pytest.raises(ValueError) as debug:
        run_cli(evaluate_command.main, ["--checkpoint", str(evil), *map(str, val), "--debug"])
    assert "arbitrary code execution" in str(debug.value.__cause__)  # torch's own full message
    assert not canary.exists()
    foreign = trained_ti4x / "checkpoints" / "epoch_2.pt"
    code, errors = cli(capsys, evaluate_command.main, ["--model", "ViT-Ti-8-64", "--pretrained", foreign, *val],
                       prog="python -m dtplib.evaluate")
    assert code == 2 and len(errors) == 1 and "does not fit model ViT-Ti-8-64" in errors[0]


def test_a_failed_write_names_its_file(tmp_path):
    """A write the file system refuses (here the file-size limit, as a full disk refuses with ENOSPC) is an
    OSError naming the file, and leaves no temporary file."""
    target = tmp_path / "epoch_1.pt"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))
        with pytest.raises(OSError, match=f"File too large: '{target}'"):
            atomic_write_bytes(target, bytes(1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []
