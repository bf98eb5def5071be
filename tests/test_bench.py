"""The benchmark on CPU: the Ti family with its peers, real Flickr8k photos and captions, a well-formed CSV."""

import pandas as pd
import pytest
import torch

from dtplib import bench as bench_cmd
from dtplib.common.paths import repo_path
from dtplib.figures import compare
from dtplib.measure import bench, tables
from dtplib.measure.specs import parse_spec
from dtplib.tower.control import get_tower

COLUMNS = {"model", "mode", "execution", "boundaries", "median_s", "p10_s", "p90_s", "images_per_s", "peak_memory_mb",
           "realised_compression", "forward_gmacs", "speedup", "analytic_bound", "padded_bound", "efficiency",
           "reference", "hardware", "dtype", "batch_size", "torch", "commit", "adamw", "compiled", "compile_s"}


@pytest.mark.slow
def test_bench_ti_family_writes_a_well_formed_csv(tmp_path):
    models = ("ViT-Ti-8-64,DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-4x,DTP-ViT-Ti-8-64-4x+packed,DTP-ViT-Ti-8-64-4x+padded,"
              "DTP-ViT-Ti-8-64-4x+uniform,DTP-ViT-Ti-8-64-4x+topk,DTP-ViT-Ti-8-64-4x+batch-topk,ViT-Ti-8-64+pd0.5")
    # memory: the next test
    frame = bench_cmd.main(["--models", models, "--batch-size", "8", "--steps", "3", "--warmup", "1",
                            "--prior-steps", "20", "--threads", "1", "--no-memory", "--out", str(tmp_path / "eff")])
    written = pd.read_csv(tmp_path / "eff.csv", keep_default_na=False, na_values=[""])
    assert COLUMNS <= set(written.columns)
    assert len(written) == 18 and list(written["mode"]) == ["clip"] * 9 + ["image"] * 9
    assert list(written["model"][:9]) == models.split(",")
    assert not written["compiled"].any() and written["compile_s"].isna().all()  # eager
    assert (written["median_s"] > 0).all() and (written["p10_s"] <= written["p90_s"]).all()
    assert written["peak_memory_mb"].isna().all() and (written["batch_size"] == 8).all()
    assert (written["adamw"] == "fused").all()  # training's default kernel, in every row
    assert (written["reference"] == "DTP-ViT-Ti-8-64-1x").all()  # the same-code 1x, not the first row
    reference = written[written["model"] == "DTP-ViT-Ti-8-64-1x"]
    assert (reference["speedup"] == 1).all() and (reference["analytic_bound"] == 1).all()
    rows = written.set_index(["mode", "model"])
    for mode in ("clip", "image"):
        learned, padded = rows.loc[(mode, "DTP-ViT-Ti-8-64-4x")], rows.loc[(mode, "DTP-ViT-Ti-8-64-4x+padded")]
        assert learned["execution"] == "static" and padded["execution"] == "padded"  # static: the default
        assert rows.loc[(mode, "DTP-ViT-Ti-8-64-4x+packed"), "execution"] == "packed"
        assert learned["boundaries"] == padded["boundaries"] == "learned"
        assert learned["boundary_source"] == padded["boundary_source"] == "prior-only fit, 20 steps"
        assert rows.loc[(mode, "DTP-ViT-Ti-8-64-4x+batch-topk"), "boundaries"] == "batch-topk"
        assert padded["padded_bound"] <= padded["analytic_bound"]  # padding can only cost more
        assert padded["efficiency"] == pytest.approx(padded["speedup"] / padded["padded_bound"])
        assert learned["efficiency"] == pytest.approx(learned["speedup"] / learned["analytic_bound"])
        for name in ("DTP-ViT-Ti-8-64-4x+uniform", "DTP-ViT-Ti-8-64-4x+topk"):  # 16 segments in every image
            assert rows.loc[(mode, name), "realised_compression"] == 4
            assert rows.loc[(mode, name), "segments_std"] == 0
    image, clip = rows.loc["image"], rows.loc["clip"]
    # the text tower does not shrink, so the whole step's bound is below the image tower's
    assert 1 < clip.loc["DTP-ViT-Ti-8-64-4x+uniform", "analytic_bound"] < image.loc["DTP-ViT-Ti-8-64-4x+uniform",
                                                                                     "analytic_bound"]
    assert image.loc["ViT-Ti-8-64+pd0.5", "analytic_bound"] == pytest.approx(2, rel=0.1)  # half the patches
    assert image.loc["ViT-Ti-8-64+pd0.5", "realised_compression"] == 2
    text = (tmp_path / "eff.md").read_text()
    assert "| clip | DTP-ViT-Ti-8-64-4x+padded | learned (prior fit) |" in text and "AdamW fused." in text
    assert (tmp_path / "eff.png").stat().st_size > 0
    assert len(frame) == 18


