"""The experiment driver on the embedded sample shards: a two-arm, two-seed grid of real `dtplib.train` runs, a
second call that trains nothing, a SIGKILL mid-grid and a resume that ends with the same runs.csv, and the grid
checks that fail before any training."""

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from one_process import run_module

from dtplib import experiment
from dtplib.common.paths import REPO_ROOT, data_path
from dtplib.grid import contrasts as grid_contrasts
from dtplib.grid import report, spec
from dtplib.grid.runs import RunFailed, compare_finals
from dtplib.measure import stats
from dtplib.measure.evaluate import read_items, write_items
from dtplib.measure.metrics import ItemScores

SAMPLE = REPO_ROOT / "data" / "sample"
TINY_RUN = """epochs = 1
batch_size = 16
warmup = 1
workers = 0
threads = 1
report_to = "none"
"""  # one epoch of a few batches, in the test's process
GRID = f"""
reference = "1x"
seeds = [0, 1]
contrasts = [["4x", "1x"]]

[shared]
model = "ViT-Ti-8-64"
train_data = "{SAMPLE / 'train'}"
val_data = "{SAMPLE / 'val'}"
train_num_samples = 48
{TINY_RUN}
[final]
val_data = "{SAMPLE / 'test'}"
bootstrap = 20

[timing]
steps = 2
warmup = 1
batch_size = 4

[alignment]
num_images = 12
draws = 3
overlays = ["4x"]

[arms.1x]
compression = 1

[arms.4x]
compression = 4
"""
METRICS = ["image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
           "text_to_image_R@5", "text_to_image_R@10", "loss", "compression", "samples_seen", "gmacs_per_image",
           "train_gmacs"]


