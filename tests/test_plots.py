"""dtplib.figures.plots: overlays drawn exactly where boundaries put them, figures labelled with the tokens kept, the
notebooks' figures, and the one way of saving them (`save_figure`)."""

import matplotlib.pyplot as plt
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import flickr_photos
from PIL import Image

import dtplib
import dtplib.common.paths
from dtplib.common.images import load_images
from dtplib.figures import compare, plots, viz
from dtplib.measure import tables
from dtplib.tower.model import TraceRecord

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
# Saving


def test_save_figure_writes_pictures_at_exact_pixels_and_figures_whole(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = plots.save_figure(picture, tmp_path / "new" / "folder" / "picture.png")  # parent folders are created
    assert path == tmp_path / "new" / "folder" / "picture.png"
    np.testing.assert_array_equal(read_png(path), picture)
    figure, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1], label="a line")
    figure.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside the canvas, kept by bbox_inches="tight"
    small = read_png(plots.save_figure(figure, tmp_path / "figure_50.png", dpi=50))
    large = read_png(plots.save_figure(figure, tmp_path / "figure_100.png", dpi=100))
    plt.close(figure)
    assert small.shape[1] > 2 * 50
    assert abs(large.shape[1] / small.shape[1] - 2) < 0.1
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".tmp"]  # written atomically, nothing left behind


def test_save_figure_refuses_what_is_not_a_picture(tmp_path):
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                "figure.png"):
        with pytest.raises((ValueError, TypeError)):
            plots.save_figure(bad, tmp_path / "bad.png")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------
# Pictures


def test_denormalize_gives_back_the_resized_photo(ti):
    model, preprocess = ti
    photo = Image.open(flickr_photos(1)[0]).convert("RGB")
    mean, std = plots.input_normalization(model)
    assert (mean, std) == (tuple(preprocess.transforms[-1].mean), tuple(preprocess.transforms[-1].std))
    pixels = plots.denormalize(preprocess(photo), mean, std)
    resized = np.asarray(preprocess.transforms[1](preprocess.transforms[0](photo)))  # Resize, CenterCrop
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - resized).max() <= 1
    assert plots.denormalize(preprocess(photo)[None].repeat(2, 1, 1, 1), mean, std).shape == (2, 64, 64, 3)


def test_a_hand_drawn_case_pixel_by_pixel(tmp_path):
    # 2 x 3 patches of 2 x 2 pixels; segments {0, 1} and {2, 3, 4, 5}: the second wraps from row 0 into row 1
    image = np.full((4, 6, 3), GREY, dtype=np.uint8)
    ids = plots.segment_overlay(image, [0, 0, 1, 1, 1, 1], (2, 3), edge_width=1)
    drawn = read_png(plots.save_figure(ids, tmp_path / "case.png"))
    picture = ["TTTTYY",
               "TTTTYY",
               "YYEEEt",
               "YYtttt"]  # T: tint of segment 0, t: of segment 1, E: edge, Y: wrap tick
    colours = {"T": np.rint(0.55 * GREY + 0.45 * plots.PALETTE[0]), "t": np.rint(0.55 * GREY + 0.45 * plots.PALETTE[1]),
               "E": plots.EDGE_COLOUR, "Y": plots.WRAP_COLOUR}
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
    overlay = plots.segment_overlay(grey, segment_ids_of(boundaries), grid, edge_width=width, scale=scale)
    drawn = read_png(plots.save_figure(overlay, tmp_path / "overlay.png"))
    plain = plots.upscale(grey, scale)
    assert drawn.shape == plain.shape
    changed = (drawn != plain).any(-1)
    np.testing.assert_array_equal(changed, expected_mask(boundaries, grid, (ph * scale, pw * scale), width))

    photo = plots.denormalize(load_images(flickr_photos(1), open_clip.image_transform(grid[0] * ph, False))[0])
    if photo.shape[1] != grid[1] * pw:  # the non-square case: two copies side by side, cut to its width
        photo = np.ascontiguousarray(np.concatenate([photo, photo], axis=1)[:, :grid[1] * pw])
    drawn = plots.segment_overlay(photo, segment_ids_of(boundaries), grid, edge_width=width, scale=scale)
    untouched = ~expected_mask(boundaries, grid, (ph * scale, pw * scale), width)
    np.testing.assert_array_equal(drawn[untouched], plots.upscale(photo, scale)[untouched])


