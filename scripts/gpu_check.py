"""One command for a GPU machine without network: `make gpu-check` (scripts/gpu_check.sh installs the wheels of
.whl/, then runs this file). Within 9 minutes on one H100: `pytest -m gpu`, the benchmark eager and compiled, and a
200-step compiled training smoke run, all written to one folder.

Read top to bottom:
1. Sizing: what fits in 540 s, and why the pieces are what they are.
2. `plan`: the pieces in priority order, each a command, a timeout and the file it must leave; `--tiny` gives the
   same pieces at CPU sizes (the test of this script), `--dry-run` prints them.
3. `run_piece`: one piece in its own process group, killed at its timeout; a global deadline cuts every timeout
   to the time left, so the whole run stays within the budget whatever a piece does.
4. The folder (`$OUT` when set, else results/gpu_check/<time>): summary.md (which pieces ran, passed, failed or
   timed out, and a short table), gpu_check.log (every piece's output), pieces.csv, bench.csv (every bench row,
   with its piece) and train_steps.csv: few files, as the GPU machine sends back at most 8.

Only the standard library, so that it runs, and writes its summary, even where the environment is broken.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"  # the embedded COCO sample (239 photos, 160 px): the only data that travels

# ----------------------------------------------------------------------------------------------------------
# 1. Sizing (one H100, 16 CPU cores; the GPU machine is lent for 9 minutes of which the set-up takes seconds)
#
# - Inductor compiles a ViT-B CLIP training step (forward and backward, static shapes) in about 40-90 s, and every
#   model and every batch shape is a graph of its own: six models at three shapes would be 12-27 minutes of
#   compiling alone. So the required pieces compile at B/32 batch 256 only, in the clip step only (the image-tower
#   step would compile each model a second time), and only the headline: the same-code 1x, learned (the threshold
#   rule with the capacity cap) and batch-topk, 200 s for three compiles. A bench run that times out leaves no
#   rows, so the peers (topk, uniform, FLIP) are a piece of their own, beside a 1x of their own (a second compile
#   of the 1x comes out of inductor's cache in seconds).
# - Eager pieces cost their set-up (imports, six models, the photos decoded once per run, the predictor's prior-only
#   fit on cached pre-layer tokens, shared by the learned rows: seconds) and 12 steps per model and mode: 40-50 s.
# - Warm-up 2 (the first step compiles, the second runs the compiled graph once more) and 10 timed steps: a B/32
#   step takes 30-300 ms on an H100, so timing is not the cost, and 10 steps give the median to a few per cent.
# - The training smoke run compiles one more graph (B/32 4x at batch 64) and runs 200 steps of ~50 ms, its loader
#   (4 workers) decoding the sample's small JPEGs while it compiles: ~100 s.
# - pytest -m gpu collects the test files that hold gpu tests only (the others import packages the GPU machine
#   lacks): ~30 s.
# The required pieces' timeouts add up to less than the budget (540 s, counted from the start of gpu_check.sh, so
# that installing the wheels is inside it). Stretch pieces run only in the time the
# required ones left unspent, each cut to what is left, in this order: the compiled peers at B/32 batch 256, then
# the compiled headline at B/32 batch 1024 and at B/16 batch 256. `--pieces` runs any of them alone.
BUDGET_S = 540
TINY_BUDGET_S = 3600  # CPU: inductor compiles a Ti CLIP in 1-3 minutes on two cores
STRETCH_MIN_S = 60  # a stretch piece with less time left than this is skipped: it could not finish


@dataclass
class Piece:
    name: str
    what: str  # one line for the summary
    command: list[str]
    timeout_s: int
    output: str  # the file it must leave, relative to the work folder
    stretch: bool = False  # runs only in the time that the required pieces left


HEADLINE = ("DTP-{arch}-1x", "DTP-{arch}-4x", "DTP-{arch}-4x+batch-topk")  # 1x, learned (capacity cap), batch-topk
PEERS = ("DTP-{arch}-1x", "DTP-{arch}-4x+topk", "DTP-{arch}-4x+uniform", "{arch}+pd0.5")  # beside the same-code 1x
EVERY_MODEL = (*HEADLINE, *PEERS[1:])


def gpu_test_files() -> list[str]:
    """Test files with a `pytest.mark.gpu` test, relative to the repository."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def train_shards() -> str:
    """The sample's training shards in brace notation, from its stats.json."""
    stats = json.loads((SAMPLE / "stats.json").read_text())
    return str((SAMPLE / stats["splits"]["train"]["shards"]).relative_to(REPO))


# ----------------------------------------------------------------------------------------------------------
# 2. The plan