def write_grid(folder: Path, text: str = GRID, name: str = "grid.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The grid run once, uninterrupted: (grid file, out folder, main's result)."""
    folder = tmp_path_factory.mktemp("grid")
    grid = write_grid(folder)
    out = folder / "out"
    return grid, out, experiment.main(["--grid", str(grid), "--out", str(out)])


@pytest.mark.slow
class TestTheTrainedGrid:
    """The tests that read the grid `finished` trains (four runs and their evaluations in child processes, about two
    minutes on 2 cores): under pytest-xdist a class is one unit of work (tests/conftest.py), so one worker trains the
    grid, once."""

    def test_a_grid_trains_every_run_and_reports(self, finished):
        grid, out, result = finished
        assert result["trained"] == result["evaluated"] == ["1x-seed0", "4x-seed0", "1x-seed1", "4x-seed1"]
        for first, second in itertools.pairwise(result["trained"]):  # each run evaluated before the next trains
            checkpoints = (out / "runs" / second / "checkpoints").glob("*.pt")
            assert (out / "runs" / first / "final.json").stat().st_mtime < min(p.stat().st_mtime for p in checkpoints)
        runs = pd.read_csv(out / "runs.csv")
        final = json.loads((out / "runs" / "4x-seed1" / "final.json").read_text())
        assert final["checkpoint"].endswith("4x-seed1/checkpoints/epoch_latest.pt")
        assert final["val_data"].endswith("test")
        assert final["bootstrap"] == 20 and final["metrics"]["retrieval_images"] > 0
        for name in ("text_to_image_R@10", "val_loss"):  # the [final] metrics, with their per-run intervals
            assert (runs[f"final_{name}_ci_low"] <= runs[f"final_{name}"]).all()
            assert (runs[f"final_{name}"] <= runs[f"final_{name}_ci_high"]).all()
        assert runs.loc[runs["arm"] == "4x", "final_val_loss"].tolist() == pytest.approx([
            json.loads((out / "runs" / f"4x-seed{seed}" / "final.json").read_text())["metrics"]["val_loss"]
            for seed in (0, 1)], rel=1e-12)
        assert len(runs) == 4 and set(zip(runs["arm"], runs["seed"], strict=True)) == {
            ("1x", 0), ("4x", 0), ("1x", 1), ("4x", 1)}
        assert runs["complete"].all() and (runs["epochs_done"] == 1).all()
        assert dict(zip(runs["arm"], runs["model"], strict=True)) == {"1x": "DTP-ViT-Ti-8-64-1x",
                                                                       "4x": "DTP-ViT-Ti-8-64-4x"}
        assert (runs["samples_seen"] == 48).all()  # 3 steps of 16
        assert (runs["train_time_s"] > 0).all() and runs["text_to_image_R@10"].between(0, 1).all()
        assert runs["commit"].notna().all() and runs["hardware"].notna().all()
        one, four = (runs[runs["arm"] == arm].iloc[0] for arm in ("1x", "4x"))
        assert one["compression"] == 1.0 and four["compression"] > 1.5
        assert four["gmacs_per_image"] < one["gmacs_per_image"]  # fewer tokens in the shortened layers
        assert one["train_gmacs"] == pytest.approx((one["gmacs_per_image"] + one["text_gmacs"]) * 48)
        summary = (out / "summary.md").read_text()
        assert "Runs complete: 4 of 4." in summary and "## Exploratory: paired differences against 1x" in summary
        assert "4x − 1x (pairs=2)" in summary and "| text_to_image_R@10 |" in summary
        assert "| final_text_to_image_R@10 |" in summary and "final_text_to_image_R@10_ci" not in summary
        assert f"--val-data {SAMPLE / 'val'} " in summary  # the grid's flags as written
        assert result["timed"] and "## Training step time: the final checkpoints (seed 0)" in summary
        timed = pd.read_csv(out / "step_times.csv").set_index("arm")
        assert list(timed.index) == ["1x", "4x"] and (timed["reference"] == "1x").all() and (timed["seed"] == 0).all()
        assert timed.loc["1x", "speedup"] == 1 and (timed["steps"] == 2).all() and (timed["median_s"] > 0).all()
        assert timed.loc["4x", "boundary_source"].endswith("4x-seed0/checkpoints/epoch_latest.pt")
        assert timed.loc["4x", "analytic_bound"] > 1 and timed.loc["1x", "realised_compression"] == 1
        assert (out / "curves_text_to_image_R_at_10.png").stat().st_size > 0
        assert (out / "runs" / "4x-seed1" / "epochs.csv").is_file()
        # [alignment]: the learned arm's runs on COCO-mini, each once, and the overlays of its seed-0 run
        assert result["aligned"] == ["4x-seed0", "4x-seed1"]
        aligned = pd.read_csv(out / "alignment.csv")
        assert aligned.groupby("run")["boundaries"].apply(list).to_dict() == {
            run: ["learned", "uniform (same count)", "random (same count)"] for run in ("4x-seed0", "4x-seed1")}
        assert (aligned["images"] > 0).all() and aligned["alignment"].between(0, 1).all()
        assert (aligned["ci low"] <= aligned["alignment"]).all() and (aligned["alignment"] <= aligned["ci high"]).all()
        assert "## Boundary alignment with COCO object outlines" in summary and "| 4x-seed1 |" in summary
        assert (out / "overlays" / "4x" / "overlays.png").stat().st_size > 0
        assert "`overlays/4x/overlays.png`" in summary
        # contrasts: the paired differences by hand, at the last epoch and at equal training cost
        contrasts = pd.read_csv(out / "contrasts.csv")
        last = contrasts[(contrasts["at"] == "last epoch") & (contrasts["metric"] == "text_to_image_R@10")].iloc[0]
        by_seed = runs.set_index(["arm", "seed"])["text_to_image_R@10"]
        differences = [by_seed[("4x", s)] - by_seed[("1x", s)] for s in (0, 1)]
        assert last["pairs"] == 2 and last["difference"] == pytest.approx(sum(differences) / 2)
        assert (last["ci_low"], last["ci_high"]) == pytest.approx(stats.t_interval(differences)[1:3])
        assert set(contrasts["at"]) == {"last epoch", "equal model_time_s", "equal train_gmacs"}  # [timing]: the model
        assert (runs.loc[runs["complete"], "model_time_s"] > 0).all()
        hb = contrasts[(contrasts["at"] == "last epoch") & (contrasts["metric"] == "final_text_to_image_R@10")].iloc[0]
        assert hb["hb_pairs"] == 2 and hb["hb_low"] <= hb["hb_high"] and set(contrasts["family"]) == {"exploratory"}
        assert all((out / "runs" / f"{arm}-seed{seed}" / spec.ITEMS_FILE).is_file() for arm in ("1x", "4x")
                   for seed in (0, 1))
        equal = contrasts[(contrasts["at"] == "equal train_gmacs")].iloc[0]  # one epoch each: both end at one point,
        assert equal["cost"] == pytest.approx(runs.loc[runs["arm"] == "4x", "train_gmacs"].mean())  # the 4x run's cost
        assert "## Exploratory: paired differences over seeds" in summary and "### At equal train_gmacs" in summary
        assert "## Primary" not in summary  # no [protocol]: everything is exploratory
        ignored = (out / ".gitignore").read_text()
        assert "checkpoints" in ignored and "runs/*/run.lock" in ignored
        assert (out / "runs" / "4x-seed0" / "run.lock").is_file()  # each child run locked its folder

    def test_a_second_call_trains_nothing(self, finished):
        grid, out, _ = finished
        steps = {p: (p.stat().st_mtime_ns, p.read_bytes())
                 for p in [*(out / "runs").glob("*/steps.csv"), *(out / "runs").glob("*/final.json")]}
        assert len(steps) == 8
        before = pd.read_csv(out / "runs.csv")
        again = experiment.main(["--grid", str(grid), "--out", str(out)])
        assert again["trained"] == again["evaluated"] == again["aligned"] == [] and not again["timed"]
        assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in steps} == steps
        pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), before)

    def test_the_report_takes_its_provenance_before_it_writes(self, finished, monkeypatch):
        """A report regenerated in a clean checkout whose results are committed must not call itself dirty because of
        its own runs.csv: the commit is read once, before the first file is rewritten."""
        grid, out, _ = finished
        events = []
        real_info, real_write = report.run_info, report.atomic_write_text
        monkeypatch.setattr(report, "run_info", lambda *a, **k: events.append("info") or real_info(*a, **k))
        monkeypatch.setattr(report, "atomic_write_text", lambda *a, **k: events.append("write") or real_write(*a, **k))
        experiment.main(["--grid", str(grid), "--out", str(out), "--report-only"])
        assert events[0] == "info" and events.count("info") == 1
        assert events.count("write") == 3  # runs, summary, contrasts

    def test_a_killed_grid_resumes_to_the_same_rows(self, finished, tmp_path):
        """The grid's seed-0 piece, its first run already trained and evaluated (copied from the uninterrupted grid):
        SIGKILL to the driver and its training child while the second run trains; the same command then skips the
        first run, retrains the second and ends with the uninterrupted grid's rows, and the summary names the runs of
        the piece not run."""
        grid, reference, _ = finished
        out = tmp_path / "out"
        shutil.copytree(reference / "runs" / "1x-seed0", out / "runs" / "1x-seed0")  # the piece's first run, done
        command = [sys.executable, "-m", "dtplib.experiment", "--grid", str(grid), "--out", str(out), "--seeds", "0"]
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        second = out / "runs" / "4x-seed0" / "steps.csv"
        try:
            deadline = time.monotonic() + 120
            while not second.is_file() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert process.poll() is None, "the grid finished before it could be killed"
            os.killpg(process.pid, signal.SIGKILL)  # the driver and the dtplib.train child it started
        finally:
            process.wait()
        assert spec.epochs_done(out / "runs" / "4x-seed0") == 0
        result = experiment.main(command[3:])
        assert result["trained"] == result["evaluated"] == ["4x-seed0"]
        resumed, expected = (pd.read_csv(folder / "runs.csv") for folder in (out, reference))
        keys = ["arm", "seed", "epoch", "epochs_done", "complete", "final_text_to_image_R@10", "final_val_loss"]
        expected = expected[expected["seed"] == 0].reset_index(drop=True)
        pd.testing.assert_frame_equal(resumed[keys + METRICS], expected[keys + METRICS], check_exact=True)
        summary = (out / "summary.md").read_text()
        assert "Runs complete: 2 of 4." in summary and "Not started: 1x-seed1, 4x-seed1." in summary

    @pytest.mark.parametrize("lost", ["final", "alignment"])
    def test_a_finished_run_whose_checkpoint_is_gone_is_refused_before_training(self, finished, tmp_path, lost):
        """A grid's results copied without their checkpoints (they are not committed): a run that still needs its
        [final] evaluation or its [alignment] rows is named, with the way out, before anything trains."""
        grid, reference, _ = finished
        out = tmp_path / "out"
        shutil.copytree(reference, out, ignore=shutil.ignore_patterns("checkpoints"))
        if lost == "final":
            (out / "runs" / "4x-seed1" / "final.json").unlink()
        else:
            alignment = pd.read_csv(out / "alignment.csv")
            alignment[alignment["run"] != "4x-seed1"].to_csv(out / "alignment.csv", index=False)
        (out / "runs" / "1x-seed1" / "epochs.csv").unlink()  # an unfinished run that would train first
        with pytest.raises(ValueError, match=rf"runs/4x-seed1 is finished.*{lost if lost == 'final' else 'alignment'}.*"
                                             r"checkpoints/epoch_latest.pt.*delete that run folder"):
            experiment.main(["--grid", str(grid), "--out", str(out)])
        assert not (out / "runs" / "1x-seed1" / "epochs.csv").exists()

    def test_a_run_evaluated_before_per_item_scores_gains_them(self, finished, tmp_path):
        """A complete run with a final.json but no per-item scores (evaluated before [final] wrote them) is evaluated
        again from its checkpoint: its final.json is kept when the new evaluation agrees with it, else refused."""
        grid, reference, _ = finished
        out = tmp_path / "out"
        shutil.copytree(reference, out)
        run = out / "runs" / "4x-seed1"
        kept = (run / spec.FINAL_FILE).read_bytes()
        (run / spec.ITEMS_FILE).unlink()
        result = experiment.main(["--grid", str(grid), "--out", str(out)])
        assert result["trained"] == [] and result["evaluated"] == ["4x-seed1"]
        assert (run / spec.FINAL_FILE).read_bytes() == kept
        metrics = json.loads(kept)["metrics"]
        items = read_items(run / spec.ITEMS_FILE)
        assert items["text_to_image_R@10"].value == pytest.approx(metrics["text_to_image_R@10"])
        assert items["image_to_text_R@10"].value == pytest.approx(metrics["image_to_text_R@10"])
        record = json.loads(kept)
        record["metrics"]["val_loss"] += 0.5  # a final.json that its checkpoint does not give
        (run / spec.FINAL_FILE).write_text(json.dumps(record))
        (run / spec.ITEMS_FILE).unlink()
        with pytest.raises(RunFailed, match="4x-seed1.*val_loss.*no per-item scores kept"):
            experiment.main(["--grid", str(grid), "--out", str(out)])
        assert not (run / spec.ITEMS_FILE).exists()

    def test_a_run_folder_with_other_flags_is_refused(self, finished, tmp_path):
        grid, out, _ = finished
        changed = write_grid(tmp_path, GRID.replace("warmup = 1", "warmup = 2"))
        with pytest.raises(ValueError, match="warmup=1.*grid now gives 2"):
            experiment.main(["--grid", str(changed), "--out", str(out)])


