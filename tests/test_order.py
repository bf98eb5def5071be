"""Reading patches along a Hilbert curve, and towers trained with forced (uniform) boundaries."""

import json

import open_clip
import pytest
import torch
from conftest import QUIET, flickr_photos, write_shards
from test_train import read_csv

import dtplib
from dtplib import train
from dtplib.common.images import load_images
from dtplib.measure.evaluate import load_model
from dtplib.tower.order import hilbert_order, patch_order


def is_neighbour_walk(order: list[int], cols: int) -> bool:
    steps = zip(order[:-1], order[1:], strict=True)
    return all(abs(a // cols - b // cols) + abs(a % cols - b % cols) == 1 for a, b in steps)


def is_square_block(cells: list[int], cols: int, side: int) -> bool:
    rows, columns = {c // cols for c in cells}, {c % cols for c in cells}
    return (len(cells) == side * side and len(rows) == len(columns) == side
            and max(rows) - min(rows) == side - 1 and max(columns) - min(columns) == side - 1)


@pytest.mark.parametrize("rows, cols", [(8, 8), (7, 7), (14, 14), (16, 16), (3, 5), (5, 8), (1, 6)])
def test_hilbert_order_is_a_walk_over_every_patch(rows, cols):
    order = hilbert_order(rows, cols).tolist()
    assert sorted(order) == list(range(rows * cols))
    assert is_neighbour_walk(order, cols)


@pytest.mark.parametrize("side", [4, 8, 16])
def test_on_power_of_two_grids_aligned_runs_are_square_blocks(side):
    order = hilbert_order(side, side).tolist()
    for size in (2, 4):  # runs of 4 are 2x2 blocks, runs of 16 are 4x4 blocks
        assert all(is_square_block(order[i:i + size * size], side, size) for i in range(0, side * side, size * size))
    assert torch.equal(patch_order("raster", side, side), torch.arange(side * side))
    with pytest.raises(ValueError, match="patch_order must be one of"):
        patch_order("zigzag", side, side)


@pytest.fixture(scope="module")
def photos():
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-Ti-8-64")
    return load_images(flickr_photos(6), preprocess)  # 6 x 3 x 64 x 64


def test_hilbert_uniform_pooling_every_4_patches_is_2x2_pooling(photos):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", 4, patch_order="hilbert", forced_boundaries=4)
    tower = dtplib.get_tower(model)
    assert tower.predictor is None and tower.pools
    model.eval()
    with torch.no_grad(), dtplib.trace(model) as t:
        model.encode_image(photos)
    assert (t.tokens == 16).all() and t.last().patch_order == "hilbert"
    for ids in t.segment_ids:  # at grid positions: each segment is a 2x2 block of the 8x8 grid
        for segment in range(16):
            assert is_square_block(torch.nonzero(ids == segment).flatten().tolist(), 8, 2)


def test_trace_reports_grid_positions_and_forced_tensors_are_read_there(photos):
    model, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", 4, patch_order="hilbert")
    model.eval()
    order = hilbert_order(8, 8)
    forced = torch.zeros(len(photos), 64)
    forced[:, order[3::4]] = 1  # a boundary after every 4th patch along the curve, given at grid positions
    with torch.no_grad(), dtplib.forced_boundaries(model, forced), dtplib.trace(model) as t:
        model.encode_image(photos)
    assert torch.equal(t.boundaries, forced.bool())  # reported where it was given
    assert (t.tokens == 16).all()
    rows = t.segment_ids[0].reshape(8, 8)  # the segment map of image 0
    assert is_square_block(torch.nonzero(rows.flatten() == rows[0, 0]).flatten().tolist(), 8, 2)


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_hilbert_order_is_exact_with_every_patch_its_own_segment(photos, execution):
    """With all boundaries forced, reading order cannot matter: the layers are permutation-equivariant."""
    raster, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", 4, execution=execution)
    hilbert, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", 4, execution=execution, patch_order="hilbert")
    hilbert.load_state_dict(raster.state_dict())
    raster.eval(), hilbert.eval()
    with torch.no_grad(), dtplib.forced_boundaries(raster, "all"), dtplib.forced_boundaries(hilbert, "all"):
        torch.testing.assert_close(hilbert.encode_image(photos), raster.encode_image(photos), atol=1e-5, rtol=0)


def test_hilbert_packed_and_padded_agree_with_learned_boundaries(photos):
    packed, _, _ = dtplib.create_model_and_transforms("ViT-Ti-8-64", 4, patch_order="hilbert", upsample=True)
    packed.eval()
    with torch.no_grad(), dtplib.trace(packed) as t:
        a = packed.encode_image(photos)
        with dtplib.use_execution(packed, "padded"):
            b = packed.encode_image(photos)
    assert t.records[0].tokens.unique().numel() > 1  # images keep different numbers of segments
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_forced_boundary_training_keeps_the_budget_and_rebuilds_from_its_checkpoint(tmp_path):
    shards = write_shards(tmp_path / "shards", flickr_photos(32), per_shard=16)
    result = train.main(["--train-data", shards, "--logs", str(tmp_path), "--name", "uniform", *QUIET,
                         "--model", "ViT-Ti-8-64", "--forced-boundaries", "4", "--patch-order", "hilbert",
                         "--batch-size", "16", "--epochs", "2", "--warmup", "1"])
    steps = read_csv(result["run_dir"] / "steps.csv")
    assert len(steps) == 4 and {r["compression"] for r in steps} == {"4"}  # 64 / 16 at every step
    assert {r["boundary_loss"] for r in steps} == {"0"}  # no predictor, no prior
    params = json.loads((result["run_dir"] / "params.json").read_text())
    assert (params["dtp"]["forced_boundaries"], params["dtp"]["patch_order"]) == (4, "hilbert")
    model, preprocess, _ = load_model(checkpoint=result["checkpoint"])  # the checkpoint alone rebuilds it
    tower = dtplib.get_tower(model)
    assert tower.predictor is None and tower.dtp.forced_boundaries == 4 and tower.dtp.patch_order == "hilbert"
    with torch.no_grad(), dtplib.trace(model) as t:
        model.encode_image(load_images(flickr_photos(4), preprocess))
    assert (t.tokens == 16).all()


@pytest.mark.parametrize("flags, message", [
    (["--model", "ViT-Ti-8-64", "--forced-boundaries", "1"], "needs C >= 2"),
    (["--model", "ViT-Ti-8-64", "--forced-boundaries", "4", "--compression", "2"], "means compression 4"),
    (["--model", "DTP-ViT-Ti-8-64-2x", "--forced-boundaries", "4"], "not --forced-boundaries 4"),
    (["--model", "ViT-Ti-8-64", "--patch-order", "hilbert"], "need a DTP model"),
])
def test_forced_boundary_flags_are_checked_before_training(tmp_path, flags, message):
    shards = write_shards(tmp_path / "shards", flickr_photos(16), per_shard=16)
    with pytest.raises(ValueError, match=message):
        train.main(["--train-data", shards, "--logs", str(tmp_path), "--name", "bad", "--batch-size", "16",
                    *QUIET, *flags])
    assert not (tmp_path / "bad").exists()
