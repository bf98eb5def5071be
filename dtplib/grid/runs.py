"""Running a grid: each (arm, seed) a `python -m dtplib.train` child process (torchrun with nproc_per_node),
resumed where it stopped; then each complete run's [final] evaluation, the [timing] benchmark of the final
checkpoints and the [alignment] of boundaries with object outlines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from ..common.cli import stop_process
from ..common.files import append_csv, atomic_write_text
from ..common.paths import child_environment, data_path
from ..common.provenance import run_info
from ..data.shards import from_captions
from ..measure import bench, evaluate
from ..training.config import TrainConfig
from .spec import (
    ALIGNMENT_FILE,
    FINAL_FILE,
    RUNTIME_FLAGS,
    TIMING_FILE,
    Grid,
    epochs_done,
    final_argv,
    last_checkpoint,
    parse_options,
    run_label,
    shown_path,
)


class RunFailed(RuntimeError):
    """A `dtplib.train` child process ended with an error: the grid stops there (its message names the run)."""


def _prepare_data(grid: Grid) -> None:
    """[data.from_captions]: the shards, written once (kept when their stats.json exists)."""
    if not grid.data:
        return
    options = dict(grid.data["from_captions"])
    for key in ("images", "captions", "out"):
        options[key] = data_path(options[key])
    stats_file = options["out"] / "stats.json"
    if stats_file.is_file():  # made before: by the same options, or refused
        made = json.loads(stats_file.read_text()).get("options", {})
        for key, value in options.items():
            if key in made and made[key] != value:
                raise ValueError(f"{stats_file.parent} holds shards made with {key}={made[key]!r}, the grid's "
                                 f"[data.from_captions] gives {value!r}: change its out, or delete the folder")
        return
    print(f"preparing shards in {options['out']}", flush=True)
    from_captions(options.pop("images"), options.pop("captions"), options.pop("out"), **options)


def _run_config(grid: Grid, arm: str, seed: int, runs_dir: Path) -> TrainConfig:
    """The TrainConfig of one run: the grid's options for it, in `<runs_dir>/<arm>-seed<seed>`, resumed, with
    `epoch_latest.pt` after every epoch (--save-most-recent: what a resume continues from, and `last_checkpoint`)."""
    config = parse_options(grid.options(arm, seed), run_label(arm, seed))
    return config.replace(logs=str(runs_dir), name=run_label(arm, seed), resume="latest", save_most_recent=True)


def _check_runs(grid: Grid, runs: list[tuple[str, int]], runs_dir: Path) -> None:
    """`TrainConfig.check` on every run, in this process, before any trains (data paths, model names, flag
    combinations): the first problem is one line naming the run."""
    for arm, seed in runs:
        try:
            _run_config(grid, arm, seed, runs_dir).check(grid.nproc_per_node)
        except (ValueError, OSError) as error:
            raise ValueError(f"{grid.path.name}: {run_label(arm, seed)}: {' '.join(str(error).split())}") from None


def _check_same_run(grid: Grid, arm: str, seed: int, run_dir: Path) -> None:
    """A run folder that already holds a run must hold this one: the flags the grid gives now (paths and
    runtime flags such as --threads may differ)."""
    params_file = run_dir / "params.json"
    if not params_file.is_file():
        return
    stored = TrainConfig.from_dict(json.loads(params_file.read_text())).flag_values()
    wanted = parse_options(grid.options(arm, seed), run_label(arm, seed)).flag_values()
    changed = [k for k in wanted if k not in (*RUNTIME_FLAGS, "name", "resume") and stored.get(k) != wanted[k]]
    if changed:
        key = changed[0]
        raise ValueError(f"{run_dir} was trained with {key}={stored.get(key)!r}, the grid now gives "
                         f"{wanted[key]!r}: use another --out, or delete that run folder to retrain it")


def child_command(module: str, argv: list[str], nproc_per_node: int = 1) -> list[str]:
    """`python -m <module> argv`, or under torchrun with `nproc_per_node` > 1."""
    if nproc_per_node > 1:  # "--" ends torchrun's own flags (it would read --logs as its --logs-specs)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                "-m", module, "--", *argv]
    return [sys.executable, "-m", module, *argv]


def _run_child(module: str, argv: list[str], label: str, nproc_per_node: int = 1) -> None:
    """`child_command` (dtplib.train, dtplib.evaluate) in a child process; its output passes through, and an error
    ends the grid with the child's last line."""
    child = subprocess.Popen(child_command(module, argv, nproc_per_node), env=child_environment(),
                             stderr=subprocess.PIPE)
    tail: deque[bytes] = deque(maxlen=64)
    try:
        while chunk := os.read(child.stderr.fileno(), 4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.append(chunk)
        code = child.wait()
    except BaseException:  # Ctrl-C or an error here: the child must not train on alone
        stop_process(child)
        raise
    finally:
        child.stderr.close()
    if code != 0:
        lines = [line.strip() for line in b"".join(tail).decode(errors="replace").replace("\r", "\n").splitlines()
                 if line.strip()]
        errors = [line for line in lines if "error:" in line]
        raise RunFailed(f"run {label}: {module} exited with status {code}: "
                        f"{(errors or lines or ['no output'])[-1]}")


def _arm_epochs(grid: Grid) -> dict[str, int]:
    """Each arm's --epochs: the count that makes a run finished."""
    return {arm: parse_options(grid.options(arm, grid.seeds_of(arm)[0]), arm).epochs for arm in grid.arms}


def run_grid(grid: Grid, out: Path, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
             max_runs: int | None = None) -> tuple[list[str], list[str]]:
    """Train the selected runs that are not finished (at most `max_runs` of them), each followed at once by its
    [final] evaluation (a session cut off later keeps it: checkpoints are not committed), then evaluate every other
    finished one without its final.json; returns the labels trained and evaluated. A finished run that still needs
    its evaluation but whose checkpoint is gone is refused before anything trains."""
    runs_dir = out / "runs"
    selected = grid.runs(arms, seeds)
    epochs = _arm_epochs(grid)

    def final_due(arm: str, seed: int) -> bool:
        run_dir = runs_dir / run_label(arm, seed)
        return bool(grid.final) and epochs_done(run_dir) >= epochs[arm] and not (run_dir / FINAL_FILE).is_file()

    todo = []
    for arm, seed in selected:
        run_dir = runs_dir / run_label(arm, seed)
        _check_same_run(grid, arm, seed, run_dir)
        if epochs_done(run_dir) < epochs[arm]:
            todo.append((arm, seed))
        elif final_due(arm, seed) and not last_checkpoint(run_dir).is_file():
            raise ValueError(f"{shown_path(run_dir)} is finished but has no {FINAL_FILE}, and the checkpoint its "
                             f"[final] evaluation reads is gone ({last_checkpoint(run_dir).relative_to(run_dir)}: "
                             "checkpoints are not committed): delete that run folder to retrain it")
    if max_runs is not None:
        todo = todo[:max_runs]
    trained, evaluated = [], []

    def evaluate_run(arm: str, seed: int) -> None:
        label = run_label(arm, seed)
        print(f"final evaluation of {label}", flush=True)
        _run_child("dtplib.evaluate", final_argv(grid.final, last_checkpoint(runs_dir / label),
                                                runs_dir / label / FINAL_FILE), label)
        evaluated.append(label)

    if todo or any(final_due(arm, seed) for arm, seed in selected):  # [final] may read the shards it makes
        _prepare_data(grid)
    if todo:
        _check_runs(grid, todo, runs_dir)
        atomic_write_text(out / ".gitignore", "runs/*/checkpoints/\nruns/*/tensorboard/\n")
    for index, (arm, seed) in enumerate(todo):
        label = run_label(arm, seed)
        print(f"[{index + 1}/{len(todo)}] training {label}", flush=True)
        _run_child("dtplib.train", _run_config(grid, arm, seed, runs_dir).to_argv(), label, grid.nproc_per_node)
        done = epochs_done(runs_dir / label)
        if done < epochs[arm]:
            raise RunFailed(f"run {label} ended with {done} of {epochs[arm]} epochs in its epochs.csv (its flags "
                            "stop it early, e.g. --max-steps?)")
        trained.append(label)
        if final_due(arm, seed):
            evaluate_run(arm, seed)
    for arm, seed in selected:  # finished earlier, their evaluation not (a grid killed while it evaluated)
        if final_due(arm, seed):
            evaluate_run(arm, seed)
    return trained, evaluated


def _timed_runs(grid: Grid, out: Path) -> dict[str, Path]:
    """[timing]: arm -> last checkpoint of its run with the timing seed, when every such run is finished (else {})."""
    seed, epochs = grid.timing["seed"], _arm_epochs(grid)
    runs = {arm: out / "runs" / run_label(arm, s) for arm, s in grid.runs() if s == seed}
    for arm, run_dir in runs.items():
        if epochs_done(run_dir) < epochs[arm]:
            return {}
    return {arm: last_checkpoint(run_dir) for arm, run_dir in runs.items()}


def time_runs(grid: Grid, out: Path) -> bool:
    """[timing]: the whole training step of every arm's final checkpoint (the timing seed), timed in turn in this
    process, into step_times.csv; once, when all of them are finished and the file does not cover them yet."""
    checkpoints = _timed_runs(grid, out) if grid.timing else {}
    path = out / TIMING_FILE
    if not checkpoints or (path.is_file() and set(pd.read_csv(path)["arm"]) == set(checkpoints)):
        return False
    timing = grid.timing
    threads = grid.shared.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    batch_size = timing["batch_size"] or int(parse_options(grid.options(next(iter(checkpoints)), timing["seed"]),
                                                           "timing").batch_size)
    reference = grid.reference if grid.reference in checkpoints else None
    print(f"timing the final checkpoints of {len(checkpoints)} arms (seed {timing['seed']}, batch {batch_size})",
          flush=True)
    frame = bench.time_checkpoints(checkpoints, batch_size, timing["steps"], timing["warmup"], reference)
    frame.insert(0, "arm", frame.pop("model"))
    frame.insert(1, "seed", timing["seed"])
    atomic_write_text(path, frame.to_csv(index=False))
    return True


def check_alignment_data(grid: Grid) -> None:
    """[alignment]'s COCO folder (annotations/) and overlay photos exist before anything trains."""
    if not grid.alignment:
        return
    coco = data_path(grid.alignment["coco"])
    if not (coco / "annotations").is_dir():
        raise FileNotFoundError(f"[alignment] coco: {coco} has no annotations/ folder (a COCO folder with "
                                "annotations/instances_*.json and the image folders)")
    if grid.alignment["overlays"] and not data_path(grid.alignment["overlay_images"]).is_dir():
        raise FileNotFoundError(f"[alignment] overlay_images: folder not found: "
                                f"{data_path(grid.alignment['overlay_images'])}")


def _alignment_due(grid: Grid, out: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """[alignment]'s work left: the finished runs of its arms without rows in alignment.csv, and the finished
    overlay runs without their overlays.png."""
    spec, epochs, path = grid.alignment, _arm_epochs(grid), out / ALIGNMENT_FILE
    done = set(pd.read_csv(path)["run"]) if path.is_file() else set()
    finished = [(arm, seed) for arm, seed in grid.runs()
                if epochs_done(out / "runs" / run_label(arm, seed)) >= epochs[arm]]
    todo = [(a, s) for a, s in finished if a in spec["arms"] and run_label(a, s) not in done]
    drawn = [(a, s) for a, s in finished if a in spec["overlays"] and s == spec["overlay_seed"]
             and not (out / "overlays" / a / "overlays.png").is_file()]
    return todo, drawn


def check_alignment_checkpoints(grid: Grid, out: Path) -> None:
    """Every finished run that [alignment] still has to read keeps its last checkpoint (checked before training)."""
    if not grid.alignment:
        return
    todo, drawn = _alignment_due(grid, out)
    for arm, seed in dict.fromkeys([*todo, *drawn]):
        run_dir = out / "runs" / run_label(arm, seed)
        if not last_checkpoint(run_dir).is_file():
            raise ValueError(f"{shown_path(run_dir)} is finished, but the checkpoint its [alignment] reads is gone "
                             f"({last_checkpoint(run_dir).relative_to(run_dir)}: checkpoints are not committed): "
                             "delete that run folder to retrain it")


def align_runs(grid: Grid, out: Path) -> list[str]:
    """[alignment]: each finished run of its arms without rows in alignment.csv gets them (`dtplib.viz.alignment`
    of its last checkpoint on the COCO folder, with arm, seed, run and provenance columns); each `overlays` arm's
    overlay_seed run, once finished, gets overlays/<arm>/ (`dtplib.viz.draw_overlays`). Returns the runs done."""
    if not grid.alignment:
        return []
    from ..figures import viz

    spec, path = grid.alignment, out / ALIGNMENT_FILE
    todo, drawn = _alignment_due(grid, out)
    threads = grid.shared.get("threads")
    if (todo or drawn) and threads:
        torch.set_num_threads(int(threads))
    provenance = run_info("cpu", "fp32", spec["batch_size"])  # before the first append dirties alignment.csv
    for arm, seed in todo:
        label = run_label(arm, seed)
        print(f"boundary alignment of {label}", flush=True)
        model, preprocess, _ = evaluate.load_model(checkpoint=last_checkpoint(out / "runs" / label))
        table = viz.alignment(model, preprocess, data_path(spec["coco"]), spec["num_images"], spec["batch_size"],
                              spec["draws"])
        table = table.assign(arm=arm, seed=seed, run=label, **provenance)
        append_csv(path, table.to_dict("records"))
    for arm, seed in drawn:
        label = run_label(arm, seed)
        print(f"boundary overlays of {label}", flush=True)
        model, preprocess, _ = evaluate.load_model(checkpoint=last_checkpoint(out / "runs" / label))
        viz.draw_overlays(model, preprocess, data_path(spec["overlay_images"]), out / "overlays" / arm,
                          batch_size=spec["batch_size"])
    return [run_label(a, s) for a, s in todo]