@pytest.mark.slow
def test_learned_boundaries_come_from_a_trained_checkpoint(tmp_path):
    """--checkpoint-dir finds a training run by its params.json; timing and memory use the checkpoint's weights."""
    model, _ = bench.build_spec_model(parse_spec("DTP-ViT-Ti-8-64-4x"), None)
    with torch.no_grad():
        model.visual.trunk.predictor.fc2.bias.fill_(-50.0)  # every logit far below 0: one segment per image
    run = tmp_path / "runs" / "ti4x"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, run / "checkpoints" / "epoch_latest.pt")
    (run / "params.json").write_text('{"model": "ViT-Ti-8-64", "compression": 4.0, "upsample": false}')
    assert bench.find_checkpoints(tmp_path / "runs") == {"DTP-ViT-Ti-8-64-4x": run / "checkpoints" / "epoch_latest.pt"}
    frame = bench_cmd.main(["--models", "DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-4x", "--batch-size", "4", "--steps", "1",
                        "--warmup", "0", "--threads", "1", "--modes", "image", "--checkpoint-dir",
                        str(tmp_path / "runs"), "--out", str(tmp_path / "eff"), "--adamw-impl", "torch"])
    row = frame.set_index("model").loc["DTP-ViT-Ti-8-64-4x"]
    assert (frame["adamw"] == "torch").all()  # --adamw-impl is every row's, the memory probes' included
    assert row["boundary_source"].startswith("checkpoint") and row["realised_compression"] == 64
    assert row["peak_memory_mb"] > 0 and frame.set_index("model").loc["DTP-ViT-Ti-8-64-1x", "peak_memory_mb"] > 0


def test_every_row_of_one_model_name_has_the_same_weights():
    fitted = {}
    static, padded, topk, batch_topk = (
        bench.make_subject(parse_spec(label), 2, torch.device("cpu"), 2, fitted=fitted)
        for label in ("DTP-ViT-Ti-8-64-4x", "DTP-ViT-Ti-8-64-4x+padded", "DTP-ViT-Ti-8-64-4x+topk",
                      "DTP-ViT-Ti-8-64-4x+batch-topk"))
    assert list(fitted) == ["DTP-ViT-Ti-8-64-4x"]  # one prior fit for the four rows
    for other in (padded, topk, batch_topk):
        torch.testing.assert_close(static.model.state_dict(), other.model.state_dict(), rtol=0, atol=0)
    assert get_tower(static.model).dtp.execution == "static" and get_tower(padded.model).dtp.execution == "padded"
    assert [get_tower(s.model).dtp.boundaries for s in (static, topk, batch_topk)] == ["threshold", "topk",
                                                                                       "batch-topk"]


