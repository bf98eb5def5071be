"""`make demo` end to end: every numbered notebook with its default (CPU-sized) parameters, outputs non-empty.

About 3-4 minutes on 2 cores: `make test` (CI) runs it, the whole suite staying within 15 minutes; `make test-demo`
runs it alone, `make test-fast` leaves it out with the other slow tests."""

import time

import pytest
from test_notebooks import NOTEBOOKS, OUTPUTS

from dtplib.demo import run_notebooks


@pytest.mark.slow
@pytest.mark.demo
def test_make_demo_writes_every_promised_output(tmp_path):
    start = time.perf_counter()
    timings = run_notebooks(str(tmp_path))
    assert [name for name, _ in timings] == [p.stem for p in NOTEBOOKS]
    for notebook in NOTEBOOKS:
        executed = tmp_path / notebook.name
        assert executed.is_file() and executed.stat().st_size > 0
        for name in OUTPUTS.get(notebook.stem, []):
            output = tmp_path / notebook.stem / name
            assert output.is_file() and output.stat().st_size > 0, f"{notebook.stem}: no {name}"
    assert time.perf_counter() - start < 15 * 60, "make demo must finish in under 15 minutes on 2 cores"