def test_every_patch_its_own_segment_draws_only_the_patch_grid():
    grid, scale = (8, 8), 4
    grey = np.full((64, 64, 3), GREY, dtype=np.uint8)
    drawn = plots.segment_overlay(grey, np.arange(64), grid, edge_width=2, scale=scale)
    changed = (drawn != GREY).any(-1)
    lines = np.zeros(256, dtype=bool)
    lines[[32 * k + d for k in range(1, 8) for d in (-1, 0)]] = True  # 2-pixel bands centred on x = 32 k
    np.testing.assert_array_equal(changed, lines[:, None] | lines[None, :])
    assert (drawn[changed] == plots.EDGE_COLOUR).all()


def test_overlay_of_a_traced_model_is_the_overlay_of_its_boundaries(ti, b32, tmp_path):
    for model, preprocess in (ti, b32):
        tower = dtplib.get_tower(model)
        images = load_images(flickr_photos(2), preprocess)
        forced = torch.from_numpy(np.stack([constructed_boundaries(tower.num_patches, tower.grid[1], s)
                                            for s in (1, 2)])).float()
        with dtplib.forced_boundaries(model, forced):
            record = viz.trace_batches(model, images)
        assert record.grid == tower.grid and torch.equal(record.boundaries, forced.bool())
        mean, std = plots.input_normalization(model)
        scale = plots.display_scale(images.shape[-1])
        drawn = plots.overlays(images, record, mean, std)
        for i in range(2):
            expected = plots.segment_overlay(plots.denormalize(images[i], mean, std),
                                             segment_ids_of(forced[i].numpy()), tower.grid, scale=scale)
            np.testing.assert_array_equal(drawn[i], expected)
        figure = plots.boundary_figure(images, record, mean, std, count=2)
        assert read_png(plots.save_figure(figure, tmp_path / "figure.png")).shape[0] > 400
    assert plots.display_scale(64) == 4 and plots.display_scale(224) == 1


def test_probability_heatmap_is_one_colour_per_patch_and_orders_probabilities():
    probs = np.linspace(0, 1, 12)
    boundaries = probs > 0.5
    heat = plots.probability_heatmap(probs, (3, 4), (24, 40), boundaries=boundaries)
    assert heat.shape == (24, 40, 3)
    plain = plots.probability_heatmap(probs, (3, 4), (24, 40))
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
    figure = plots.token_grid(images, record, columns=3)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == [f"{k} / 64 tokens" for k in (1, 4, 8, 16, 32, 64)]  # fewest first
    histogram = plots.tokens_histogram(record.tokens, 64, target=4)
    assert sum(patch.get_height() for patch in histogram.axes[0].patches) == 6
    histogram.canvas.draw()
    for ticks in (histogram.axes[0].get_xticks(), histogram.axes[0].get_yticks()):
        assert np.allclose(ticks, np.round(ticks))  # whole tokens, whole images
    for name, picture in (("grid.png", figure), ("hist.png", histogram)):
        assert read_png(plots.save_figure(picture, tmp_path / name)).ndim == 3


# ----------------------------------------------------------------------------------------------------------
# Figures of the notebooks


def bench_rows(hardware: str, tag: str, outlier: float | None = None) -> list[dict]:
    """Benchmark rows of one table as `python -m dtplib.bench` writes them (both modes)."""
    reference = f"DTP-ViT-{tag}-1x"
    return [{"model": model.format(tag=tag), "mode": mode, "boundaries": boundaries, "execution": execution,
             "realised_compression": outlier if outlier and model.endswith("-4x") else compression,
             "speedup": speedup, "analytic_bound": 0.9 * compression, "padded_bound": 0.8 * compression,
             "reference": reference, "hardware": hardware, "batch_size": 8, "dtype": "fp32"}
            for mode in ("clip", "image")
            for model, boundaries, execution, compression, speedup in (
                ("DTP-ViT-{tag}-1x", "", "", 1.0, 1.0), ("DTP-ViT-{tag}-4x", "learned", "packed", 3.5, 1.8),
                ("DTP-ViT-{tag}-4x+padded", "learned", "padded", 3.5, 1.5),
                ("DTP-ViT-{tag}-4x+uniform", "uniform", "packed", 4.0, 2.0), ("ViT-{tag}+pd0.5", "", "", 2.0, 1.7))]


