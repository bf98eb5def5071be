"""The order in which a tower reads its patches into runs: raster (row by row) or along a Hilbert curve.

Segments are runs of consecutive patches. In raster order a run that reaches the right edge goes on at the far
left of the next row. Along a space-filling curve every run is spatially compact, and on a power-of-two grid
every aligned run of 4 is a 2x2 block, so uniform pooling every 4 patches is 2-D pooling.

`hilbert_order(rows, cols)` works for any grid (7x7 and 14x14 included): a generalised Hilbert curve that splits
the longer side in two (or, when the rectangle is close to square, into three parts whose middle part turns) so
that each part is again a rectangle walked from one corner to the adjacent one, and every step moves to a grid
neighbour. On 2^k x 2^k grids it is the classic Hilbert curve.
"""

from __future__ import annotations

import torch

PATCH_ORDERS = ("raster", "hilbert")  # DTPConfig.patch_order


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def _walk(x: int, y: int, ax: int, ay: int, bx: int, by: int, out: list[tuple[int, int]]) -> None:
    """Cover the rectangle with corner (x, y), major axis (ax, ay) and minor axis (bx, by), starting at the corner
    and ending next to the corner (x, y) + (ax, ay) - unit(a): cells appended to `out` as (x, y)."""
    width, height = abs(ax + ay), abs(bx + by)
    step_a, step_b = (_sign(ax), _sign(ay)), (_sign(bx), _sign(by))
    if height == 1 or width == 1:  # a single line: walk along the longer axis
        (dx, dy), length = (step_a, width) if height == 1 else (step_b, height)
        out.extend((x + i * dx, y + i * dy) for i in range(length))
        return
    half_a, half_b = (ax // 2, ay // 2), (bx // 2, by // 2)
    if 2 * width > 3 * height:  # long rectangle: two halves along the major axis
        if abs(sum(half_a)) % 2 and width > 2:  # keep the halves of even length, so the walk ends on the right side
            half_a = (half_a[0] + step_a[0], half_a[1] + step_a[1])
        _walk(x, y, *half_a, bx, by, out)
        _walk(x + half_a[0], y + half_a[1], ax - half_a[0], ay - half_a[1], bx, by, out)
        return
    if abs(sum(half_b)) % 2 and height > 2:
        half_b = (half_b[0] + step_b[0], half_b[1] + step_b[1])
    # near square: up the first half of the minor axis, across the whole major axis, back down to the last corner
    _walk(x, y, *half_b, *half_a, out)
    _walk(x + half_b[0], y + half_b[1], ax, ay, bx - half_b[0], by - half_b[1], out)
    _walk(x + (ax - step_a[0]) + (half_b[0] - step_b[0]), y + (ay - step_a[1]) + (half_b[1] - step_b[1]),
          -half_b[0], -half_b[1], -(ax - half_a[0]), -(ay - half_a[1]), out)


def hilbert_order(rows: int, cols: int) -> torch.Tensor:
    """Raster indices (row * cols + col) of a rows x cols grid in the order of a generalised Hilbert curve: a
    permutation of range(rows * cols) in which consecutive patches are grid neighbours."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a patch grid needs at least one row and column, got {rows} x {cols}")
    cells: list[tuple[int, int]] = []
    if cols >= rows:
        _walk(0, 0, cols, 0, 0, rows, cells)
    else:
        _walk(0, 0, 0, rows, cols, 0, cells)
    return torch.tensor([y * cols + x for x, y in cells], dtype=torch.long)


def patch_order(kind: str, rows: int, cols: int) -> torch.Tensor:
    """Raster indices of the grid's patches in reading order: `kind` is "raster" (the identity) or "hilbert"."""
    if kind == "raster":
        return torch.arange(rows * cols)
    if kind == "hilbert":
        return hilbert_order(rows, cols)
    raise ValueError(f"patch_order must be one of {PATCH_ORDERS}, got {kind!r}")
