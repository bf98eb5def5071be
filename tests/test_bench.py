"""The benchmark on CPU: the Ti family with its peers, real Flickr8k photos and captions, a well-formed CSV."""

import pandas as pd
import pytest

from dtplib import bench

COLUMNS = {"model", "mode", "median_s", "p10_s", "p90_s", "images_per_s", "peak_memory_mb", "realised_compression",
           "forward_gmacs", "speedup", "analytic_bound", "hardware", "dtype", "batch_size", "torch", "commit"}


def test_bench_ti_family_writes_a_well_formed_csv(tmp_path):
    models = "DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-4x,ViT-Ti-8-64+pd0.5"
    frame = bench.main(["--models", models, "--batch-size", "8", "--steps", "3", "--warmup", "1", "--boundaries",
                        "forced", "--threads", "1", "--out", str(tmp_path / "eff")])
    written = pd.read_csv(tmp_path / "eff.csv")
    assert COLUMNS <= set(written.columns)
    assert len(written) == 6 and list(written["mode"]) == ["clip"] * 3 + ["image"] * 3
    assert list(written["model"][:3]) == models.split(",")
    assert (written["median_s"] > 0).all() and (written["p10_s"] <= written["p90_s"]).all()
    assert (written["peak_memory_mb"] > 0).all() and (written["batch_size"] == 8).all()
    first = written.groupby("mode").head(1)
    assert (first["speedup"] == 1).all() and (first["analytic_bound"] == 1).all()
    dtp4 = written[written["model"] == "DTP-ViT-Ti-8-64-4x"]
    assert (dtp4["realised_compression"] == 4).all()  # forced every 4 patches: 16 segments of 64 patches
    image = written[written["mode"] == "image"].set_index("model")
    clip = written[written["mode"] == "clip"].set_index("model")
    # the text tower does not shrink, so the whole step's bound is below the image tower's
    assert 1 < clip.loc["DTP-ViT-Ti-8-64-4x", "analytic_bound"] < image.loc["DTP-ViT-Ti-8-64-4x", "analytic_bound"]
    assert image.loc["ViT-Ti-8-64+pd0.5", "analytic_bound"] == pytest.approx(2, rel=0.1)  # half the patches
    assert image.loc["ViT-Ti-8-64+pd0.5", "realised_compression"] == 2
    assert "| clip | DTP-ViT-Ti-8-64-4x |" in (tmp_path / "eff.md").read_text()
    assert (tmp_path / "eff.png").stat().st_size > 0
    assert len(frame) == 6


@pytest.mark.parametrize("spec, message", [("ViT-Nope-1", "unknown model"), ("ViT-Ti-8-64+pd1.5", "must be in")])
def test_bad_model_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_spec(spec)