def test_speedup_figures_draw_one_machine_each_and_label_every_panel_with_its_reference(tmp_path):
    tables_ = {"efficiency_cpu_ti": bench_rows("cpu A", "Ti-8-64"), "efficiency_cpu_b32": bench_rows("cpu A", "B-32"),
               "efficiency_gpu_b32": bench_rows("gpu B", "B-32", outlier=49.0)}
    csvs = []
    for stem, rows in tables_.items():
        csvs.append(tmp_path / f"{stem}.csv")
        pd.DataFrame(rows).to_csv(csvs[-1], index=False)
    figures = compare.speedup_figures(csvs)
    assert list(figures) == ["cpu_a", "gpu_b"]
    cpu, gpu = figures["cpu_a"], figures["gpu_b"]
    # a row of panels per table, a panel per mode
    assert cpu.get_suptitle() == "cpu A" and len(cpu.axes) == 4 and len(gpu.axes) == 2
    assert [ax.get_ylabel() for ax in cpu.axes] == ["speed-up over DTP-ViT-Ti-8-64-1x"] * 2 + [
        "speed-up over DTP-ViT-B-32-1x"] * 2
    assert "whole CLIP training step\nViT-Ti-8-64: batch 8, fp32" == cpu.axes[0].get_title()
    labels = [text.get_text() for text in cpu.legends[0].texts]
    assert labels == ["learned, packed", "learned, padded", "uniform, packed", "FLIP patch dropout", "measured",
                      "analytic bound"]
    for ax in gpu.axes:  # the collapsed 49x row does not stretch the axis: it is marked at the edge and labelled
        assert ax.get_xlim()[1] < 5
        assert any("realised 49x" in text.get_text() for text in ax.texts)
    with pytest.raises(ValueError, match="one machine per speed-up figure"):
        compare.speedup_plot(csvs)
    assert read_png(plots.save_figure(cpu, tmp_path / "speedup.png", pdf=True)).ndim == 3
    assert (tmp_path / "speedup.pdf").read_bytes().startswith(b"%PDF")
    for figure in figures.values():
        plt.close(figure)


def test_a_mode_a_table_did_not_time_is_said_not_drawn_empty(tmp_path):
    full, clip_only = tmp_path / "efficiency_a.csv", tmp_path / "efficiency_b.csv"
    pd.DataFrame(bench_rows("cpu A", "Ti-8-64")).to_csv(full, index=False)
    pd.DataFrame([r for r in bench_rows("cpu A", "Ti-8-64") if r["mode"] == "clip"]).to_csv(clip_only, index=False)
    figure = compare.speedup_plot([full, clip_only])
    assert [ax.axison for ax in figure.axes] == [True, True, True, False]
    assert "not timed in this table" in figure.axes[3].texts[0].get_text()
    assert not figure.axes[3].lines  # nothing drawn in it
    plt.close(figure)


def test_arm_families_colour_every_kind_of_arm_apart():
    labels = {"DTP-ViT-Ti-8-64-1x": "baseline (1x)", "DTP-ViT-Ti-8-64-4x": "learned",
              "DTP-ViT-Ti-8-64-4x+image-prior": "learned", "DTP-ViT-Ti-8-64-4x+topk+hilbert": "top-k",
              "DTP-ViT-Ti-8-64-4x+uniform": "uniform", "DTP-ViT-Ti-8-64-4x+uniform+hilbert": "2x2 pooling",
              "DTP-ViT-Ti-8-64-1x+pd0.5": "patch dropout (FLIP)", "ViT-B-32": "open_clip ViT",
              "DTP-ViT-B-32-4x+batch-topk": "top-k", "pool-2x2": "2x2 pooling", "flip-75": "patch dropout (FLIP)"}
    assert {label: plots.arm_family(label) for label in labels} == labels
    assert len(set(plots.FAMILY_COLOURS.values())) == len(plots.FAMILY_COLOURS)


def test_each_reduction_is_a_family_of_its_own_colour():
    """A reduction's benchmark label, trained label or arm name is its method's family, coloured apart from every
    other family; a name that merely contains a method's letters is not."""
    from dtplib.tower.config import REDUCTIONS

    families = {"tome": "ToMe", "evit": "EViT", "tokenlearner": "TokenLearner", "kmeans": "k-means grouping",
                "prune": "learned pruning"}
    assert set(families) == set(REDUCTIONS) - {"dtp"} and plots.REDUCTION_FAMILIES == families
    for method, family in families.items():
        for label in (f"DTP-ViT-Ti-8-64-4x+{method}", f"DTP-ViT-B-32-4x+{method}", f"{method}-4x"):
            assert plots.arm_family(label) == family
        assert family in plots.FAMILY_COLOURS
    assert plots.arm_family("DTP-ViT-Ti-8-64-4x+topk") == "top-k"  # "tome" is no prefix of "topk"
    assert plots.arm_family("pruned-vit") == "learned"  # not "+prune" nor "prune-"


