"""dtplib.viz: alignment of boundaries with object outlines, and its command line (the pictures and figures are
tested in test_plots.py)."""

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import flickr_photos
from PIL import Image, ImageDraw

import dtplib
from dtplib import viz as viz_command
from dtplib.figures import viz
from dtplib.tower.boundaries import expand_forced
from dtplib.tower.order import patch_order


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def ti():
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x")
    return model.eval(), preprocess


# ----------------------------------------------------------------------------------------------------------
# Alignment


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def test_objects_cover_the_patches_whose_centre_they_contain():
    # 64 px, 8x8 grid: patch centres at 4, 12, ..., 60
    cover = viz.patch_objects([[square(10.0, 10.0, 46.0, 46.0)]], (64, 64), (8, 8))[:, 0].reshape(8, 8)
    block = np.zeros((8, 8), dtype=bool)
    block[1:6, 1:6] = True  # centres 12..44
    np.testing.assert_array_equal(cover, block)
    ell = np.array([[0.0, 0.0], [16.0, 0.0], [16.0, 48.0], [64.0, 48.0], [64.0, 64.0], [0.0, 64.0]])  # concave
    shape = viz.patch_objects([[ell]], (64, 64), (8, 8))[:, 0].reshape(8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[:, :2] = expected[6:, :] = True
    np.testing.assert_array_equal(shape, expected)
    two_parts = [square(0.0, 0.0, 8.0, 8.0), square(56.0, 56.0, 64.0, 64.0)]  # one object, two polygons
    assert set(np.flatnonzero(viz.patch_objects([two_parts], (64, 64), (8, 8)))) == {0, 63}
    for nothing in (square(-30.0, -30.0, -10.0, -10.0),  # cut away by the crop
                    np.array([[4.0, 28.0], [60.0, 28.0]]),  # a two-point "polygon": no area
                    square(5.0, 5.0, 11.0, 11.0)):  # inside one patch, off its centre
        assert not viz.patch_objects([[nothing]], (64, 64), (8, 8)).any()
    assert viz.patch_objects([], (64, 64), (8, 8)).shape == (64, 0)


def test_regions_differ_where_the_set_of_covering_objects_differs():
    # 4x4 grid of 16 px patches: A on the left half, B on the right half, C over the whole top row
    objects = [[square(0.0, 0.0, 32.0, 64.0)], [square(32.0, 0.0, 64.0, 64.0)], [square(0.0, 0.0, 64.0, 16.0)]]
    regions = viz.patch_regions(viz.patch_objects(objects, (64, 64), (4, 4))).reshape(4, 4)
    np.testing.assert_array_equal(regions, [[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3], [2, 2, 3, 3]])
    np.testing.assert_array_equal(viz.patch_regions(np.zeros((16, 0), dtype=bool)), np.zeros(16))


def test_alignment_on_a_hand_made_mask_gives_the_known_value():
    """4x4 grid, one square object over the top-left 2x2 block (grid patches 0, 1, 4, 5)."""
    regions = viz.patch_regions(viz.patch_objects([[square(0.0, 0.0, 32.0, 32.0)]], (64, 64), (4, 4)))[None]
    boundaries = np.zeros((1, 16), dtype=bool)

    # raster order: the transitions 1|2, 3|4 and 5|6 (t = 1, 3, 5) cross the outline, 3 of 15
    aligned = np.zeros(15, dtype=bool)
    aligned[[1, 3, 5]] = True
    np.testing.assert_array_equal(viz.aligned_transitions(regions)[0], aligned)
    assert viz.chance_alignment(regions)[0] == pytest.approx(3 / 15)
    raster = boundaries.copy()
    raster[0, [1, 2, 7, 15]] = True  # runs close after patches 1 (aligned), 2 and 7 (not), 15 (forced, no transition)
    assert viz.boundary_alignment(raster, regions)[0] == pytest.approx(1 / 3)
    table = viz.alignment_table(raster, regions, draws=10).set_index("boundaries")
    assert table.loc["learned", "alignment"] == pytest.approx(1 / 3)
    assert table.loc["uniform (same count)", "alignment"] == pytest.approx(1 / 3)  # after 3 (aligned), 7, 11
    np.testing.assert_allclose(table["chance"], 3 / 15)
    assert (table["boundaries per image"] == 3).all() and (table["images"] == 1).all()

    # Hilbert order 0 1 5 4 | 8 12 13 9 | 10 14 15 11 | 7 6 2 3: the object is the first run of 4, and the only
    # aligned transition is t = 3, between grid patches 4 and 8; the last patch read is grid patch 3
    order = patch_order("hilbert", 4, 4)
    np.testing.assert_array_equal(order, [0, 1, 5, 4, 8, 12, 13, 9, 10, 14, 15, 11, 7, 6, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(viz.aligned_transitions(regions, order)[0]), [3])
    assert viz.chance_alignment(regions, order)[0] == pytest.approx(1 / 15)
    hilbert = boundaries.copy()
    hilbert[0, [4, 3]] = True  # after grid patch 4 (t = 3, aligned) and the forced one after grid patch 3
    assert viz.boundary_alignment(hilbert, regions, order)[0] == 1.0
    hilbert[0, 15] = True  # grid patch 15 is read at t = 10: no longer the forced last one, and not aligned
    assert viz.boundary_alignment(hilbert, regions, order)[0] == 0.5
    table = viz.alignment_table(hilbert, regions, order, draws=10).set_index("boundaries")
    assert table.loc["learned", "alignment"] == 0.5
    assert table.loc["uniform (same count)", "alignment"] == 0.0  # 3 segments: after t = 4 and t = 9, not aligned
    np.testing.assert_allclose(table["chance"], 1 / 15)
    # the uniform baseline is placed along the reading order and mapped to grid positions
    every_4 = viz.at_grid_positions(viz.uniform_boundaries([4], 16), order)
    np.testing.assert_array_equal(np.flatnonzero(every_4[0]), sorted([4, 9, 11, 3]))  # order[3, 7, 11, 15]
    assert viz.boundary_alignment(every_4, regions, order)[0] == pytest.approx(1 / 3)


def test_alignment_is_one_on_aligned_transitions_and_zero_away_from_them():
    objects = [[square(10.0, 10.0, 46.0, 46.0)], [square(30.0, 0.0, 64.0, 20.0)]]  # overlapping
    regions = np.tile(viz.patch_regions(viz.patch_objects(objects, (64, 64), (8, 8))), (3, 1))  # 3 x 64
    for order in (None, patch_order("hilbert", 8, 8)):
        reading = np.arange(64) if order is None else np.asarray(order)
        aligned = viz.aligned_transitions(regions, order)  # 3 x 63
        assert aligned.any() and not aligned.all()
        on, away = (np.ones((3, 64), dtype=bool) for _ in range(2))  # the forced last one set in both
        on[:, reading[:-1]], away[:, reading[:-1]] = aligned, ~aligned
        np.testing.assert_array_equal(viz.boundary_alignment(on, regions, order), 1.0)
        np.testing.assert_array_equal(viz.boundary_alignment(away, regions, order), 0.0)
        only_forced = np.zeros((1, 64), dtype=bool)
        only_forced[0, reading[-1]] = True
        assert np.isnan(viz.boundary_alignment(only_forced, regions[:1], order)[0])
        table = viz.alignment_table(on, regions, order).set_index("boundaries")
        assert table.loc["learned", "alignment"] == 1.0
        assert 0 < table.loc["random (same count)", "alignment"] < 1
        assert viz.alignment_table(away, regions, order).set_index("boundaries").loc["learned", "alignment"] == 0.0


def test_uniform_and_random_baselines_keep_each_images_count():
    counts = np.array([1, 5, 16, 33, 64])
    uniform = viz.uniform_boundaries(counts, 64)
    random = viz.random_boundaries(counts, 64, np.random.default_rng(0))
    for baseline in (uniform, random):
        np.testing.assert_array_equal(baseline.sum(1), counts)
        assert baseline[:, -1].all()
    every_4 = expand_forced(4, torch.Size([1, 64]), "cpu", torch.float32).bool().numpy()
    np.testing.assert_array_equal(viz.uniform_boundaries([16], 64), every_4)  # k = N / c: a boundary every c
    regions = (np.random.default_rng(1).random((5, 64)) < 0.4).astype(np.int64)
    table = viz.alignment_table(random, regions, draws=400).set_index("boundaries")
    assert table.loc["learned", "images"] == 4  # the image with one segment has no boundary to score
    # the random baseline's expectation is each scored image's chance rate, averaged over the scored images
    expectation = viz.chance_alignment(regions)[counts > 1].mean()
    assert table.loc["random (same count)", "chance"] == pytest.approx(expectation)
    assert abs(table.loc["random (same count)", "alignment"] - expectation) < 3 * table.loc["random (same count)",
                                                                                         "std"] / 20
    assert ((table["ci low"] <= table["alignment"]) & (table["alignment"] <= table["ci high"])).all()
    assert (table["ci low"] < table["ci high"]).all()


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
    images, regions, files = viz.coco_patch_regions(preprocess, tower.grid, num_images=6)
    assert images.shape == (6, 3, 64, 64) and regions.shape == (6, 64) and len(files) == 6
    aligned = viz.aligned_transitions(regions)  # the Ti tower reads in raster order
    assert aligned.any(1).all() and not aligned.all(1).any()
    for chosen, expected in ((aligned, 1.0), (~aligned, 0.0)):
        boundaries = np.concatenate([chosen, np.ones((6, 1), dtype=bool)], axis=1)  # and the forced last one
        with dtplib.forced_boundaries(model, torch.from_numpy(boundaries).float()):
            record = viz.trace_batches(model, images)
        table = viz.alignment_table(record.boundaries, regions, draws=20).set_index("boundaries")
        assert table.loc["learned", "alignment"] == expected
        assert 0 < table.loc["uniform (same count)", "alignment"] < 1
        assert (table["images"] == 6).all() and 0 < table.loc["learned", "chance"] < 1


def test_align_command_prints_the_table_and_appends_rows(tmp_path, capsys):
    output = tmp_path / "alignment.csv"
    for _ in range(2):
        table = viz_command.main(["align", "--model", "DTP-ViT-Ti-8-64-4x", "--num-images", "4", "--draws", "10",
                          "--output", str(output)])
    printed = capsys.readouterr()
    assert "random (same count)" in printed.out and "untrained" in printed.err
    assert list(table["boundaries"]) == ["learned", "uniform (same count)", "random (same count)"]
    rows = pd.read_csv(output)
    assert len(rows) == 6 and {"model", "commit", "hardware", "alignment", "ci low", "ci high", "chance",
                               "order", "compression"} <= set(rows.columns)
    assert rows["alignment"].between(0, 1).all() and rows["chance"].between(0, 1).all()
    assert (rows["ci low"] <= rows["alignment"]).all() and (rows["alignment"] <= rows["ci high"]).all()
    assert (rows["order"] == "raster").all()


def test_overlay_command_writes_three_pngs(tmp_path):
    viz_command.main(["overlay", "--model", "DTP-ViT-Ti-8-64-4x", "--num-images", "6", "--shown", "2",
              "--out", str(tmp_path)])
    for name in ("overlays.png", "token_grid.png", "tokens_hist.png"):
        assert read_png(tmp_path / name).shape[0] > 100


def test_align_command_reads_the_model_from_a_training_checkpoint(tmp_path, capsys):
    from dtplib.training.checkpoint import build_from_config
    from dtplib.training.config import TrainConfig

    config = TrainConfig.from_options(model="ViT-Ti-8-64", compression=4, train_data="unused.tar")
    model, _, preprocess, _ = build_from_config(config)
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "args": config.to_dict()},
               checkpoint)
    output = tmp_path / "alignment.csv"
    table = viz_command.main(["align", "--checkpoint", str(checkpoint), "--num-images", "3", "--draws", "5",
                      "--output", str(output)])
    assert "untrained" not in capsys.readouterr().err
    assert (pd.read_csv(output)["model"] == "DTP-ViT-Ti-8-64-4x").all()
    direct = viz.alignment(model, preprocess, num_images=3, draws=5)  # the same weights, built in this process
    pd.testing.assert_frame_equal(table, direct)