def plan(work: Path, tiny: bool = False, python: str = sys.executable) -> list[Piece]:
    """The pieces in priority order; commands run in the repository with DTPLIB_DATA = work/data."""
    if tiny:  # CPU: one Ti shape everywhere, so that compiled graphs repeat (inductor's cache) and the run is short
        shapes = {"b32_256": ("ViT-Ti-8-64", 4), "b32_1024": ("ViT-Ti-8-64", 4), "b16_256": ("ViT-Ti-8-64", 4)}
        timing = ["--precision", "fp32", "--warmup", "1", "--steps", "2", "--prior-steps", "10", "--threads", "1",
                  "--no-memory"]
        timeouts = {"setup": 120, "pytest": 300, "eager": 300, "compiled": 1200, "train": 900}
    else:
        shapes = {"b32_256": ("ViT-B-32", 256), "b32_1024": ("ViT-B-32", 1024), "b16_256": ("ViT-B-16", 256)}
        timing = ["--precision", "bf16", "--warmup", "2", "--steps", "10"]
        timeouts = {"setup": 20, "pytest": 45, "eager": 50, "compiled": 200, "train": 115}

    def bench(shape: str, models: tuple[str, ...], compiled: bool, modes: str = "clip", suffix: str = "",
              stretch: bool = False) -> Piece:
        arch, batch = shapes[shape]
        if tiny and shape != "b32_256":  # the same Ti shape again: its command, not every model, is what is tested
            models = models[:2]
        name = f"{shape}_{'compiled' if compiled else 'eager'}{suffix}"
        labels = [model.format(arch=arch) for model in models]
        command = [python, "-m", "dtplib.bench", "--models", ",".join(labels), "--batch-size", str(batch),
                   "--modes", modes, *timing, *(["--torchcompile"] if compiled else []), "--out", str(work / name)]
        kinds = [label.removeprefix(f"DTP-{arch}-").removeprefix(f"{arch}+") for label in labels]  # 1x, ..., pd0.5
        what = (f"{arch} batch {batch}, {'compiled' if compiled else 'eager'}, {modes.replace(',', ' + ')}: "
                f"{', '.join(kinds)}")
        return Piece(name, what, command, timeouts["compiled" if compiled else "eager"], f"{name}.csv", stretch)

    unpack = ("import json, sys, torch; from dtplib.data.shards import SAMPLE_DIR, unpack_shards; "
              "unpack_shards(sorted(str(p) for p in SAMPLE_DIR.glob('*/*.tar')), sys.argv[1]); "
              "cuda = torch.cuda.is_available(); "
              "print(json.dumps({'torch': torch.__version__, 'python': sys.version.split()[0], "
              "'device': torch.cuda.get_device_name() if cuda else 'cpu'}))")
    arch, batch, steps = ("ViT-Ti-8-64", 4, 5) if tiny else ("ViT-B-32", 64, 200)
    train = [python, "-m", "dtplib.train", "--train-data", train_shards(), "--dataset-resampled",
             "--train-num-samples", str(batch * steps), "--epochs", "1", "--max-steps", str(steps),
             "--model", arch, "--compression", "4", "--batch-size", str(batch), "--torchcompile",
             "--precision", "fp32" if tiny else "bf16", "--warmup", "10", "--workers", "0" if tiny else "4",
             "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "none", "--log-every-n-steps", "20",
             "--logs", str(work / "train"), "--name", "smoke", *(["--threads", "1"] if tiny else [])]
    return [
        Piece("setup", "unpack the sample into DTPLIB_DATA/flickr8k; versions and device", [
            python, "-c", unpack, str(work / "data" / "flickr8k")], timeouts["setup"], "data/flickr8k/captions.tsv"),
        Piece("pytest_gpu", "pytest -m gpu", [
            python, "-m", "pytest", "-m", "gpu", "-q", "-ra", "-p", "no:cacheprovider", "--junitxml",
            str(work / "pytest.xml"), *(gpu_test_files() or ["tests"])], timeouts["pytest"], "pytest.xml"),
        bench("b32_256", EVERY_MODEL, compiled=False, modes="clip,image"),
        bench("b32_256", HEADLINE, compiled=True),
        Piece("train", f"{steps} training steps, {arch} 4x, batch {batch}, compiled", train, timeouts["train"],
              "train/smoke/steps.csv"),
        bench("b32_1024", EVERY_MODEL, compiled=False),
        bench("b16_256", EVERY_MODEL, compiled=False),
        bench("b32_256", PEERS, compiled=True, suffix="_peers", stretch=True),
        bench("b32_1024", HEADLINE, compiled=True, stretch=True),
        bench("b16_256", HEADLINE, compiled=True, stretch=True),
    ]


# ----------------------------------------------------------------------------------------------------------
# 3. Running a piece