@pytest.mark.parametrize(("edit", "message"), [
    (("compression = 4", "compresion = 4"), r"\[arms.4x\]: unknown flag 'compresion'.*did you mean 'compression'"),
    (("warmup = 1", "warmup = 1\nseed = 3"), "'seed' is set by the driver"),
    (("warmup = 1", "warmup = 1\nsave_most_recent = false"), "'save_most_recent' is set by the driver .*epoch_latest"),
    (("batch_size = 16", 'batch_size = "many"'), "--batch-size: invalid int value"),
    (('model = "ViT-Ti-8-64"', 'model = "ViT-Nope"'), "got 'ViT-Nope'"),
    (('reference = "1x"', 'reference = "2x"'), "reference '2x' is not an arm"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "distinct integers"),
    (("compression = 4", "compression = 4\nseeds = []"), r"\[arms.4x\] seeds must be a list"),
    (("[shared]", "epoch = 3\n[shared]"), "unknown key 'epoch'"),
    (("bootstrap = 20", 'bootstrap = 20\ncheckpoint = "x.pt"'), r"\[final\] 'checkpoint' is set by the driver"),
    (("bootstrap = 20", "bootstrap = 20\nbootstrapp = 3"), "unknown flag 'bootstrapp'.*did you mean 'bootstrap'"),
    (("bootstrap = 20", 'bootstrap = "many"'), r"\[final\]: argument --bootstrap: invalid int value"),
    (("steps = 2", "steps = 0"), r"\[timing\] steps must be an integer >= 1"),
    (("steps = 2", "step = 2"), r"\[timing\] unknown key 'step'.*did you mean 'steps'"),
    (('[["4x", "1x"]]', '[["4x", "2x"]]'), r"contrasts: '2x' is not an arm"),
    (('[["4x", "1x"]]', '[["4x", "4x"]]'), "compares an arm with itself"),
    (('[["4x", "1x"]]', '["4x", "1x"]'), "is not a pair of arm names"),
    (('overlays = ["4x"]', 'overlays = ["1x"]'), r"\[alignment\] overlays: arm '1x' pools no tokens"),
    (("draws = 3", "draw = 3"), r"\[alignment\] unknown key 'draw'.*did you mean 'draws'"),
    (("draws = 3", "draws = 0"), r"\[alignment\] draws must be an integer >= 1"),
    (("[timing]", '[protocol]\nprimary_metrc = "final_mean_R@10"\n[timing]'),
     r"\[protocol\] unknown key 'primary_metrc'.*did you mean 'primary_metric'"),
    (("[timing]", '[protocol]\nprimary_metric = "final_mean_R@100"\nfamily = [["4x", "1x"]]\n[timing]'),
     r"\[protocol\] metric 'final_mean_R@100' is not a test metric.*did you mean 'final_mean_R@10'"),
    (("[timing]", '[protocol]\nprimary_metric = "final_val_loss"\nfamily = [["best", "1x"]]\n[timing]'),
     r"\[protocol\] family names 'best': give best_of and choose_on"),
    (("[timing]", '[protocol]\nprimary_metric = "final_val_loss"\nfamily = [["best", "1x"]]\nbest_of = ["4x"]\n'
                  'choose_on = "final_val_loss"\n[timing]'),
     r"\[protocol\] choose_on must be a validation metric.*did you mean 'val_loss'"),
    (("[timing]", '[protocol]\nprimary_metric = "final_val_loss"\nfamily = [["4x", "2x"]]\n[timing]'),
     r"\[protocol\] family: contrasts: '2x' is not an arm"),
    (("[timing]", '[protocol]\nprimary_metric = "final_val_loss"\nfamily = [["4x", "1x"]]\nalpha = 1\n[timing]'),
     r"\[protocol\] alpha must be a number in \(0, 0.5\)"),
    (("[timing]", '[protocol]\nprimary_metric = "final_val_loss"\nfamily = [["4x", "1x"]]\ncorrection = "bh"\n'
                  '[timing]'), r"\[protocol\] correction must be \"holm\""),
])
def test_bad_grids_fail_before_any_training(tmp_path, edit, message):
    grid = write_grid(tmp_path, GRID.replace(*edit))
    with pytest.raises(ValueError, match=message):
        experiment.main(["--grid", str(grid), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("split", ["val", "test"], ids=["training-data", "final-data"])
def test_missing_data_is_one_line_before_any_run(tmp_path, split):
    """`python -m dtplib.experiment` as the interpreter runs it (runpy, in this process: tests/one_process.py)."""
    grid = write_grid(tmp_path, GRID.replace(str(SAMPLE / split), str(tmp_path / "nowhere")))
    result = run_module("dtplib.experiment", ["--grid", str(grid), "--out", str(tmp_path / "out")])
    assert result["returncode"] == 2
    assert result["stderr"].strip().splitlines()[-1].startswith("python -m dtplib.experiment: error: ")
    assert "nowhere" in result["stderr"].strip().splitlines()[-1]
    assert not list((tmp_path / "out").glob("runs/*/steps.csv"))


def test_json_grids_and_the_smallrun_grid_load(tmp_path):
    from_json = spec.load_grid(write_grid(tmp_path, json.dumps(tomllib.loads(GRID)), "grid.json"))
    from_toml = spec.load_grid(write_grid(tmp_path, GRID))
    assert (from_json.seeds, from_json.shared, from_json.arms) == (from_toml.seeds, from_toml.shared, from_toml.arms)
    small = spec.load_grid("experiments/smallrun.toml")
    assert small.runs() == [("1x", 0), ("4x", 0), ("1x", 1), ("4x", 1)] and small.reference == "1x"
    config = spec.parse_options(small.options("4x", 1), "4x")
    assert (config.model, config.dtp.compression, config.epochs, config.batch_size, config.seed) == (
        "ViT-Ti-8-64", 4.0, 6, 128, 1)
    assert config.zeroshot_frequency == config.val_frequency == 1
    towers = spec.load_grid("experiments/ti_towers.toml")  # every grid the README names loads
    assert towers.runs() == [("2x", 0), ("4x", 0), ("10x", 0)]
    arm_seeds = spec.load_grid(write_grid(tmp_path, GRID.replace("compression = 4",
                                                                       "compression = 4\nseeds = [2, 0]")))
    assert arm_seeds.runs() == [("1x", 0), ("4x", 0), ("1x", 1), ("4x", 2)]  # an arm's own seeds
    assert arm_seeds.runs(seeds=[2]) == [("4x", 2)] and "seeds" not in arm_seeds.arms["4x"]
    comparison = spec.load_grid("experiments/flickr8k_ti.toml")
    runs = comparison.runs()
    assert len(runs) == 27 and runs.count(("1x", 2)) == 1 and ("flip-75", 2) not in runs
    assert ("topk-4x", 2) in runs and ("learned-4x", 2) not in runs  # the best learned mode has the third seed
    assert comparison.alignment["arms"] == ["learned-4x", "learned-4x-image-prior", "topk-4x", "learned-4x-hilbert",
                                            "learned-10x"]  # the learned arms, found from their flags
    assert ("learned-4x", "uniform-4x") in comparison.contrasts
    v2 = spec.load_grid("experiments/flickr8k_ti_v2.toml")  # reuses the first grid's runs: same names, same flags
    assert all(v2.arms[arm] == comparison.arms[arm] for arm in comparison.arms)
    assert (v2.shared, v2.final, v2.data) == (comparison.shared, comparison.final, comparison.data)
    assert set(runs) < set(v2.runs()) and len(v2.runs()) == 80  # 53 new: 49 at 10 epochs, 4 at 20
    assert v2.protocol["family"][0] == ("best", "uniform-4x") and len(v2.protocol["family"]) == 9
    assert v2.protocol["primary_metric"] == "final_mean_R@10" and comparison.protocol is None
    lowres = spec.parse_options(v2.finish_options("lowres-4x", 0), "lowres-4x")
    assert (lowres.epochs, lowres.force_image_size, spec.stage_epochs(v2, "lowres-4x")) == (1, 64, (9, 1))
    named = spec.load_grid(write_grid(tmp_path, GRID.replace("compression = 4", 'model = "DTP-ViT-Ti-8-64-4x"'),
                                            "named.toml"))  # a DTP-ViT-* name pools without --compression
    assert named.alignment["arms"] == ["4x"] and spec.pooling_arms(named) == {"4x": True}
    config = spec.parse_options(comparison.options("pool-2x2", 2), "pool-2x2")
    assert (config.dtp.forced_boundaries, config.dtp.patch_order, config.dtp.execution) == (4, "hilbert", "packed")
    b32 = experiment.main(["--grid", "experiments/b32_laion.toml", "--out", str(tmp_path / "b32"), "--dry-run",
                           "--seeds", "1"])["commands"]  # nothing checked against the data, nothing written
    assert len(b32) == 4 and not (tmp_path / "b32").exists()
    assert all(c.startswith("torchrun --standalone --nproc_per_node=8 -m dtplib.train -- --model ViT-B-32 ")
               and c.endswith("-seed1 --resume latest") for c in b32)
    assert "--forced-boundaries 4" in b32[2] and "--force-patch-dropout 0.5" in b32[3]
    small = experiment.main(["--grid", "experiments/smallrun.toml", "--out", str(tmp_path / "s"), "--dry-run"])
    assert f"--zeroshot-data {data_path('$DTPLIB_DATA/cifar10-test')} " in small["commands"][0]
    pilot = spec.load_grid("experiments/flickr8k_pilot.toml")
    assert pilot.runs() == [("lr5e-4", 0), ("lr1e-3", 0)]
    upsampling = spec.load_grid("experiments/upsampling.toml")
    config = spec.parse_options(upsampling.options("normalised", 1), "normalised")
    assert (config.model, config.dtp.upsample_weights, upsampling.reference) == (
        "DTP-ViT-Ti-8-64-4x-up", "normalised", "straight-through")


def test_equal_cost_reads_both_curves_where_both_spent_the_same():
    """value_at interpolates a run's per-epoch metric along a cost axis; contrast_table pairs seeds and reads both
    runs at the smaller final cost."""
    curve = pd.DataFrame({"train_time_s": [10.0, 20.0, 30.0], "acc": [0.1, 0.3, float("nan")]})
    assert grid_contrasts.value_at(curve, "train_time_s", "acc", 15.0) == pytest.approx(0.2)
    assert math.isnan(grid_contrasts.value_at(curve, "train_time_s", "acc", 5.0))  # before the first evaluation
    assert math.isnan(grid_contrasts.value_at(curve, "train_time_s", "acc", 25.0))  # past the last one with a value
    rows = []
    for arm, seconds, acc in (("fast", 5.0, [0.2, 0.4]), ("slow", 10.0, [0.1, 0.5])):
        for seed in (0, 1):
            for epoch in (0, 1):
                rows.append({"arm": arm, "seed": seed, "epoch": epoch, "complete": True,
                             "train_time_s": seconds * (epoch + 1), "acc": acc[epoch] + seed / 10})
    grid = spec.Grid(Path("g.toml"), [0, 1], {}, {"fast": {}, "slow": {}}, metrics=["acc"],
                           figure_metrics=["acc"], contrasts=[("fast", "slow")])
    table = grid_contrasts.contrast_table(grid, pd.DataFrame(rows)).set_index("at")
    assert table.loc["last epoch", "difference"] == pytest.approx(-0.1)  # 0.4 - 0.5 on both seeds
    assert table.loc["last epoch", "pairs"] == 2 and table.loc["last epoch", "degenerate"]
    assert not table.loc["last epoch", "excludes_zero"]  # two seeds with the same difference: a zero-width interval
    # at 10 s the fast run has finished (0.4) and the slow one has done its first epoch (0.1): +0.3 on both seeds
    equal = table.loc["equal train_time_s"]
    assert equal["cost"] == 10 and equal["difference"] == pytest.approx(0.3) and equal["degenerate"]


def test_a_new_evaluation_agrees_with_final_json_to_rounding_and_a_refitted_probe_loses_its_items():
    kept = {"image_to_text_R@10": 0.092, "val_loss": 3.666612148284912, "probe_top1": 0.36, "probe_top1_ci_low": 0.35,
            "retrieval_images": 1000}
    same = {**kept, "val_loss": 3.6666122}  # float sums of another CPU
    assert compare_finals(kept, same) == ([], [])
    refit = {**same, "probe_top1": 0.361, "probe_top1_ci_low": 0.3503}  # L-BFGS on another CPU: 9 of 9,000 images
    assert compare_finals(kept, refit) == ([], ["probe_top1", "probe_top5"])
    other = {**refit, "image_to_text_R@10": 0.091}  # one image more or less: another model
    assert compare_finals(kept, other) == (["image_to_text_R@10"], ["probe_top1", "probe_top5"])


def protocol_grid(protocol: bool = True) -> spec.Grid:
    """Arms a1 and a2 (the best_of), u and x, seeds 0-2; the family: the best of a1, a2 against u and against x."""
    table = {**spec.PROTOCOL_KEYS, "primary_metric": "final_mean_R@10", "secondary_metrics": ["final_val_loss"],
             "family": [("best", "u"), ("best", "x")], "best_of": ["a1", "a2"], "choose_on": "mean_R@10",
             "equivalence_margin": 0.05, "bootstrap": 300}
    return spec.Grid(Path("g.toml"), [0, 1, 2], {}, {arm: {} for arm in ("a1", "a2", "u", "x")},
                     metrics=["final_mean_R@10", "final_val_loss"], figure_metrics=["mean_R@10"],
                     contrasts=[("x", "u"), ("a2", "u")], protocol=table if protocol else None)


def hand_made_runs(out: Path) -> pd.DataFrame:
    """One epoch per run; per-item scores of 40 test images (i2t hits, t2i shares with 1-5 captions) in each run
    folder, and the final columns computed from them; validation mean_R@10 makes a2 the best mode."""
    rng, rows = np.random.default_rng(0), []
    captions = rng.integers(1, 6, 40).astype(float)
    rates = {"a1": 0.3, "a2": 0.5, "u": 0.2, "x": 0.45}
    for seed in (0, 1, 2):
        for arm, rate in rates.items():
            hits = (rng.random(40) < rate).astype(float)
            shares = np.minimum(1.0, hits * rng.random(40) + rate / 2)
            write_items(out / "runs" / f"{arm}-seed{seed}" / spec.ITEMS_FILE,
                        {"image_to_text_R@10": ItemScores(hits), "text_to_image_R@10": ItemScores(shares, captions)})
            i2t, t2i = hits.mean(), (shares * captions).sum() / captions.sum()
            rows.append({"arm": arm, "seed": seed, "epoch": 0, "complete": True, "train_time_s": 10.0,
                         "hardware": "cpu A", "mean_R@10": rate + seed / 100, "final_image_to_text_R@10": i2t,
                         "final_text_to_image_R@10": t2i, "final_mean_R@10": (i2t + t2i) / 2,
                         "final_val_loss": 3.0 + rate + (0.02 if arm == "u" else 0.01) * seed})
    return pd.DataFrame(rows)


def test_the_protocol_primary_family_holm_tost_and_the_bootstrap_over_items(tmp_path):
    (tmp_path / "runs").mkdir()
    runs, grid = hand_made_runs(tmp_path), protocol_grid()
    assert grid_contrasts.choose_best(grid, runs)[0] == "a2"  # the higher validation mean_R@10
    table = grid_contrasts.contrast_table(grid, runs, tmp_path)
    last = table[table["at"] == "last epoch"].set_index(["contrast", "metric"])
    primary = table[table["family"] == "primary"]
    assert list(primary["contrast"]) == ["a2 − u", "a2 − x"] and set(primary["metric"]) == {"final_mean_R@10"}
    assert primary["p_holm"].to_numpy() == pytest.approx(stats.holm(primary["p_value"].to_numpy()))
    assert table.loc[table["family"] != "primary", "p_holm"].isna().all()
    assert last.loc[("a2 − u", "final_val_loss"), "family"] == "secondary"
    assert last.loc[("x − u", "final_mean_R@10"), "family"] == "exploratory"  # not in the family
    by_seed = runs.set_index(["arm", "seed"])
    for _, row in primary.iterrows():
        differences = [by_seed.at[(row["arm"], s), "final_mean_R@10"] - by_seed.at[(row["against"], s),
                                                                                   "final_mean_R@10"] for s in range(3)]
        assert row["p_value"] == pytest.approx(stats.paired_t_pvalue(differences))
        tost_p, equivalent = stats.tost(differences, 0.05)
        assert row["tost_p"] == pytest.approx(tost_p) and row["equivalent"] == equivalent
        # the bootstrap over seed pairs and test items, from the runs' per-item files
        scored = {arm: [read_items(tmp_path / "runs" / f"{arm}-seed{s}" / spec.ITEMS_FILE) for s in range(3)]
                  for arm in (row["arm"], row["against"])}
        parts = ("image_to_text_R@10", "text_to_image_R@10")
        a, b = (np.stack([np.stack([r[p].scores for r in scored[arm]]) for p in parts])
                for arm in (row["arm"], row["against"]))
        weights = np.stack([np.ones(40), scored[row["arm"]][0]["text_to_image_R@10"].weights])
        interval = stats.hierarchical_paired_ci(a, b, weights, resamples=300)
        assert (row["hb_low"], row["hb_high"], row["hb_pairs"]) == pytest.approx((interval.low, interval.high, 3))
        assert interval.value == pytest.approx(row["difference"])
    flat = last.loc[("a2 − x", "final_val_loss")]  # x's loss is a2's less 0.05 on every seed
    assert flat["degenerate"] and not flat["excludes_zero"] and math.isnan(flat["p_value"])
    summary = grid_contrasts.contrast_lines(grid, table, runs)
    text = "\n".join(summary)
    assert text.index("## Primary (decided before the runs)") < text.index("## Exploratory")
    assert "**a2**, chosen on the validation split only" in text
    assert "| 0.05 [0.05, 0.05] ° |" in text  # the degenerate interval: marked, never starred
    plain = grid_contrasts.contrast_table(protocol_grid(protocol=False), runs, tmp_path)  # everything exploratory
    assert set(plain["family"]) == {"exploratory"} and plain["p_holm"].isna().all()
    assert "## Primary" not in "\n".join(grid_contrasts.contrast_lines(protocol_grid(False), plain, runs))


def test_equal_time_reads_the_cost_model_and_refuses_wall_time_across_machines(tmp_path):
    rows = []
    for stage, samples, gmacs in (("main", 100, 1.0), ("main", 200, 1.0), ("finish", 250, 3.0)):
        rows.append({"arm": "a", "seed": 0, "stage": stage, "samples_seen": samples, "gmacs_per_image": gmacs,
                     "text_gmacs": 1.0})
    pd.DataFrame({"arm": ["a"], "median_s": [0.5], "batch_size": [10]}).to_csv(tmp_path / spec.TIMING_FILE)
    timed = grid_contrasts.add_model_time(pd.DataFrame(rows), tmp_path)
    # 0.05 s per sample; the finish's 50 samples at twice the main run's GMACs per pair (4 against 2)
    assert timed["model_time_s"].tolist() == pytest.approx([5.0, 10.0, 10.0 + 50 * 0.05 * 2])
    (tmp_path / "h" / "runs").mkdir(parents=True)
    runs = hand_made_runs(tmp_path / "h")
    runs.loc[(runs["arm"] == "x") & (runs["seed"] == 1), "hardware"] = "cpu B"
    with pytest.raises(ValueError, match="a2 − x at equal training time: seed 1's runs were trained on different "
                                         "hardware.*no \\[timing\\] cost model"):
        grid_contrasts.contrast_table(protocol_grid(), runs)
    with_timing = protocol_grid()
    with_timing.timing = dict(spec.TIMING_KEYS)  # a cost model: no refusal; its rows wait for step_times.csv
    table = grid_contrasts.contrast_table(with_timing, runs)
    assert (table.loc[table["at"] == "equal model_time_s", "pairs"] == 0).all()


def test_t_interval():
    mean, low, high, n = stats.t_interval([1.0, 3.0])
    assert (mean, n) == (2.0, 2) and high - mean == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2), abs=1e-3)
    assert math.isnan(stats.t_interval([5.0])[1])
    assert stats.t_quantile(40) == pytest.approx(2.0211, abs=1e-3)