def test_plot_results_bars_each_method_above_chance():
    table = pd.DataFrame({"method": ["zero-shot", "linear probe"], "top1": [0.3, 0.55], "chance": [0.1, 0.1]})
    figure = compare.plot_results(table)
    axis = figure.axes[0]
    assert [bar.get_height() for bar in axis.patches] == pytest.approx([30, 55])
    assert [text.get_text() for text in axis.get_legend().texts] == ["chance (10%)"]
    plt.close(figure)


def test_accuracy_curves_are_small_multiples_with_the_reference_in_grey_and_clipped_bands(tmp_path):
    arms = ["1x", *(f"arm-{index}" for index in range(5))]
    runs = pd.DataFrame([{"arm": arm, "seed": seed, "epochs_done": epoch, "train_time_s": 10.0 * epoch * (1 + i),
                          "train_gmacs": 5.0 * epoch * (1 + i), "R@10": 0.01 * (epoch + i) + 0.04 * seed}
                         for i, arm in enumerate(arms) for seed in (0, 1) for epoch in (1, 2, 3)])
    figure = compare.accuracy_curves(tables.metric_curves(runs, "R@10"), "R@10", reference="1x", chance=0.01)
    assert [ax.get_title() for ax in figure.axes] == [f"{arm} (n=2)" for arm in arms]  # a panel per arm
    for ax in figure.axes:
        assert ax.get_ylim()[0] == 0
        bands = [c for c in ax.collections if c.get_paths()]
        assert all(band.get_paths()[0].vertices[:, 1].min() >= 0 for band in bands)  # t-interval clipped at 0 %
        assert any(line.get_ydata()[0] == 1.0 and line.get_linestyle() == ":" for line in ax.lines)  # chance 1 %
    assert figure.get_supylabel() == "R@10 (%)"
    greys = [line for line in figure.axes[1].lines if line.get_label() == "reference: 1x"]
    assert len(greys) == 1 and not [line for line in figure.axes[0].lines if line.get_label() == "reference: 1x"]
    assert {text.get_text() for text in figure.legends[0].texts} == {"reference: 1x", "chance (1%)"}
    figure.canvas.draw()
    legend_box = figure.legends[0].get_window_extent()
    assert all(legend_box.x0 >= ax.get_window_extent().x1 for ax in figure.axes)
    time = compare.accuracy_curves(tables.metric_curves(runs, "R@10"), "R@10", cost="train_time_s")
    assert time.get_supxlabel() == "cumulative training step time (min)"  # 180 s at most
    assert read_png(plots.save_figure(figure, tmp_path / "curves.png")).ndim == 3
    plt.close(figure)
    plt.close(time)


def test_accuracy_vs_gflops_has_every_arm_once_with_clipped_bars_and_chance(tmp_path):
    runs = pd.read_csv(dtplib.common.paths.repo_path("results/flickr8k_ti/runs.csv"))
    table = tables.arm_accuracy(dtplib.common.paths.repo_path("results/flickr8k_ti/runs.csv"), classes=10)
    figure = compare.accuracy_vs_gflops(table)
    arms = list(dict.fromkeys(runs["arm"]))
    for ax, (metric, chance) in zip(figure.axes, (("zero-shot top-1 (%)", 10.0), ("text→image R@10 (%)", 1.0)),
                                    strict=True):
        assert ax.get_ylabel() == metric
        assert [bar.get_label() for bar in ax.containers] == [
            f"{arm} (n={runs[runs['complete']].groupby('arm')['seed'].nunique()[arm]})" for arm in arms]
        lows = [segment[:, 1].min() for bar in ax.containers for segment in bar.lines[2][0].get_segments()]
        assert min(lows) >= 0  # flip-75's R@10 interval reaches below 0 before clipping
        assert [line.get_ydata()[0] for line in ax.lines if line.get_label() == "chance"] == [chance]
    assert {"pool-2x2", "flip-50", "flip-75"} <= set(table["arm"])
    assert read_png(plots.save_figure(figure, tmp_path / "gflops.png")).ndim == 3
    plt.close(figure)


def test_training_curves_give_losses_their_own_axes_the_target_and_whole_epochs():
    run = dtplib.common.paths.repo_path("results/flickr8k_ti/runs/learned-4x-seed0")
    figure = plots.training_curves(run)
    contrastive, boundary, compression, evaluation = figure.axes
    assert contrastive.get_yscale() == boundary.get_yscale() == "linear" and contrastive is not boundary
    assert contrastive.get_ylim()[0] > 1 and boundary.get_ylim()[1] < 1  # 3.4-5 and 0.01-0.3 on their own axes
    assert [line.get_ydata()[0] for line in compression.lines if line.get_label() == "target 4x"] == [4.0]
    figure.canvas.draw()
    ticks = evaluation.get_xticks()
    assert np.allclose(ticks, np.round(ticks))
    assert evaluation.get_legend() is not None and figure.legends  # outside the data
    box, legend = evaluation.get_window_extent(), evaluation.get_legend().get_window_extent()
    assert legend.x0 >= box.x1
    plt.close(figure)


