"""Running a grid: each (arm, seed) a `python -m dtplib.train` child process (torchrun with nproc_per_node),
resumed where it stopped, and with a [finish] a second one that trains on from its last weights; then each complete
run's [final] evaluation, the [timing] benchmark of the main runs' last checkpoints and the [alignment] of boundaries
with object outlines.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from ..common.cli import stop_process
from ..common.files import LOCK_FILE, append_csv, atomic_write_text
from ..common.paths import child_environment, data_path
from ..common.provenance import run_info
from ..data.shards import from_captions
from ..measure import bench, evaluate
from ..training.config import TrainConfig
from .spec import (
    ALIGNMENT_FILE,
    FINAL_FILE,
    FINISH_DIR,
    ITEMS_FILE,
    RUNTIME_FLAGS,
    TIMING_FILE,
    Grid,
    epochs_done,
    final_argv,
    final_checkpoint,
    finish_dir,
    last_checkpoint,
    parse_options,
    run_complete,
    run_label,
    shown_path,
    stage_epochs,
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
    `epoch_latest.pt` after every epoch (--save-most-recent: what a resume continues from, and `last_checkpoint`).
    --allow-changed-flags: the driver has compared the run's flags itself (`_check_same_run`: only paths and runtime
    flags may differ), so a data folder that moved is recorded in the run's params.json history, not refused."""
    config = parse_options(grid.options(arm, seed), run_label(arm, seed))
    return config.replace(logs=str(runs_dir), name=run_label(arm, seed), resume="latest", save_most_recent=True,
                          allow_changed_flags=True)


def _finish_config(grid: Grid, arm: str, seed: int, runs_dir: Path) -> TrainConfig | None:
    """The TrainConfig of a run's [finish] (None without one): the grid's finish options, in `<run>/finish`, from
    the main run's last checkpoint (--pretrained: its weights; a new optimizer and schedule), resumed."""
    options = grid.finish_options(arm, seed)
    if options is None:
        return None
    label = run_label(arm, seed)
    config = parse_options(options, f"{label} [finish]")
    return config.replace(logs=str(runs_dir / label), name=FINISH_DIR, resume="latest", save_most_recent=True,
                          allow_changed_flags=True, pretrained=str(last_checkpoint(runs_dir / label)))


def _check_runs(grid: Grid, runs: list[tuple[str, int]], runs_dir: Path) -> None:
    """`TrainConfig.check` on every run and its finish, in this process, before any trains (data paths, model names,
    flag combinations; a finish's checkpoint to start from is made by its run): the first problem is one line
    naming the run."""
    for arm, seed in runs:
        finish = _finish_config(grid, arm, seed, runs_dir)
        configs = [("", _run_config(grid, arm, seed, runs_dir))]
        configs += [] if finish is None else [(" [finish]", finish.replace(pretrained=None))]
        for where, config in configs:
            try:
                config.check(grid.nproc_per_node)
            except (ValueError, OSError) as error:
                raise ValueError(f"{grid.path.name}: {run_label(arm, seed)}{where}: "
                                 f"{' '.join(str(error).split())}") from None


def _check_same_run(grid: Grid, arm: str, seed: int, run_dir: Path) -> None:
    """A run folder that already holds a run must hold this one, and its finish folder this finish: the flags the
    grid gives now (paths and runtime flags such as --threads may differ)."""
    _check_same_flags(run_dir, parse_options(grid.options(arm, seed), run_label(arm, seed)))
    finish = grid.finish_options(arm, seed)
    if finish is not None:
        _check_same_flags(finish_dir(run_dir), parse_options(finish, f"{run_label(arm, seed)} [finish]"))


def _check_same_flags(run_dir: Path, config: TrainConfig) -> None:
    params_file = run_dir / "params.json"
    if not params_file.is_file():
        return
    stored = TrainConfig.from_dict(json.loads(params_file.read_text())).flag_values()
    wanted = config.flag_values()
    ignored = (*RUNTIME_FLAGS, "name", "resume", "pretrained", "allow_changed_flags")
    changed = [k for k in wanted if k not in ignored and stored.get(k) != wanted[k]]
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


def _arm_epochs(grid: Grid) -> dict[str, tuple[int, int]]:
    """Each arm's --epochs of its main run and of its finish (0 without one): the counts that make a run complete."""
    return {arm: stage_epochs(grid, arm) for arm in grid.arms}


