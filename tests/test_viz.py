"""dtplib.viz: overlays drawn exactly where boundaries put them, and alignment of boundaries with object outlines."""

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import flickr_photos, load_images
from PIL import Image, ImageDraw

import dtplib
from dtplib import viz
from dtplib.model import expand_forced

GREY = 128  # every PALETTE tint moves a mid-grey pixel by at least 22 levels, the edge and wrap colours are far


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def expected_mask(boundaries: np.ndarray, grid, patch, width: int) -> np.ndarray:
    """The pixels that a boundary vector implies, pixel by pixel from the boundaries alone (no segment ids):
    tinted patches (in a run of two or more), border bands where a boundary separates two neighbours, wrap ticks."""
    (rows, cols), (ph, pw) = grid, patch
    height, width_px = rows * ph, cols * pw
    b = np.asarray(boundaries, dtype=bool)
    lo, tick = width // 2, 2 * width
    mask = np.zeros((height, width_px), dtype=bool)
    for y in range(height):
        for x in range(width_px):
            n = (y // ph) * cols + x // pw
            singleton = b[n] and (n == 0 or b[n - 1])
            changed = not singleton
            for c in range(1, cols):  # vertical border left of column c, drawn over the rows it separates
                across = c * pw - lo <= x < c * pw - lo + width
                for r in range(rows):
                    along = r * ph - lo <= y < (r + 1) * ph - lo + width
                    changed |= across and along and b[r * cols + c - 1]
            for r in range(1, rows):  # horizontal border above row r: a boundary between (r-1, c) and (r, c)
                across = r * ph - lo <= y < r * ph - lo + width
                for c in range(cols):
                    along = c * pw - lo <= x < (c + 1) * pw - lo + width
                    changed |= across and along and b[(r - 1) * cols + c:r * cols + c].any()
            for r in range(rows - 1):  # no boundary at the end of row r: the segment wraps into row r + 1
                if not b[r * cols + cols - 1]:
                    inset = ph // 4
                    changed |= r * ph + inset <= y < (r + 1) * ph - inset and x >= width_px - tick
                    changed |= (r + 1) * ph + inset <= y < (r + 2) * ph - inset and x < tick
            mask[y, x] = changed
    return mask


def constructed_boundaries(num_patches: int, cols: int, seed: int) -> np.ndarray:
    """Random boundaries (rate 1/3) with the cases that matter: a singleton, a wrap, and the forced last one."""
    b = np.random.default_rng(seed).random(num_patches) < 1 / 3
    b[0] = b[1] = True  # patch 0 alone, patch 1 alone
    b[cols - 1] = False  # the segment at the end of row 0 wraps into row 1
    b[-1] = True
    return b


def segment_ids_of(boundaries: np.ndarray) -> np.ndarray:
    b = torch.as_tensor(boundaries).long()
    return (b.cumsum(-1) - b).numpy()


@pytest.fixture(scope="module")
def ti():
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-Ti-8-64-4x")
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def b32():
    model, _, preprocess = open_clip.create_model_and_transforms("DTP-ViT-B-32-4x")
    return model.eval(), preprocess


# ----------------------------------------------------------------------------------------------------------
# Pictures


def test_denormalize_gives_back_the_resized_photo(ti):
    model, preprocess = ti
    photo = Image.open(flickr_photos(1)[0]).convert("RGB")
    mean, std = viz.input_normalization(model)
    assert (mean, std) == (tuple(preprocess.transforms[-1].mean), tuple(preprocess.transforms[-1].std))
    pixels = viz.denormalize(preprocess(photo), mean, std)
    resized = np.asarray(preprocess.transforms[1](preprocess.transforms[0](photo)))  # Resize, CenterCrop
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - resized).max() <= 1
    assert viz.denormalize(preprocess(photo)[None].repeat(2, 1, 1, 1), mean, std).shape == (2, 64, 64, 3)


def test_a_hand_drawn_case_pixel_by_pixel(tmp_path):
    # 2 x 3 patches of 2 x 2 pixels; segments {0, 1} and {2, 3, 4, 5}: the second wraps from row 0 into row 1
    image = np.full((4, 6, 3), GREY, dtype=np.uint8)
    ids = viz.segment_overlay(image, [0, 0, 1, 1, 1, 1], (2, 3), edge_width=1)
    drawn = read_png(viz.save_png(ids, tmp_path / "case.png"))
    picture = ["TTTTYY",
               "TTTTYY",
               "YYEEEt",
               "YYtttt"]  # T: tint of segment 0, t: of segment 1, E: edge, Y: wrap tick
    colours = {"T": np.rint(0.55 * GREY + 0.45 * viz.PALETTE[0]), "t": np.rint(0.55 * GREY + 0.45 * viz.PALETTE[1]),
               "E": viz.EDGE_COLOUR, "Y": viz.WRAP_COLOUR}
    expected = np.array([[colours[ch] for ch in row] for row in picture], dtype=np.uint8)
    np.testing.assert_array_equal(drawn, expected)