def test_epoch_report_is_a_frame_with_units_in_percent():
    table = tables.epoch_report(dtplib.common.paths.repo_path("results/flickr8k_ti/runs/learned-4x-seed0"))
    epochs = pd.read_csv(dtplib.common.paths.repo_path("results/flickr8k_ti/runs/learned-4x-seed0/epochs.csv"))
    assert list(table["epoch"]) == list(range(1, len(epochs) + 1))
    assert {"step time (s)", "peak memory (MiB)", "zero-shot top-1 (%)", "text→image R@10 (%)"} <= set(table)
    assert table["text→image R@10 (%)"].tolist() == pytest.approx((100 * epochs["text_to_image_R@10"]).tolist())
    assert tables.chance_level("text_to_image_R@10", {"retrieval_images": 1000}) == pytest.approx(0.01)
    assert tables.chance_level("zeroshot_top1", {"zeroshot_classes": 10}) == pytest.approx(0.1)
    assert tables.chance_level("image_to_text_R@1", {"retrieval_images": 2, "retrieval_texts": 10}) == \
        pytest.approx(0.5)  # 5 of 10 texts match
    assert tables.chance_level("val_loss", {"retrieval_images": 1000}) is None


def test_methods_figure_draws_each_method_over_the_same_photos():
    """A column per method, a row per photo, each cell exactly that method's overlay: a dropped patch darkened to
    half, wrap ticks only where the groups are runs in raster order, titles with the tokens kept and a red note."""
    images = torch.full((2, 3, 16, 16), GREY / 255)  # mid-grey photos, identity normalisation
    runs = torch.tensor([[0, 0, 0, 1, 1, 1, *range(2, 12)]] * 2)  # run 1 leaves row 0 and comes back on row 1
    grouped = torch.tensor([[1, 2, 3, 0, 0, *range(4, 15)]] * 2)  # the same wrap, as a group of a 2-D grouping
    pruned = torch.tensor([[-1, *range(15)]] * 2)  # patch 0 dropped, every other patch its own token

    def record(ids):
        tokens = (ids.amax(1) + 1).long()
        return TraceRecord(boundaries=torch.zeros(ids.shape, dtype=torch.bool), segment_ids=ids,
                           probs=torch.zeros(ids.shape), tokens=tokens, compression=16 / tokens.float(),
                           boundary_loss=torch.zeros(()), grid=(4, 4))

    records = {"runs": record(runs), "grouped": record(grouped), "pruned": record(pruned)}
    figure = plots.methods_figure(images, records, (0, 0, 0), (1, 1, 1), notes={"grouped": "random init"}, scale=1)
    cells = np.array(figure.axes, dtype=object).reshape(2, 3)
    assert [ax.get_title().split("\n") for ax in cells[0]] == [["runs", "12 / 16 tokens"],
                                                               ["grouped", "15 / 16 tokens", "random init"],
                                                               ["pruned", "15 / 16 tokens"]]
    assert [ax.title.get_color() for ax in cells[0]] == ["black", "tab:red", "black"]
    assert "darkened: a dropped patch" in figure.get_supxlabel()
    pixels = np.full((16, 16, 3), GREY, dtype=np.uint8)
    for row in range(2):
        drawn = [np.asarray(ax.get_images()[0].get_array()) for ax in cells[row]]
        assert np.array_equal(drawn[0], plots.segment_overlay(pixels, runs[row], (4, 4)))
        assert np.array_equal(drawn[2], plots.segment_overlay(pixels, pruned[row], (4, 4), patch_order="grid"))
        assert (drawn[2][1:3, 1:3] == GREY // 2).all() and (drawn[2][5:7, 5:7] == GREY).all()  # dropped; kept
        assert (drawn[0] == plots.WRAP_COLOUR).all(-1).any()  # a run that wraps is marked
        assert not (drawn[1] == plots.WRAP_COLOUR).all(-1).any()  # a 2-D group is no run: nothing to mark
        assert (drawn[1][5:7, 1:3] != GREY).any(-1).all()  # ...but it is tinted
    assert plots.is_runs(runs) and not plots.is_runs(grouped) and not plots.is_runs(pruned)
    plt.close(figure)
    with pytest.raises(ValueError, match="fewer than"):
        plots.methods_figure(images, {"one image": record(runs[:1])}, (0, 0, 0), (1, 1, 1))