def run_grid(grid: Grid, out: Path, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
             max_runs: int | None = None) -> tuple[list[str], list[str]]:
    """Train the selected runs that are not complete (at most `max_runs` of them): the main run, then its [finish];
    each followed at once by its [final] evaluation (a session cut off later keeps it: checkpoints are not
    committed), then evaluate every other complete one without its final.json; returns the labels trained and
    evaluated. A run whose next step reads a checkpoint that is gone (its finish, or its evaluation) is refused
    before anything trains."""
    runs_dir = out / "runs"
    selected = grid.runs(arms, seeds)
    epochs = _arm_epochs(grid)

    def final_due(arm: str, seed: int) -> bool:
        run_dir = runs_dir / run_label(arm, seed)
        return bool(grid.final) and run_complete(run_dir, epochs[arm]) and not (run_dir / FINAL_FILE).is_file()

    todo = []
    for arm, seed in selected:
        run_dir = runs_dir / run_label(arm, seed)
        _check_same_run(grid, arm, seed, run_dir)
        if not run_complete(run_dir, epochs[arm]):
            todo.append((arm, seed))
            if epochs_done(run_dir) >= epochs[arm][0] and not last_checkpoint(run_dir).is_file():
                _refuse_lost(run_dir, "its [finish] starts from", last_checkpoint(run_dir))
        elif final_due(arm, seed) and not final_checkpoint(grid, arm, run_dir).is_file():
            _refuse_lost(run_dir, f"its [final] evaluation (no {FINAL_FILE} yet) reads",
                         final_checkpoint(grid, arm, run_dir))
    if max_runs is not None:
        todo = todo[:max_runs]
    trained, evaluated = [], []

    def evaluate_run(arm: str, seed: int) -> None:
        label = run_label(arm, seed)
        print(f"final evaluation of {label}", flush=True)
        _run_child("dtplib.evaluate", final_argv(grid.final, final_checkpoint(grid, arm, runs_dir / label),
                                                runs_dir / label / FINAL_FILE, runs_dir / label / ITEMS_FILE), label)
        evaluated.append(label)

    if todo or any(final_due(arm, seed) for arm, seed in selected):  # [final] may read the shards it makes
        _prepare_data(grid)
    if todo:
        _check_runs(grid, todo, runs_dir)
        atomic_write_text(out / ".gitignore", "".join(f"runs/*/{sub}{kind}/\n" for sub in ("", f"{FINISH_DIR}/")
                                                      for kind in ("checkpoints", "tensorboard"))
                          + "".join(f"runs/*/{sub}{LOCK_FILE}\n" for sub in ("", f"{FINISH_DIR}/")))
    for index, (arm, seed) in enumerate(todo):
        label = run_label(arm, seed)
        print(f"[{index + 1}/{len(todo)}] training {label}", flush=True)
        stages = [(_run_config(grid, arm, seed, runs_dir), epochs[arm][0], label)]
        finish = _finish_config(grid, arm, seed, runs_dir)
        stages += [] if finish is None else [(finish, epochs[arm][1], f"{label} [finish]")]
        for config, wanted, name in stages:
            folder = Path(config.logs) / config.name
            if epochs_done(folder) >= wanted:
                continue
            if config is finish:
                print(f"finishing {label}: {wanted} epoch{'s' if wanted != 1 else ''} from its last weights",
                      flush=True)
            _run_child("dtplib.train", config.to_argv(), name, grid.nproc_per_node)
            if epochs_done(folder) < wanted:
                raise RunFailed(f"run {name} ended with {epochs_done(folder)} of {wanted} epochs in its epochs.csv "
                                "(its flags stop it early, e.g. --max-steps?)")
        trained.append(label)
        if final_due(arm, seed):
            evaluate_run(arm, seed)
    for arm, seed in selected:  # finished earlier, their evaluation not (a grid killed while it evaluated)
        if final_due(arm, seed):
            evaluate_run(arm, seed)
    evaluated += _add_items(grid, out, selected)
    return trained, evaluated


def _add_items(grid: Grid, out: Path, selected: list[tuple[str, int]]) -> list[str]:
    """Per-item scores for the complete runs evaluated before [final] wrote them (a final.json, no final_items.npz):
    [final] again on the same checkpoint, its final.json kept and the new one checked against it (the same metrics,
    to rounding), else refused. Runs whose checkpoint is gone keep no per-item scores (one line says how many)."""
    if not grid.final:
        return []
    epochs, done, lost = _arm_epochs(grid), [], []
    for arm, seed in selected:
        label = run_label(arm, seed)
        run_dir = out / "runs" / label
        if not ((run_dir / FINAL_FILE).is_file() and not (run_dir / ITEMS_FILE).is_file()
                and run_complete(run_dir, epochs[arm])):
            continue
        checkpoint = final_checkpoint(grid, arm, run_dir)
        if not checkpoint.is_file():
            lost.append(label)
            continue
        if not done:
            _prepare_data(grid)  # [final] may read the shards it makes
        print(f"per-item scores of {label}: its [final] evaluation again", flush=True)
        again = run_dir / f"{FINAL_FILE}.again"
        _run_child("dtplib.evaluate", final_argv(grid.final, checkpoint, again, run_dir / ITEMS_FILE), label)
        kept, new = (json.loads(path.read_text())["metrics"] for path in (run_dir / FINAL_FILE, again))
        again.unlink()
        differ, refitted = compare_finals(kept, new)
        if differ:
            (run_dir / ITEMS_FILE).unlink()
            raise RunFailed(f"run {label}: [final] on {shown_path(checkpoint)} now gives {differ[0]}="
                            f"{new.get(differ[0])!r}, its final.json {kept[differ[0]]!r}: not the model that was "
                            "evaluated; no per-item scores kept")
        if refitted:  # the scores of the old fit are not known: that metric gets no bootstrap over items
            items = evaluate.read_items(run_dir / ITEMS_FILE)
            evaluate.write_items(run_dir / ITEMS_FILE, {k: v for k, v in items.items() if k not in refitted})
            print(f"{label}: the linear probe's new fit differs from its final.json ({', '.join(refitted)}): its "
                  "per-item scores are left out", flush=True)
        done.append(label)
    if lost:
        print(f"{len(lost)} complete runs have no per-item scores and no checkpoint to score them again (e.g. "
              f"{lost[0]}): their contrasts get no bootstrap over test items", flush=True)
    return done