@pytest.mark.slow
def test_a_grid_trains_each_run_under_torchrun(tmp_path):
    """nproc_per_node = 2: each run is a torchrun of 2 gloo processes; runs.csv counts both ranks' samples."""
    grid = write_grid(tmp_path, f"""
nproc_per_node = 2
seeds = [0]
[shared]
model = "ViT-Ti-8-64"
train_data = "{SAMPLE / 'train'}"
train_num_samples = 32
epochs = 1
batch_size = 8
warmup = 1
workers = 0
threads = 1
report_to = "none"
[arms.4x]
compression = 4
""")
    result = experiment.main(["--grid", str(grid), "--out", str(tmp_path / "out")])
    assert result["trained"] == ["4x-seed0"]
    params = json.loads((tmp_path / "out" / "runs" / "4x-seed0" / "params.json").read_text())
    assert params["world_size"] == 2
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs["complete"].all() and runs["samples_seen"].tolist() == [32]  # 2 steps of 8 on each of 2 ranks
    with pytest.raises(ValueError, match="nproc_per_node must be an integer >= 1"):
        spec.load_grid(write_grid(tmp_path, GRID.replace('reference = "1x"',
                                                               'reference = "1x"\nnproc_per_node = 0')))


@pytest.mark.slow
def test_a_fresh_clone_prepares_the_shards_its_final_evaluation_reads(tmp_path):
    """[final] on the test split that [data.from_captions] writes: on a fresh clone those shards do not exist yet,
    so the driver prepares them before it checks or reads them (48 Flickr8k photos, one run of one epoch)."""
    flickr = data_path("$DTPLIB_DATA/flickr8k")
    shards = tmp_path / "shards"
    grid = write_grid(tmp_path, f"""
seeds = [0]
[data.from_captions]
images = "{flickr / 'images'}"
captions = "{flickr / 'captions.tsv'}"
out = "{shards}"
image_size = 64
val_size = 8
test_size = 8
limit = 48
[shared]
model = "ViT-Ti-8-64"
train_data = "{shards / 'train'}"
{TINY_RUN}[final]
val_data = "{shards / 'test'}"
[arms.4x]
compression = 4
""")
    result = experiment.main(["--grid", str(grid), "--out", str(tmp_path / "out")])
    assert result["trained"] == result["evaluated"] == ["4x-seed0"]
    final = json.loads((tmp_path / "out" / "runs" / "4x-seed0" / "final.json").read_text())
    assert final["metrics"]["retrieval_images"] == 8