def test_labels_name_the_execution_unless_it_is_static():
    """A label parses back to its spec; static, the default, has no modifier, so an old CSV's label still parses."""
    for label, execution, boundaries in (("DTP-ViT-Ti-8-64-4x", "static", "learned"),
                                         ("DTP-ViT-Ti-8-64-4x+packed", "packed", "learned"),
                                         ("DTP-ViT-Ti-8-64-4x+padded+topk", "padded", "topk"),
                                         ("DTP-ViT-Ti-8-64-4x+batch-topk", "static", "batch-topk"),
                                         ("DTP-ViT-Ti-8-64-4x+packed+uniform", "packed", "uniform")):
        spec = parse_spec(label)
        assert (spec.execution, spec.boundaries, spec.label) == (execution, boundaries, label)
    assert parse_spec("DTP-ViT-Ti-8-64-4x+static").label == "DTP-ViT-Ti-8-64-4x"
    assert parse_spec("DTP-ViT-Ti-8-64-4x", execution="packed").label == "DTP-ViT-Ti-8-64-4x+packed"
    assert parse_spec("ViT-Ti-8-64+pd0.5").execution == ""  # no tower that pools: no execution


REDUCTIONS = ("tome", "evit", "tokenlearner", "kmeans", "prune")


@pytest.mark.parametrize("method", REDUCTIONS)
def test_a_reduction_label_parses_back_to_its_spec(method):
    """`NAME+METHOD`: a DTP tower with that reduction, no execution and no boundaries; the label round-trips, what a
    run trained with `--reduction METHOD` gives the same label (the models are built by the tests below)."""
    from dtplib.measure.specs import trained_label
    from dtplib.training.config import TrainConfig

    label = f"DTP-ViT-Ti-8-64-4x+{method}"
    spec = parse_spec(label, execution="padded")  # the default execution is for boundaries only
    assert (spec.name, spec.reduction, spec.execution, spec.boundaries) == ("DTP-ViT-Ti-8-64-4x", method, "", "")
    assert spec.pools and spec.label == label and parse_spec(spec.label) == spec and spec.trained == spec
    config = TrainConfig.from_options(model="ViT-Ti-8-64", compression=4, reduction=method, train_data="x")
    assert trained_label(config) == label


def test_a_reduction_run_is_found_by_its_label(tmp_path):
    """--checkpoint-dir: a run trained with a reduction is that reduction's row, never the learned tower's."""
    for run, flags in (("a-tome", ', "reduction": "tome"'), ("b-learned", "")):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "epoch_latest.pt").write_bytes(b"x")
        (tmp_path / run / "params.json").write_text(
            f'{{"model": "ViT-Ti-8-64", "compression": 4.0{flags}}}')
    assert bench.find_checkpoints(tmp_path) == {
        "DTP-ViT-Ti-8-64-4x+tome": tmp_path / "a-tome" / "checkpoints" / "epoch_latest.pt",
        "DTP-ViT-Ti-8-64-4x": tmp_path / "b-learned" / "checkpoints" / "epoch_latest.pt"}


def test_reductions_are_timed_interleaved_beside_uniform_pooling(tmp_path):
    """Uniform pooling and two reductions at Ti 4x, one warm-up and one timed step of the whole CLIP step: a row
    each with the budget's compression, the method's forward GMACs (within 3% of uniform's, the issue's budget),
    the ratios over uniform, and the method named in the CSV, the markdown and the figure's legend."""
    models = "DTP-ViT-Ti-8-64-4x+uniform,DTP-ViT-Ti-8-64-4x+tome,DTP-ViT-Ti-8-64-4x+kmeans"
    frame = bench_cmd.main(["--models", models, "--batch-size", "4", "--steps", "1", "--warmup", "1", "--modes",
                            "clip", "--prior-steps", "1", "--threads", "1", "--no-memory", "--reference",
                            "DTP-ViT-Ti-8-64-4x+uniform", "--out", str(tmp_path / "eff")])
    written = pd.read_csv(tmp_path / "eff.csv", keep_default_na=False, na_values=[""])
    assert list(written["model"]) == models.split(",") and (written["steps"] == 1).all()
    assert list(written["reduction"].fillna("")) == ["", "tome", "kmeans"]
    assert list(written["boundaries"].fillna("")) == ["uniform", "", ""]
    assert list(written["boundary_source"].fillna("")[1:]) == ["seeded init"] * 2
    assert (written["realised_compression"] == 4).all() and (written["segments_std"] == 0).all()
    uniform = written.iloc[0]
    assert uniform["speedup"] == 1 and (written["reference"] == "DTP-ViT-Ti-8-64-4x+uniform").all()
    assert written["forward_gmacs"].to_numpy() == pytest.approx(uniform["forward_gmacs"], rel=0.03)
    assert written["speedup"].to_numpy() == pytest.approx((uniform["median_s"] / written["median_s"]).to_numpy())
    text = (tmp_path / "eff.md").read_text()
    assert "| clip | DTP-ViT-Ti-8-64-4x+tome | tome (seeded init) |" in text and "MAC-matched schedule" in text
    assert (tmp_path / "eff.png").stat().st_size > 0
    figure = compare.speedup_plot([tmp_path / "eff.csv"])
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert {"uniform, static", "ToMe", "k-means grouping"} <= set(legend)
    assert len(frame) == 3