@dataclass
class Outcome:
    name: str
    status: str  # passed, failed, timed out, skipped
    wall_s: float
    timeout_s: float
    note: str = ""


def run_piece(piece: Piece, work: Path, env: dict, time_left: float, log) -> Outcome:
    """Run one piece under min(its timeout, the time left); its output goes to `log`. A stretch piece with less
    than STRETCH_MIN_S left is skipped; a piece past its timeout is killed with its whole process group (the
    loader's workers and inductor's compile workers included)."""
    timeout = min(piece.timeout_s, time_left)
    if timeout < (STRETCH_MIN_S if piece.stretch else 1):
        return Outcome(piece.name, "skipped", 0.0, 0.0, f"{time_left:.0f} s left")
    log.write(f"\n===== {piece.name}: {piece.what} (timeout {timeout:.0f} s)\n$ {shlex.join(piece.command)}\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(piece.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        return Outcome(piece.name, "timed out", time.monotonic() - start, timeout)
    wall = time.monotonic() - start
    if code != 0:
        return Outcome(piece.name, "failed", wall, timeout, f"exit code {code}")
    if not (work / piece.output).is_file():
        return Outcome(piece.name, "failed", wall, timeout, f"no {piece.output}")
    return Outcome(piece.name, "passed", wall, timeout)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the piece's process group, SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------------------------------------
# 4. The folder: summary.md, pieces.csv, bench.csv, train_steps.csv, gpu_check.log


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def number(text: str, digits: int) -> str:
    try:
        return f"{float(text):.{digits}f}"
    except (TypeError, ValueError):
        return ""


def bench_table(rows: list[dict]) -> list[str]:
    """The short table: the clip step of every bench piece (the image-tower rows are in bench.csv)."""
    lines = ["| piece | model | compile (s) | median step (s) | images/s | compression | speed-up | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("mode") == "clip":
            compiled = r.get("compiled") == "True"
            lines.append(f"| {r['piece']} | {r['model']} | {number(r.get('compile_s'), 1) if compiled else ''} | "
                         f"{number(r['median_s'], 4)} | {number(r['images_per_s'], 0)} | "
                         f"{number(r['realised_compression'], 2)} | {number(r['speedup'], 2)}x | "
                         f"{number(r['analytic_bound'], 2)}x |")
    return lines


def train_line(steps: list[dict]) -> str:
    """Steps, the first step (it compiles), the median of the rest, the last loss, compression and memory."""
    if not steps:
        return "no steps logged"
    times = [float(r["step_time_s"]) for r in steps]
    compression = [float(r["compression"]) for r in steps if r.get("compression")]
    return (f"{len(steps)} steps; first step {times[0]:.1f} s (compiles); median step after 5: "
            f"{statistics.median(times[5:] or times):.3f} s; last loss {number(steps[-1]['loss'], 3)}; mean "
            f"compression {number(statistics.fmean(compression) if compression else '', 2)}; peak memory "
            f"{number(steps[-1].get('peak_memory_mb'), 0)} MiB")


def pytest_line(log_text: str) -> str:
    """pytest's closing line, e.g. '1 passed, 2 deselected in 31.20s', or why it could not run."""
    if "No module named pytest" in log_text:
        return ("pytest is not installed: add its wheels to .whl/ (../shared/gpu/wheels.sh pytest iniconfig pluggy "
                "pygments packaging)")
    lines = [line.strip("= ") for line in log_text.splitlines() if " in " in line and any(
        word in line for word in ("passed", "failed", "skipped", "deselected", "error", "no tests ran"))]
    return lines[-1] if lines else ""


def write_folder(out: Path, work: Path, pieces: list[Piece], outcomes: list[Outcome], info: dict,
                 budget: float, started: float) -> None:
    """Everything the run has so far; called after every piece, so a run cut short still leaves its summary."""
    out.mkdir(parents=True, exist_ok=True)
    done = {o.name: o for o in outcomes}
    write_rows(out / "pieces.csv", [
        {"piece": p.name, "what": p.what, "stretch": p.stretch, "status": done[p.name].status if p.name in done
         else "not run", "wall_s": f"{done[p.name].wall_s:.1f}" if p.name in done else "", "timeout_s": p.timeout_s,
         "note": done[p.name].note if p.name in done else "", "command": shlex.join(p.command)} for p in pieces])
    bench_rows = []
    for piece in pieces:
        path = work / piece.output
        if piece.name.startswith(("b32_", "b16_")) and path.is_file():
            bench_rows += [{"piece": piece.name, **row} for row in read_rows(path)]
    if bench_rows:
        write_rows(out / "bench.csv", bench_rows)
    steps_file = work / "train" / "smoke" / "steps.csv"
    steps = read_rows(steps_file) if steps_file.is_file() else []
    if steps:
        shutil.copyfile(steps_file, out / "train_steps.csv")
    log_text = (out / "gpu_check.log").read_text(errors="replace") if (out / "gpu_check.log").is_file() else ""
    lines = [f"# gpu-check {datetime.now():%Y-%m-%d %H:%M}", "",
             f"Device: {info.get('device', '?')}; torch {info.get('torch', '?')}; Python {info.get('python', '?')}; "
             f"commit {info.get('commit', '?')}. Budget {budget:.0f} s, used {time.time() - started:.0f} s.", "",
             "| piece | what | status | wall (s) | timeout (s) | note |", "|---|---|---|---|---|---|"]
    for p in pieces:
        o = done.get(p.name)
        lines.append(f"| {p.name} | {p.what}{' (stretch)' if p.stretch else ''} | {o.status if o else 'not run'} | "
                     f"{f'{o.wall_s:.0f}' if o else ''} | {p.timeout_s} | {o.note if o else ''} |")
    if "pytest_gpu" in done:
        lines += ["", f"pytest -m gpu: {pytest_line(log_text) or done['pytest_gpu'].status}"]
    if "train" in done:
        lines += ["", f"Training smoke run: {train_line(steps)}"]
    if bench_rows:
        lines += ["", "Benchmark, whole CLIP training step (bench.csv has every column and the image-tower rows):",
                  "", *bench_table(bench_rows)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "results" / "gpu_check" / \
        f"{datetime.now():%Y%m%d_%H%M%S}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="the folder it all goes to; default $OUT, else results/gpu_check/<time>")
    p.add_argument("--tiny", action="store_true", help="CPU sizes: Ti-8-64 at batch 4, 2 steps, 5 training steps")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--pieces", default=None, help="comma-separated piece names to run (default: all, stretch last)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all pieces (default {BUDGET_S}; --tiny {TINY_BUDGET_S})")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (photos, bench outputs, the run)")
    args = p.parse_args(argv)
    budget = args.budget if args.budget is not None else TINY_BUDGET_S if args.tiny else BUDGET_S
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    pieces = plan(work, args.tiny)
    if args.pieces:
        wanted = [name.strip() for name in args.pieces.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {piece.name for piece in pieces})
        if unknown:
            p.error(f"unknown pieces {unknown}; the plan has {[piece.name for piece in pieces]}")
        pieces = [piece for piece in pieces if piece.name in wanted or piece.name == "setup"]  # setup: the data
    if args.dry_run:
        shutil.rmtree(work)
        if args.json:
            print(json.dumps({"budget_s": budget, "pieces": [asdict(piece) for piece in pieces]}, indent=1))
        else:
            for piece in pieces:
                print(f"{piece.name} ({'stretch, ' if piece.stretch else ''}timeout {piece.timeout_s} s, "
                      f"leaves {piece.output}): {piece.what}\n  {shlex.join(piece.command)}")
            required = sum(piece.timeout_s for piece in pieces if not piece.stretch)
            print(f"required timeouts: {required} s of a {budget:.0f} s budget; stretch pieces use what is left")
        return 0
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DTPLIB_DATA": str(work / "data"), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
        "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = float(os.environ.get("GPU_CHECK_STARTED", time.time()))  # set by gpu_check.sh
    info, outcomes = {"commit": git_commit()}, []
    try:
        with (out / "gpu_check.log").open("a") as log:
            for piece in pieces:
                if piece.name != "setup" and outcomes and outcomes[0].status != "passed":  # no photos, no imports
                    outcome = Outcome(piece.name, "skipped", 0.0, 0.0, "setup did not pass")
                else:
                    outcome = run_piece(piece, work, env, budget - (time.time() - started), log)
                outcomes.append(outcome)
                if piece.name == "setup" and outcome.status == "passed":
                    info.update(last_json_line(out / "gpu_check.log"))
                print(f"[{datetime.now():%H:%M:%S}] {piece.name}: {outcome.status} in {outcome.wall_s:.0f} s"
                      f"{f' ({outcome.note})' if outcome.note else ''}", flush=True)
                write_folder(out, work, pieces, outcomes, info, budget, started)
    finally:
        if args.keep_work:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print((out / "summary.md").read_text())
    print(f"wrote {out}")
    stretch = {piece.name for piece in pieces if piece.stretch}  # may be skipped or cut short, never fail
    return 0 if all(o.status == "passed" or (o.name in stretch and o.status != "failed") for o in outcomes) else 1


def last_json_line(log_file: Path) -> dict:
    for line in reversed(log_file.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


if __name__ == "__main__":
    sys.exit(main())