GEOMETRIES = {  # name: (grid, patch pixels at the model's input, display scale, edge width)
    "B-32 224px 7x7": ((7, 7), (32, 32), 1, 2),
    "Ti 64px 8x8": ((8, 8), (8, 8), 1, 1),
    "Ti 64px 8x8 shown x4": ((8, 8), (8, 8), 4, 2),
    "non-square 48x80, 3x5 patches of 16": ((3, 5), (16, 16), 1, 3),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_png_differs_from_the_image_exactly_where_the_boundaries_imply(name, tmp_path):
    grid, (ph, pw), scale, width = GEOMETRIES[name]
    num_patches = grid[0] * grid[1]
    boundaries = constructed_boundaries(num_patches, grid[1], seed=len(name))
    grey = np.full((grid[0] * ph, grid[1] * pw, 3), GREY, dtype=np.uint8)
    drawn = read_png(viz.save_png(viz.segment_overlay(grey, segment_ids_of(boundaries), grid, edge_width=width,
                                                      scale=scale), tmp_path / "overlay.png"))
    plain = viz.upscale(grey, scale)
    assert drawn.shape == plain.shape
    changed = (drawn != plain).any(-1)
    np.testing.assert_array_equal(changed, expected_mask(boundaries, grid, (ph * scale, pw * scale), width))

    photo = viz.denormalize(load_images(flickr_photos(1), open_clip.image_transform(grid[0] * ph, False))[0])
    if photo.shape[1] != grid[1] * pw:  # the non-square case: two copies side by side, cut to its width
        photo = np.ascontiguousarray(np.concatenate([photo, photo], axis=1)[:, :grid[1] * pw])
    drawn = viz.segment_overlay(photo, segment_ids_of(boundaries), grid, edge_width=width, scale=scale)
    untouched = ~expected_mask(boundaries, grid, (ph * scale, pw * scale), width)
    np.testing.assert_array_equal(drawn[untouched], viz.upscale(photo, scale)[untouched])


def test_every_patch_its_own_segment_draws_only_the_patch_grid():
    grid, scale = (8, 8), 4
    grey = np.full((64, 64, 3), GREY, dtype=np.uint8)
    drawn = viz.segment_overlay(grey, np.arange(64), grid, edge_width=2, scale=scale)
    changed = (drawn != GREY).any(-1)
    lines = np.zeros(256, dtype=bool)
    lines[[32 * k + d for k in range(1, 8) for d in (-1, 0)]] = True  # 2-pixel bands centred on x = 32 k
    np.testing.assert_array_equal(changed, lines[:, None] | lines[None, :])
    assert (drawn[changed] == viz.EDGE_COLOUR).all()


def test_overlay_of_a_traced_model_is_the_overlay_of_its_boundaries(ti, b32, tmp_path):
    for model, preprocess in (ti, b32):
        tower = dtplib.get_tower(model)
        images = load_images(flickr_photos(2), preprocess)
        forced = torch.from_numpy(np.stack([constructed_boundaries(tower.num_patches, tower.grid[1], s)
                                            for s in (1, 2)])).float()
        with dtplib.forced_boundaries(model, forced):
            record = viz.trace_batches(model, images)
        assert record.grid == tower.grid and torch.equal(record.boundaries, forced.bool())
        mean, std = viz.input_normalization(model)
        scale = viz.display_scale(images.shape[-1])
        drawn = viz.overlays(images, record, mean, std)
        for i in range(2):
            expected = viz.segment_overlay(viz.denormalize(images[i], mean, std),
                                           segment_ids_of(forced[i].numpy()), tower.grid, scale=scale)
            np.testing.assert_array_equal(drawn[i], expected)
        figure = viz.boundary_figure(images, record, mean, std, count=2)
        assert read_png(viz.save_png(figure, tmp_path / "figure.png")).shape[0] > 400
    assert viz.display_scale(64) == 4 and viz.display_scale(224) == 1


def test_probability_heatmap_is_one_colour_per_patch_and_orders_probabilities():
    probs = np.linspace(0, 1, 12)
    boundaries = probs > 0.5
    heat = viz.probability_heatmap(probs, (3, 4), (24, 40), boundaries=boundaries)
    assert heat.shape == (24, 40, 3)
    plain = viz.probability_heatmap(probs, (3, 4), (24, 40))
    blocks = plain.reshape(3, 8, 4, 10, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # constant on each patch
    luminance = blocks[:, 0, :, 0].reshape(12, 3).astype(float) @ [0.299, 0.587, 0.114]
    assert (np.diff(luminance) > 0).all()  # viridis gets lighter as the probability rises
    dots = (heat != plain).any(-1).reshape(3, 8, 4, 10).any((1, 3)).ravel()
    np.testing.assert_array_equal(dots, boundaries)


def test_figures_label_each_image_with_its_tokens_kept(ti, tmp_path):
    model, preprocess = ti
    images = load_images(flickr_photos(6), preprocess)
    forced = torch.zeros(6, 64)
    for i, c in enumerate((1, 2, 4, 8, 16, 64)):
        forced[i, c - 1::c] = 1  # 64, 32, 16, 8, 4, 1 tokens
    with dtplib.forced_boundaries(model, forced):
        record = viz.trace_batches(model, images)
    assert record.tokens.tolist() == [64, 32, 16, 8, 4, 1]
    figure = viz.token_grid(images, record, columns=3)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == [f"{k} / 64 tokens" for k in (1, 4, 8, 16, 32, 64)]  # fewest first
    histogram = viz.tokens_histogram(record.tokens, 64, target=4)
    assert sum(patch.get_height() for patch in histogram.axes[0].patches) == 6
    for name, picture in (("grid.png", figure), ("hist.png", histogram)):
        assert read_png(viz.save_png(picture, tmp_path / name)).ndim == 3


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
    from dtplib import train

    args = train.parse_args(["--model", "ViT-Ti-8-64", "--compression", "4", "--train-data", "unused.tar"])
    model, _, preprocess, _ = train.build_model(args)
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "args": vars(args)},
               checkpoint)
    output = tmp_path / "alignment.csv"
    table = viz.main(["align", "--checkpoint", str(checkpoint), "--num-images", "3", "--draws", "5",
                      "--output", str(output)])
    assert "untrained" not in capsys.readouterr().err
    assert (pd.read_csv(output)["model"] == "DTP-ViT-Ti-8-64-4x").all()
    direct = viz.alignment(model, preprocess, num_images=3, draws=5)  # the same weights, built in this process
    pd.testing.assert_frame_equal(table, direct)