def test_the_efficiency_table_costs_a_reduction_row_by_its_own_tower(tmp_path):
    from dtplib.measure import flops
    from dtplib.measure.specs import create_spec_model

    row = {"mode": "clip", "execution": "", "realised_compression": 4.0, "peak_memory_mb": 1.0, "median_s": 1.0,
           "speedup": 1.0, "analytic_bound": 1.0, "hardware": "cpu", "batch_size": 8, "dtype": "fp32"}
    pd.DataFrame([{**row, "model": "DTP-ViT-Ti-8-64-4x+prune"}, {**row, "model": "DTP-ViT-Ti-8-64-4x+topk"}]
                 ).to_csv(tmp_path / "efficiency_test.csv", index=False)
    table = tables.efficiency_table([tmp_path], accuracy_runs=tmp_path / "none.csv").set_index("model")
    pruning = create_spec_model(parse_spec("DTP-ViT-Ti-8-64-4x+prune"))[0]
    assert get_tower(pruning).dtp.reduction == "prune"
    assert table.loc["DTP-ViT-Ti-8-64-4x+prune", "image GMACs"] == pytest.approx(
        float(flops.total(flops.analytic_macs(pruning))) / 1e9)  # its scorer counted: not the learned tower's
    assert table.loc["DTP-ViT-Ti-8-64-4x+prune", "image GMACs"] > table.loc["DTP-ViT-Ti-8-64-4x+topk", "image GMACs"]


def test_committed_results_read_back():
    """The efficiency CSVs in results/ (packed rows labelled without a modifier) parse and draw."""
    import matplotlib.pyplot as plt

    csvs = tables.efficiency_csvs([repo_path("results")])
    assert csvs
    for csv in csvs:
        for label in pd.read_csv(csv)["model"]:
            parse_spec(label)
    figures = compare.speedup_figures(csvs)  # one per machine: two CPUs and the H100
    assert len(figures) == 3 and all(figure.axes for figure in figures.values())
    for figure in figures.values():
        plt.close(figure)


@pytest.mark.slow
def test_compiled_rows_report_the_compile_time_apart(tmp_path):
    """--torchcompile: the same-code 1x, the learned tower (threshold with the capacity cap, the static path) and
    batch-topk, each one graph; the first step's wall time is compile_s, not in the step statistics."""
    models = "DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-4x,DTP-ViT-Ti-8-64-4x+batch-topk"
    frame = bench_cmd.main(["--models", models, "--torchcompile", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                        "--prior-steps", "10", "--modes", "clip", "--threads", "1", "--no-memory",
                        "--out", str(tmp_path / "eff")])
    written = pd.read_csv(tmp_path / "eff.csv")
    assert list(written["model"]) == models.split(",") and written["compiled"].all()
    assert (written["compile_s"] > 0).all() and (written["steps"] == 2).all()
    assert (written["compile_s"] > written["p90_s"]).all()  # compiling is not in the timed steps
    assert list(written["execution"].fillna("")) == ["", "static", "static"]
    rows = written.set_index("model")
    assert rows.loc["DTP-ViT-Ti-8-64-4x", "realised_compression"] > 1  # the counts are read after compiled steps
    assert rows.loc["DTP-ViT-Ti-8-64-4x+batch-topk", "realised_compression"] == pytest.approx(4, rel=0.1)
    text = (tmp_path / "eff.md").read_text()
    assert "compile (s)" in text and "compiled (torch.compile" in text
    assert len(frame) == 3


