"""`make gpu-check`, prepared on CPU: its plan fits the GPU machine's 9 minutes, its budget bounds a run whatever a
piece does, and every piece runs end to end at tiny sizes (scripts/gpu_check.sh --tiny)."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from dtplib.common.paths import REPO_ROOT
from dtplib.measure.specs import parse_spec

PRIORITY = ["setup", "pytest_gpu", "b32_256_eager", "b32_256_compiled", "train", "b32_1024_eager", "b16_256_eager"]


def gpu_check(*args: str, timeout: float = 120, shell: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    """The script as `make gpu-check` runs it, with this interpreter (its packages import: no wheels to install);
    `shell=False`: its Python part alone, whose budget then starts with it."""
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    env.pop("OUT", None)
    command = ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")] if shell else [
        sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py")]
    return subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_plan_fits_nine_minutes_in_priority_order():
    result = gpu_check("--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    pieces = {p["name"]: p for p in plan["pieces"]}
    assert list(pieces)[:len(PRIORITY)] == PRIORITY  # stretch pieces last
    assert all(p["command"] and p["timeout_s"] > 0 and p["output"] for p in pieces.values())
    required = [p for p in pieces.values() if not p["stretch"]]
    assert [p["name"] for p in required] == PRIORITY and plan["budget_s"] == 540
    assert sum(p["timeout_s"] for p in required) <= 540  # so the whole run fits 9 minutes, compiles included
    assert [p["name"] for p in pieces.values() if p["stretch"]] == ["b32_256_compiled_peers", "b32_1024_compiled",
                                                                    "b16_256_compiled"]

    assert pieces["pytest_gpu"]["command"][2:5] == ["pytest", "-m", "gpu"]
    benches = {name: p["command"] for name, p in pieces.items() if name.startswith(("b32", "b16"))}
    specs = {}
    for name, command in benches.items():
        specs[name] = [parse_spec(label) for label in flag(command, "--models").split(",")]  # labels the bench reads
        assert flag(command, "--precision") == "bf16" and flag(command, "--steps") == "10"
        assert ("--torchcompile" in command) == ("compiled" in name)
        assert flag(command, "--batch-size") == ("1024" if "1024" in name else "256")
        assert all(s.name.startswith(("DTP-ViT-B-16", "ViT-B-16") if name.startswith("b16") else
                                     ("DTP-ViT-B-32", "ViT-B-32")) for s in specs[name])
        assert specs[name][0].name.endswith("-1x")  # the same-code reference of the run's speed-ups
    every = ["", "", "batch-topk", "learned", "topk", "uniform"]  # 1x, FLIP 50%, and the DTP towers
    for name in ("b32_256_eager", "b32_1024_eager", "b16_256_eager"):
        assert sorted(s.boundaries for s in specs[name]) == every
        assert [s.patch_dropout for s in specs[name]].count(0.5) == 1
    compiled = specs["b32_256_compiled"] + specs["b32_256_compiled_peers"][1:]
    assert sorted(s.boundaries for s in compiled) == every and specs["b32_256_compiled"][1].boundaries == "learned"
    assert flag(benches["b32_256_eager"], "--modes") == "clip,image"
    train = pieces["train"]["command"]
    assert "--torchcompile" in train and flag(train, "--max-steps") == "200" and flag(train, "--precision") == "bf16"
    assert flag(train, "--train-data").startswith("data/sample/")  # the only data that travels with the repository

    text = gpu_check("--dry-run").stdout
    assert "of a 540 s budget" in text
    # --no-print-directory: under `make test` this make is a sub-make, which would print "Entering directory"
    make = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert make.stdout.strip() == "bash scripts/gpu_check.sh"


def test_the_budget_bounds_a_run_and_the_summary_says_what_happened(tmp_path):
    """With 3 s for everything, the set-up is cut short (or just passes) and training never gets its time: the
    run ends in seconds, with a summary that says so."""
    start = time.monotonic()
    result = gpu_check("--tiny", "--pieces", "train", "--budget", "3", "--out", str(tmp_path), shell=False)
    assert time.monotonic() - start < 60
    assert result.returncode == 1
    statuses = {row["piece"]: row["status"] for row in read_csv(tmp_path / "pieces.csv")}
    assert list(statuses) == ["setup", "train"]  # setup always: it unpacks the photos
    assert statuses["setup"] in ("timed out", "passed") and statuses["train"] in ("skipped", "timed out")
    summary = (tmp_path / "summary.md").read_text()
    assert "| train |" in summary and "Budget 3 s" in summary


# At CPU sizes these pieces run the same command as the one named (Ti-8-64 1x and 4x at batch 4: the GPU batch and
# width are what set them apart), so the test runs that one and checks the command is the same, --out aside
SAME_AT_TINY = {"b32_1024_eager": "b16_256_eager", "b32_1024_compiled": "b16_256_compiled"}


def test_pieces_that_are_the_same_at_tiny_sizes_run_the_same_command():
    plan = json.loads(gpu_check("--dry-run", "--json", "--tiny").stdout)
    commands = {p["name"]: p["command"] for p in plan["pieces"]}

    def without_out(command: list[str]) -> list[str]:
        at = command.index("--out")
        return command[:at] + command[at + 2:]

    for piece, twin in SAME_AT_TINY.items():
        assert without_out(commands[piece]) == without_out(commands[twin])
    assert without_out(commands["b32_1024_eager"]) != without_out(commands["b32_1024_compiled"])  # --torchcompile


@pytest.mark.slow
def test_every_piece_runs_at_tiny_sizes(tmp_path):
    """The whole plan on CPU (Ti-8-64, batch 4, 2 timed steps, 5 training steps), stretch pieces included, less the
    two of SAME_AT_TINY: each piece passes and the folder holds the summary, the log and the CSVs, few files and no
    sub-folders. This tests the plumbing (every command's flags, outputs and summary), so dynamo is off
    (TORCHDYNAMO_DISABLE): inductor would take minutes per model on two cores, and compiled steps are tested in
    test_bench.py, test_packed.py and test_train.py."""
    dry = json.loads(gpu_check("--dry-run", "--json", "--tiny").stdout)
    names = [p["name"] for p in dry["pieces"] if p["name"] not in SAME_AT_TINY]
    result = gpu_check("--tiny", "--out", str(tmp_path), "--pieces", ",".join(names), timeout=1800,
                       TORCHDYNAMO_DISABLE="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pieces = read_csv(tmp_path / "pieces.csv")
    assert [p["piece"] for p in pieces] == names and names[:len(PRIORITY) - 1] == [
        p for p in PRIORITY if p not in SAME_AT_TINY]
    assert all(p["status"] == "passed" for p in pieces), pieces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "gpu_check.log", "pieces.csv", "summary.md",
                                                          "train_steps.csv"]

    rows = read_csv(tmp_path / "bench.csv")
    by_piece = {}
    for row in rows:
        by_piece.setdefault(row["piece"], []).append(row)
    assert set(by_piece) == {"b32_256_eager", "b32_256_compiled", "b16_256_eager", "b32_256_compiled_peers",
                             "b16_256_compiled"}
    for name, piece_rows in by_piece.items():
        compiled = "compiled" in name
        assert all(r["compiled"] == str(compiled) for r in piece_rows)
        assert all(float(r["compile_s"]) > 0 for r in piece_rows) if compiled else all(
            r["compile_s"] == "" for r in piece_rows)
    assert {r["mode"] for r in by_piece["b32_256_eager"]} == {"clip", "image"}
    assert [len(by_piece[name]) for name in ("b32_256_compiled", "b32_256_compiled_peers")] == [3, 4]

    assert len(read_csv(tmp_path / "train_steps.csv")) == 5
    summary = (tmp_path / "summary.md").read_text()
    assert "Training smoke run: 5 steps" in summary and "pytest -m gpu:" in summary
    assert "| b32_256_compiled | DTP-ViT-Ti-8-64-4x+batch-topk |" in summary