def compare_finals(kept: dict, new: dict) -> tuple[list[str], list[str]]:
    """A final.json's metrics against a new evaluation of the same checkpoint: (the metrics that differ, which say
    it is not the model that was evaluated; the per-item metrics to leave out). The linear probe is refitted by
    L-BFGS, whose float sums differ between CPUs, so a probe that differs alone leaves out probe_top1/top5; every
    other metric (retrieval, zero-shot and val_loss, computed from the model alone) must agree to rounding."""
    changed = [k for k in kept if not _same_number(kept[k], new.get(k))]
    refitted = [k for k in changed if k.startswith("probe_")]
    return [k for k in changed if k not in refitted], (["probe_top1", "probe_top5"] if refitted else [])


def _same_number(kept, new) -> bool:
    """Two final.json values alike to rounding (numbers within 1e-5 relative; anything else equal)."""
    if isinstance(kept, (int, float)) and isinstance(new, (int, float)):
        return math.isclose(kept, new, rel_tol=1e-5, abs_tol=1e-9) or (math.isnan(kept) and math.isnan(new))
    return kept == new


def _refuse_lost(run_dir: Path, step: str, checkpoint: Path) -> None:
    """The one-line refusal of a finished training whose next step reads a checkpoint that is gone."""
    raise ValueError(f"{shown_path(run_dir)} is finished, but the checkpoint {step} is gone "
                     f"({checkpoint.relative_to(run_dir)}: checkpoints are not committed): delete that run folder to "
                     "retrain it")


def _timed_runs(grid: Grid, out: Path) -> dict[str, Path]:
    """[timing]: arm -> last checkpoint of its main run with the timing seed (not its finish's: the main run's step
    is what the run's training is mostly made of), when every such run is complete (else {})."""
    seed, epochs = grid.timing["seed"], _arm_epochs(grid)
    runs = {arm: out / "runs" / run_label(arm, s) for arm, s in grid.runs() if s == seed}
    for arm, run_dir in runs.items():
        if not run_complete(run_dir, epochs[arm]):
            return {}
    return {arm: last_checkpoint(run_dir) for arm, run_dir in runs.items()}


def time_runs(grid: Grid, out: Path) -> bool:
    """[timing]: the whole training step of every arm's main run's last checkpoint (the timing seed), timed in turn
    in this process, into step_times.csv; once, when all of them are complete and the file does not cover them
    yet."""
    checkpoints = _timed_runs(grid, out) if grid.timing else {}
    path = out / TIMING_FILE
    if not checkpoints or (path.is_file() and set(pd.read_csv(path)["arm"]) == set(checkpoints)):
        return False
    gone = [arm for arm, checkpoint in checkpoints.items() if not checkpoint.is_file()]
    if gone:  # the benchmark times every arm on one machine, or none: a partial one would mix machines
        print(f"[timing] not run: {len(gone)} of the timed checkpoints are gone (e.g. "
              f"{shown_path(checkpoints[gone[0]])}; checkpoints are not committed): time a seed whose runs are all "
              "kept", flush=True)
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
                if run_complete(out / "runs" / run_label(arm, seed), epochs[arm])]
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
        if not final_checkpoint(grid, arm, run_dir).is_file():
            _refuse_lost(run_dir, "its [alignment] reads", final_checkpoint(grid, arm, run_dir))


def align_runs(grid: Grid, out: Path) -> list[str]:
    """[alignment]: each finished run of its arms without rows in alignment.csv gets them (`dtplib.viz.alignment`
    of its final checkpoint, the finish's with a [finish], on the COCO folder, with arm, seed, run and provenance
    columns); each `overlays` arm's overlay_seed run, once finished, gets overlays/<arm>/ (`dtplib.viz.draw_overlays`).
    Returns the runs done."""
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
        model, preprocess, _ = evaluate.load_model(checkpoint=final_checkpoint(grid, arm, out / "runs" / label))
        table = viz.alignment(model, preprocess, data_path(spec["coco"]), spec["num_images"], spec["batch_size"],
                              spec["draws"])
        table = table.assign(arm=arm, seed=seed, run=label, **provenance)
        append_csv(path, table.to_dict("records"))
    for arm, seed in drawn:
        label = run_label(arm, seed)
        print(f"boundary overlays of {label}", flush=True)
        model, preprocess, _ = evaluate.load_model(checkpoint=final_checkpoint(grid, arm, out / "runs" / label))
        viz.draw_overlays(model, preprocess, data_path(spec["overlay_images"]), out / "overlays" / arm,
                          batch_size=spec["batch_size"])
    return [run_label(a, s) for a, s in todo]
