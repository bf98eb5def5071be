"""`make demo` end to end, and the suite's one run of the notebooks: `dtplib.demo.run_notebooks` executes every
numbered notebook headless under papermill, in order, into the layout `make demo` writes (<out>/NN_name.ipynb and
<out>/NN_name/), and every output the notebook promises is there and non-empty.

Under `make test` each notebook gets the small parameters of test_notebooks.SMOKE (about 3 minutes on 2 cores).
`make test-demo` runs this test alone with `--demo-defaults`: the notebooks' own CPU-sized defaults, exactly what
`make demo` runs, within its 15-minute limit (3-4 minutes on 2 cores). `make test-fast` leaves it out with the
other slow tests."""

import time

import pytest
from test_notebooks import NOTEBOOKS, OUTPUTS, SMOKE

from dtplib.demo import run_notebooks


@pytest.mark.slow
@pytest.mark.demo
def test_make_demo_writes_every_promised_output(tmp_path, request, capsys):
    defaults = request.config.getoption("--demo-defaults")
    start = time.perf_counter()
    timings = run_notebooks(str(tmp_path), parameters=None if defaults else SMOKE)
    assert [name for name, _ in timings] == [p.stem for p in NOTEBOOKS]
    said = capsys.readouterr().out  # a line before and after each notebook: which, where to, how long, what it wrote
    for number, notebook in enumerate(NOTEBOOKS, 1):
        assert f"[{number}/{len(NOTEBOOKS)}] running notebooks/{notebook.name} -> {tmp_path / notebook.stem}/" in said
        assert f"[{number}/{len(NOTEBOOKS)}] {notebook.stem} done in " in said
    for notebook in NOTEBOOKS:
        executed = tmp_path / notebook.name
        assert executed.is_file() and executed.stat().st_size > 0
        for name in OUTPUTS.get(notebook.stem, []):
            output = tmp_path / notebook.stem / name
            assert output.is_file() and output.stat().st_size > 0, f"{notebook.stem}: no {name}"
    assert time.perf_counter() - start < 15 * 60, "make demo must finish in under 15 minutes on 2 cores"


def test_parameters_go_to_the_notebooks_they_name(tmp_path):
    with pytest.raises(ValueError, match="notebooks that do not exist: 02_modle"):
        run_notebooks(str(tmp_path), parameters={"02_modle": {"num_images": 8}})
    assert not any(tmp_path.iterdir())  # checked before any notebook runs