# ----------------------------------------------------------------------------------------------------------
# The same photos grouped by each method


def test_each_method_is_traced_on_the_same_photos(tmp_path):
    """Shipped DTP weights in one column, uniform pooling and a pruning tower at seeded random init beside it: every
    record covers the same photos at the tower's grid; the note says which columns are untrained; the DTP column is
    the shipped model's own trace; the pruning tower keeps its budget and drops the rest."""
    files = flickr_photos(2)
    traces = viz.trace_methods(files, "DTP-ViT-Ti-8-64-4x", {"dtp": "flickr8k-ti-learned-4x"},
                               ("dtp", "uniform", "prune"))
    assert list(traces.records) == ["DTP, trained", "uniform pooling", "learned pruning"]
    assert traces.notes == {"DTP, trained": "", "uniform pooling": "", "learned pruning": viz.RANDOM_INIT}
    assert traces.images.shape == (2, 3, 64, 64) and all(r.grid == (8, 8) for r in traces.records.values())
    trained = viz.trace_batches(dtplib.load_weights("flickr8k-ti-learned-4x")[0], traces.images)
    assert torch.equal(traces.records["DTP, trained"].segment_ids, trained.segment_ids)
    assert traces.records["uniform pooling"].segment_ids[0].tolist() == [i // 4 for i in range(64)]
    pruned = traces.records["learned pruning"].segment_ids
    assert ((pruned >= 0).sum(1) == 16).all() and ((pruned == -1).sum(1) == 48).all()
    with pytest.raises(ValueError, match="not 'tome' at 4x"):  # DTP's weights are not a ToMe tower
        viz.method_model("tome", "DTP-ViT-Ti-8-64-4x", "flickr8k-ti-learned-4x")
    with pytest.raises(ValueError, match="not among the methods"):
        viz.trace_methods(files, weights={"kmeans": "x"}, methods=("dtp",))


def test_a_random_init_is_seeded():
    """Two builds of one method at one seed are the same tower, its own module included: the figure is reproducible."""
    first, second = (viz.method_model("tokenlearner", "DTP-ViT-Ti-8-64-4x", seed=3)[0] for _ in range(2))
    assert first is not second and dtplib.get_tower(first).dtp.reduction == "tokenlearner"
    torch.testing.assert_close(first.state_dict(), second.state_dict(), rtol=0, atol=0)


def test_methods_command_writes_the_figure_and_refuses_bad_methods(tmp_path, capsys):
    viz_command.main(["methods", "--num-images", "1", "--methods", "uniform,evit", "--out", str(tmp_path / "m.png")])
    picture = read_png(tmp_path / "m.png")
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # two columns side by side, one row
    assert "wrote" in capsys.readouterr().out
    for argv, message in ((["--methods", "dtp,fastvit"], "name methods of"), (["--weights", "dtp"], "METHOD=WEIGHTS"),
                          (["--weights", "tome=x", "--methods", "dtp"], "not among the methods")):
        with pytest.raises(SystemExit):
            viz_command.main(["methods", *argv, "--out", str(tmp_path / "bad.png")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