README_ARMS = {"`1x`": "1x", "learned 4x, batch prior": "learned-4x",
               "learned 4x, image prior": "learned-4x-image-prior", "learned 4x, `topk`": "topk-4x",
               "learned 4x, `topk`, Hilbert": "learned-4x-hilbert",
               "uniform 4x": "uniform-4x", "2x2 pooling": "pool-2x2", "FLIP 50%": "flip-50", "FLIP 75%": "flip-75",
               "learned 10x": "learned-10x", "uniform 10x": "uniform-10x"}


def test_the_readme_comparison_table_is_the_committed_results():
    """The README's all-arms table of "Does learning the boundaries help?" says what results/flickr8k_ti/runs.csv
    says: seeds, test t2i R@10 and CIFAR-10 zero-shot (in %) and test loss, each the mean over the arm's runs."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Does learning the boundaries help?"):readme.index("## Efficiency\n")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| arm ", "| --- "))]
    runs = pd.read_csv(REPO_ROOT / "results/flickr8k_ti/runs.csv").dropna(subset=["final_val_loss"])
    assert sorted(README_ARMS[row[0]] for row in rows) == sorted(runs["arm"].unique())
    for name, seeds, recall, _, zeroshot, _, loss, *_ in rows:
        arm = runs[runs["arm"] == README_ARMS[name]]
        assert int(seeds) == len(arm), name
        assert float(recall.split()[0]) == pytest.approx(100 * arm["final_text_to_image_R@10"].mean(), abs=0.005), name
        assert float(zeroshot.split()[0]) == pytest.approx(100 * arm["final_zeroshot_top1"].mean(), abs=0.05), name
        assert float(loss.split()[0]) == pytest.approx(arm["final_val_loss"].mean(), abs=0.0005), name
