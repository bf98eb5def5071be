"""dtplib.viz: alignment of boundaries with object outlines, and its command line (the pictures and figures are
tested in test_plots.py)."""

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

import dtplib
from dtplib import viz
from dtplib.model import expand_forced


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def ti():
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x")
    return model.eval(), preprocess


# ----------------------------------------------------------------------------------------------------------
# Alignment


def test_outline_patches_of_a_square_are_its_ring():
    square = np.array([[12.0, 12.0], [44.0, 12.0], [44.0, 44.0], [12.0, 44.0]])  # patches 1..5 of a 64 px 8x8 grid
    crossed = viz.outline_patches([square], (64, 64), (8, 8)).reshape(8, 8)
    ring = np.zeros((8, 8), dtype=bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    np.testing.assert_array_equal(crossed, ring)
    outside = np.array([[-30.0, -30.0], [-10.0, -30.0], [-10.0, -10.0]])  # cut away by the crop
    assert not viz.outline_patches([outside], (64, 64), (8, 8)).any()
    line = np.array([[4.0, 28.0], [60.0, 28.0]])  # a two-point "polygon": a line across row 3
    assert set(np.flatnonzero(viz.outline_patches([line], (64, 64), (8, 8)))) == set(range(24, 32))
    on_border = np.array([[32.0, 4.0], [32.0, 12.0]])  # on the border of columns 3 and 4: patches are closed boxes
    assert set(np.flatnonzero(viz.outline_patches([on_border], (64, 64), (8, 8)))) == {3, 4, 11, 12}


def test_alignment_is_one_on_outlines_and_zero_away_from_them():
    square = np.array([[12.0, 12.0], [44.0, 12.0], [44.0, 44.0], [12.0, 44.0]])
    outline = np.tile(viz.outline_patches([square], (64, 64), (8, 8)), (3, 1))  # 3 x 64, last patch off the outline
    on = outline.copy()
    on[:, -1] = True  # the forced boundary, off the outline, does not count
    away = ~outline
    assert viz.boundary_alignment(on, outline) == 1.0
    assert viz.boundary_alignment(away, outline) == 0.0
    assert np.isnan(viz.boundary_alignment(np.eye(64, dtype=bool)[[-1]], outline[:1]))  # only the forced one
    table = viz.alignment_table(on, outline).set_index("boundaries")
    assert table.loc["learned", "alignment"] == 1.0
    assert 0 < table.loc["random (same count)", "alignment"] < 1
    assert viz.alignment_table(away, outline).set_index("boundaries").loc["learned", "alignment"] == 0.0


def test_uniform_and_random_baselines_keep_each_images_count():
    counts = np.array([1, 5, 16, 33, 64])
    uniform = viz.uniform_boundaries(counts, 64)
    random = viz.random_boundaries(counts, 64, np.random.default_rng(0))
    for baseline in (uniform, random):
        np.testing.assert_array_equal(baseline.sum(1), counts)
        assert baseline[:, -1].all()
    every_4 = expand_forced(4, torch.Size([1, 64]), "cpu", torch.float32).bool().numpy()
    np.testing.assert_array_equal(viz.uniform_boundaries([16], 64), every_4)  # k = N / c: a boundary every c
    outline = np.random.default_rng(1).random((5, 64)) < 0.4
    table = viz.alignment_table(random, outline, draws=400).set_index("boundaries")
    weights = counts - 1  # the random baseline's expectation: images weighted by their free boundaries
    expectation = (weights * outline[:, :-1].mean(1)).sum() / weights.sum()
    assert abs(table.loc["random (same count)", "alignment"] - expectation) < 3 * table.loc["random (same count)",
                                                                                         "std"] / 20


@pytest.mark.parametrize("size", [64, 224])
def test_outline_geometry_follows_the_preprocess(size):
    """The polygons moved by `preprocess_geometry` land where the preprocess itself moves the object's pixels."""
    preprocess = open_clip.image_transform(size, is_train=False)
    rows, cols = np.mgrid[:size, :size]
    centroid = lambda m: np.array([(m * cols).sum(), (m * rows).sum()]) / m.sum()  # noqa: E731
    for item in [i for i in viz.coco_outlines() if i.width != i.height][:3]:  # non-square photos: a real crop
        mask = Image.new("L", (item.width, item.height))
        for polygon in item.polygons:
            ImageDraw.Draw(mask).polygon([tuple(p) for p in polygon], fill=255)
        moved = np.asarray(preprocess.transforms[1](preprocess.transforms[0](mask))) / 255  # Resize, CenterCrop
        scale, offset, out_size = viz.preprocess_geometry(preprocess, item.width, item.height)
        assert out_size == (size, size)
        drawn = Image.new("L", (4 * size, 4 * size))  # drawn 4x larger, then averaged: the polygon's area per pixel
        for polygon in item.polygons:
            ImageDraw.Draw(drawn).polygon([tuple(p) for p in 4 * (polygon * scale - offset)], fill=255)
        drawn = np.asarray(drawn.resize((size, size), Image.BOX)) / 255
        assert moved.sum() > 0.02 * size * size
        assert np.abs(moved - drawn).mean() < 0.02
        assert np.abs(centroid(moved) - centroid(drawn)).max() < 0.5  # pixels; a wrong crop offset moves it >= 1


def test_alignment_of_boundaries_forced_on_and_off_coco_outlines(ti):
    """Through the whole path: COCO photos and polygons, the preprocess, the model's trace, the table."""
    model, preprocess = ti
    tower = dtplib.get_tower(model)
    images, outline, files = viz.coco_patch_outlines(preprocess, tower.grid, num_images=6)
    assert images.shape == (6, 3, 64, 64) and outline.shape == (6, 64) and len(files) == 6
    assert outline.any(1).all() and not outline.all()
    for boundaries, expected in ((outline, 1.0), (~outline, 0.0)):
        forced = torch.from_numpy(boundaries).float()
        with dtplib.forced_boundaries(model, forced):
            record = viz.trace_batches(model, images)
        table = viz.alignment_table(record.boundaries, outline, draws=20).set_index("boundaries")
        assert table.loc["learned", "alignment"] == expected
        assert 0 < table.loc["uniform (same count)", "alignment"] < 1


def test_align_command_prints_the_table_and_appends_rows(tmp_path, capsys):
    output = tmp_path / "alignment.csv"
    for _ in range(2):
        table = viz.main(["align", "--model", "DTP-ViT-Ti-8-64-4x", "--num-images", "4", "--draws", "10",
                          "--output", str(output)])
    printed = capsys.readouterr()
    assert "random (same count)" in printed.out and "untrained" in printed.err
    assert list(table["boundaries"]) == ["learned", "uniform (same count)", "random (same count)"]
    rows = pd.read_csv(output)
    assert len(rows) == 6 and {"model", "commit", "hardware", "alignment", "compression"} <= set(rows.columns)
    assert rows["alignment"].between(0, 1).all()


def test_overlay_command_writes_three_pngs(tmp_path):
    viz.main(["overlay", "--model", "DTP-ViT-Ti-8-64-4x", "--num-images", "6", "--shown", "2",
              "--out", str(tmp_path)])
    for name in ("overlays.png", "token_grid.png", "tokens_hist.png"):
        assert read_png(tmp_path / name).shape[0] > 100


def test_align_command_reads_the_model_from_a_training_checkpoint(tmp_path, capsys):
    from dtplib.clip import build_from_config
    from dtplib.config import TrainConfig

    config = TrainConfig(model="ViT-Ti-8-64", compression=4, train_data="unused.tar")
    model, _, preprocess, _ = build_from_config(config)
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "args": config.to_dict()},
               checkpoint)
    output = tmp_path / "alignment.csv"
    table = viz.main(["align", "--checkpoint", str(checkpoint), "--num-images", "3", "--draws", "5",
                      "--output", str(output)])
    assert "untrained" not in capsys.readouterr().err
    assert (pd.read_csv(output)["model"] == "DTP-ViT-Ti-8-64-4x").all()
    direct = viz.alignment(model, preprocess, num_images=3, draws=5)  # the same weights, built in this process
    pd.testing.assert_frame_equal(table, direct)