def test_a_trained_run_is_timed_with_the_adamw_kernel_it_trained_with(tmp_path):
    from dtplib.training.checkpoint import build_from_config
    from dtplib.training.config import TrainConfig

    config = TrainConfig.from_options(model="ViT-Ti-8-64", compression=4, train_data="x")
    state = build_from_config(config)[0].state_dict()
    older = {k: v for k, v in config.to_dict().items() if k != "adamw_impl"}  # from before --adamw-impl
    for name, args, impl in (("new.pt", config.to_dict(), "fused"), ("old.pt", older, "torch")):
        torch.save({"epoch": 1, "state_dict": state, "args": args}, tmp_path / name)
        subject = bench.trained_subject(name, tmp_path / name, 2, torch.device("cpu"))
        assert bench.adamw_impl_of(subject.optimizer) == impl
    forced = bench.trained_subject("old", tmp_path / "old.pt", 2, torch.device("cpu"), adamw_impl="fused")
    assert bench.adamw_impl_of(forced.optimizer) == "fused"


@pytest.mark.parametrize("spec, message", [("ViT-Nope-1", "unknown model"), ("ViT-Ti-8-64+pd1.5", "must be in"),
                                           ("DTP-ViT-Ti-8-64-1x+topk", "needs a DTP tower that pools"),
                                           ("DTP-ViT-Ti-8-64-4x+pd0.5", "towers that do not pool"),
                                           ("DTP-ViT-Ti-8-64-4x+fast", "expected NAME"),
                                           ("DTP-ViT-Ti-8-64-1x+tome", "needs a DTP tower that pools"),
                                           ("ViT-Ti-8-64+evit", "needs a DTP tower that pools"),
                                           ("DTP-ViT-Ti-8-64-4x-up+kmeans", "without upsampling"),
                                           ("DTP-ViT-Ti-8-64-4x+padded+prune", "takes no other modifier"),
                                           ("DTP-ViT-Ti-8-64-4x+tokenlearner+topk", "takes no other modifier"),
                                           ("DTP-ViT-Ti-8-64-4x+tome+evit", "takes no other modifier")])
def test_bad_model_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_bad_flags_fail_before_any_model_is_built(capsys):
    for argv, message in ((["--checkpoint", "DTP-ViT-Ti-8-64-4x"], "expected NAME=PATH"),
                          (["--checkpoint-dir", "/nonexistent/runs"], "no such folder"),
                          (["--models", "DTP-ViT-Ti-8-64-4x", "--reference", "ViT-B-32"], "is not one of")):
        with pytest.raises(SystemExit) as exit_info:
            bench_cmd.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_trained_runs_give_the_accuracy_of_the_rows_that_time_their_tower(tmp_path):
    """`dtplib.measure.specs.trained_label` names what a run trained in the benchmark's spec labels; the efficiency
    table takes zero-shot accuracy from an experiment's complete runs of that tower only (any execution)."""
    from dtplib.measure.specs import trained_label
    from dtplib.training.config import TrainConfig

    ti = {"model": "ViT-Ti-8-64", "train_data": "x"}
    options = {"DTP-ViT-Ti-8-64-1x": {"compression": 1},
               "DTP-ViT-Ti-8-64-4x": {"compression": 4, "execution": "padded"},
               "DTP-ViT-Ti-8-64-4x+uniform": {"forced_boundaries": 4},
               "DTP-ViT-Ti-8-64-4x+uniform+hilbert": {"forced_boundaries": 4, "patch_order": "hilbert"},
               "DTP-ViT-Ti-8-64-4x+topk": {"compression": 4, "boundaries": "topk"},
               "DTP-ViT-Ti-8-64-4x+batch-topk": {"compression": 4, "boundaries": "batch-topk"},
               "DTP-ViT-Ti-8-64-4x+image-prior": {"compression": 4, "prior_scope": "image"},
               "DTP-ViT-Ti-8-64-4x-up+normalised-up": {"compression": 4, "upsample": True,
                                                       "upsample_weights": "normalised"},
               "DTP-ViT-Ti-8-64-1x+pd0.5": {"compression": 1, "force_patch_dropout": 0.5},
               "ViT-Ti-8-64": {}}
    labels = {label: TrainConfig.from_options(**ti, **flags) for label, flags in options.items()}
    assert {trained_label(config): label for label, config in labels.items()} == {name: name for name in labels}

    runs = pd.DataFrame([  # two complete seeds of 4x, an unfinished one, a uniform run, a Hilbert run
        {"arm": "4x", "seed": 0, "model": "DTP-ViT-Ti-8-64-4x", "epoch": 0, "complete": True,
         "zeroshot_top1": 0.9, "zeroshot_top5": 0.9},
        {"arm": "4x", "seed": 0, "model": "DTP-ViT-Ti-8-64-4x", "epoch": 1, "complete": True,
         "zeroshot_top1": 0.2, "zeroshot_top5": 0.6},
        {"arm": "4x", "seed": 1, "model": "DTP-ViT-Ti-8-64-4x", "epoch": 1, "complete": True,
         "zeroshot_top1": 0.3, "zeroshot_top5": 0.7},
        {"arm": "4x", "seed": 2, "model": "DTP-ViT-Ti-8-64-4x", "epoch": 0, "complete": False,
         "zeroshot_top1": 0.99, "zeroshot_top5": 0.99},
        {"arm": "u", "seed": 0, "model": "DTP-ViT-Ti-8-64-4x+uniform", "epoch": 1, "complete": True,
         "zeroshot_top1": 0.15, "zeroshot_top5": 0.55, "final_zeroshot_top1": 0.45, "final_zeroshot_top5": 0.85},
        {"arm": "h", "seed": 0, "model": "DTP-ViT-Ti-8-64-4x+uniform+hilbert", "epoch": 1, "complete": True,
         "zeroshot_top1": 0.5, "zeroshot_top5": 0.5}])
    runs.to_csv(tmp_path / "runs.csv", index=False)
    bench_row = {"mode": "clip", "execution": "packed", "realised_compression": 4.0, "peak_memory_mb": 1.0,
                 "median_s": 1.0, "speedup": 1.0, "analytic_bound": 1.0, "hardware": "cpu", "batch_size": 8,
                 "dtype": "fp32"}
    pd.DataFrame([{**bench_row, "model": m} for m in ("DTP-ViT-Ti-8-64-4x", "DTP-ViT-Ti-8-64-4x+padded",
                                                      "DTP-ViT-Ti-8-64-4x+uniform", "DTP-ViT-Ti-8-64-4x+topk")]
                 ).to_csv(tmp_path / "efficiency_test.csv", index=False)
    table = tables.efficiency_table([tmp_path], accuracy_runs=tmp_path / "runs.csv").set_index("model")
    assert table.loc["DTP-ViT-Ti-8-64-4x", "zero-shot top-1 (%)"] == pytest.approx(25)  # last epochs, complete runs
    assert table.loc["DTP-ViT-Ti-8-64-4x+padded", "zero-shot top-5 (%)"] == pytest.approx(65)
    assert table.loc["DTP-ViT-Ti-8-64-4x+uniform", "zero-shot top-1 (%)"] == pytest.approx(45)  # its [final] score
    assert table.loc["DTP-ViT-Ti-8-64-4x+uniform", "zero-shot top-5 (%)"] == pytest.approx(85)  # not the Hilbert run
    assert pd.isna(table.loc["DTP-ViT-Ti-8-64-4x+topk", "zero-shot top-1 (%)"])  # never trained
