"""The grid file: its schema, its checks, and the layout of a grid's run folders.

Grid file:

    reference = "1x"            # the arm the paired differences are taken against (optional)
    nproc_per_node = 8          # optional: train every run under torchrun with 8 processes (GPUs)
    seeds = [0, 1]
    metrics = ["text_to_image_R@10"]        # optional: summary rows (default: every evaluation column)
    figure_metrics = ["zeroshot_top1"]      # optional: one curves figure each (default: the first evaluated)
    [data.from_captions]        # optional: shards written once by dtplib.data.shards.from_captions (skipped when
    images = "$DTPLIB_DATA/flickr8k/images"  # out/stats.json exists); its keyword arguments, paths may start
    captions = "$DTPLIB_DATA/flickr8k/captions.tsv"  # with $DTPLIB_DATA, others are from the repository root
    out = "logs/data/flickr8k-64"
    [shared]                    # flags of every run: the fields of dtplib.training.config.TrainConfig (--lr -> lr)
    model = "ViT-Ti-8-64"
    [final]                     # optional: `dtplib.evaluate` flags for each complete run's last checkpoint,
    val_data = "logs/data/flickr8k-64/test"  # run once per run (its final.json), e.g. on the test split
    bootstrap = 1000
    [timing]                    # optional: time the training step of every arm's last checkpoint (this seed's
    seed = 0                    # main runs) in turn in one process, once all are complete: step_times.csv
    contrasts = [["4x", "1x"]]  # optional: (arm, against) pairs differenced on each seed: contrasts.csv
    [alignment]                 # optional: COCO outline alignment of every finished run of `arms` (default: the
    num_images = 200            # learned-boundary arms), keys ALIGNMENT_KEYS; overlays = [arm, ...] draws
    overlays = ["4x"]           # overlays/<arm>/ for their overlay_seed runs
    [protocol]                  # optional, written before the runs: what summary.md reports as primary (below)
    primary_metric = "final_mean_R@10"
    family = [["best", "uniform-4x"]]  # the primary contrasts; "best" is the best_of arm chosen on validation
    best_of = ["learned-4x", "topk-4x"]
    choose_on = "mean_R@10"
    equivalence_margin = 0.005
    [finish]                    # optional: after its main run, every run trains on from its last weights with
    epochs = 1                  # these flags over its own (a new optimizer and schedule, in <run>/finish/):
    force_image_size = 64       # CLIPA's full-resolution and FLIP's unmasked fine-tune; epochs is required
    force_patch_dropout = 0
    lr = 1e-4
    [arms.1x]                   # each arm's own flags, over the shared ones
    compression = 1
    seeds = [0, 1, 2]           # optional: this arm's own seeds instead of the grid's
    [arms.lowres-4x]            # CLIPA: the plain ViT at the input size with the patches of DTP-4x's budget
    compression = 1             # (Ti: 32 px, 16 patches; B/16: 112 px)
    force_image_size = 32
    [arms.lowres-4x.finish]     # optional: this arm's own [finish] flags, over the grid's; `finish = false` in an
    lr = 5e-5                   # arm's table: no finish for that arm

A [finish] makes a run two trainings: the main run in `<arm>-seed<seed>/` and the finish in
`<arm>-seed<seed>/finish/` (`python -m dtplib.train ... --pretrained <run>/checkpoints/epoch_latest.pt --logs <run>
--name finish --resume latest`), each resumed where it stopped and refused when trained with other flags. The run
is complete when both are. [final] and [alignment] then read the finish's checkpoint; runs.csv continues each run's
rows with the finish's epochs (stage "finish"), so its last row, the summary and the contrasts are the finished
model's, and the cost columns (steps, samples_seen, train_time_s, train_gmacs) count main + finish, each epoch at
its own input size and patch dropout: arms stay compared at equal cost. [timing] times the main run's checkpoint:
the training step that the run's cost is mostly made of (a finish at full resolution would time every arm alike).

A [protocol] (`PROTOCOL_KEYS`) states the comparison before the runs: `primary_metric` (a runs.csv column: a
`final_` test metric, or `final_mean_R@10`, the mean of both retrieval directions' R@10), `secondary_metrics`, the
primary `family` of [arm, against] contrasts (Holm's correction over it at `alpha`), `best_of` and `choose_on` (the
arm that "best" stands for in the family: the best_of arm with the best mean over seeds of the validation metric
`choose_on` at the last epoch, lowest for a loss), `equivalence_margin` (in the primary metric's units: the
margin that two one-sided tests must pass for a "within ±m" reading) and `bootstrap` (resamples of the bootstrap over
seeds and test items). Every other contrast is reported as exploratory.

Everything is checked before any training: unknown keys (one line naming the bad key), flag types and choices
(TrainConfig's parser and `TrainConfig.from_options`), then `TrainConfig.check` on every run (missing data, bad
model names), in this process. A run folder trained with other flags than the grid
now gives (a grid edited between pieces) is refused.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.cli import PATH_FLAGS, flags
from ..common.paths import data_path, repo_path, work_root
from ..data.shards import from_captions
from ..measure import evaluate
from ..training.config import TrainConfig

TOP_LEVEL = ("reference", "seeds", "shared", "arms", "data", "final", "timing", "metrics", "figure_metrics",
             "description", "nproc_per_node", "contrasts", "alignment", "finish", "protocol")


ALIGNMENT_KEYS = {"arms": None, "coco": "$DTPLIB_DATA/coco-mini", "num_images": None, "draws": 100, "batch_size": 64,
                  "overlays": [], "overlay_seed": 0, "overlay_images": "$DTPLIB_DATA/flickr8k/images"}


TIMING_KEYS = {"seed": 0, "steps": 30, "warmup": 5, "batch_size": None}  # None: the runs' own batch size


FINAL_SET_BY_DRIVER = ("checkpoint", "compare", "model", "pretrained", "output", "items")


FINAL_PATH_FLAGS = ("val_data", "zeroshot_data", "imagenet_val", "probe_data")


DRIVER_FLAGS = ("logs", "name", "resume", "seed", "save_most_recent")  # set by the driver for each run


FINISH_DRIVER_FLAGS = ("pretrained",)  # a finish starts from its main run's last checkpoint


FINISH_DIR = "finish"  # <run>/finish/: the [finish] training of a run


RUNTIME_FLAGS = ("workers", "threads", "device", "dist_backend", "report_to", "wandb_project_name",
                 "log_every_n_steps", "save_most_recent", "delete_previous_checkpoint",
                 *PATH_FLAGS)  # may change between the pieces of a grid without changing what a run trains


FINAL_FILE = "final.json"  # a run folder's [final] evaluation (dtplib.evaluate --output)


ITEMS_FILE = "final_items.npz"  # the [final] evaluation's per-item scores (dtplib.evaluate --items)


TIMING_FILE = "step_times.csv"  # [timing]: the interleaved benchmark of the final checkpoints


ALIGNMENT_FILE = "alignment.csv"  # [alignment]: COCO outline alignment of each complete run of its arms


CONTRASTS_FILE = "contrasts.csv"  # paired differences of the `contrasts` pairs, at the last epoch and at equal cost


BEST = "best"  # in a [protocol] family: the best_of arm chosen on validation


PROTOCOL_KEYS = {"primary_metric": None, "secondary_metrics": [], "family": None, "best_of": [], "choose_on": None,
                 "correction": "holm", "alpha": 0.05, "equivalence_margin": None, "bootstrap": 2000}


EVALUATED = ("zeroshot_top1", "zeroshot_top5", "imagenet_top1", "imagenet_top5", "val_loss", "probe_top1",
             "probe_top5", "mean_R@10", *(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)))


@dataclass
class Grid:
    """A parsed, checked grid: `runs()` lists its (arm, seed) runs, seed by seed."""

    path: Path
    seeds: list[int]
    shared: dict
    arms: dict[str, dict]
    reference: str | None = None
    data: dict | None = None
    metrics: list[str] | None = None
    figure_metrics: list[str] | None = None
    description: str = ""
    final: dict | None = None  # dtplib.evaluate flags for each complete run's last checkpoint
    timing: dict | None = None  # [timing] with its defaults filled in
    arm_seeds: dict[str, list[int]] | None = None  # arms with their own `seeds = [...]` (the others: `seeds`)
    nproc_per_node: int = 1  # > 1: every run trains under torchrun with this many processes
    contrasts: list[tuple[str, str]] | None = None  # (arm, against) pairs: contrasts.csv and their summary tables
    alignment: dict | None = None  # [alignment] with its defaults filled in (arms: the learned-boundary arms)
    protocol: dict | None = None  # [protocol] with its defaults filled in: the primary family and its tests
    finish: dict | None = None  # [finish]: flags of every run's final fine-tune, over the run's own
    arm_finish: dict[str, dict | bool] | None = None  # arms with their own [arms.NAME.finish] table, or false

    def options(self, arm: str, seed: int) -> dict:
        """The run's TrainConfig fields as the grid gives them (paths as written), seed included."""
        return {**self.shared, **self.arms[arm], "seed": seed}

    def finish_flags(self, arm: str) -> dict | None:
        """The arm's [finish] flags: the grid's [finish] with the arm's own over it; None when it has no finish."""
        own = (self.arm_finish or {}).get(arm)
        if own is False or (self.finish is None and own is None):
            return None
        return {**(self.finish or {}), **(own or {})}

    def finish_options(self, arm: str, seed: int) -> dict | None:
        """The TrainConfig fields of the run's finish (the run's own with the finish flags over them), or None."""
        flags = self.finish_flags(arm)
        return None if flags is None else {**self.options(arm, seed), **flags}

    def seeds_of(self, arm: str) -> list[int]:
        return (self.arm_seeds or {}).get(arm, self.seeds)

    def runs(self, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[tuple[str, int]]:
        every_seed = list(dict.fromkeys([*self.seeds, *(s for arm in self.arms for s in self.seeds_of(arm))]))
        return [(arm, seed) for seed in every_seed if seeds is None or seed in seeds
                for arm in self.arms if (arms is None or arm in arms) and seed in self.seeds_of(arm)]


def shown_path(path: Path) -> str:
    """A path as the report shows it: from the working checkout's root when inside it."""
    path, root = Path(path).resolve(), work_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def run_label(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def _read_grid_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} grid: {error}") from None


def close_names(name: str, names: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_flags(where: str, options: dict) -> None:
    """Keys of a [shared] or [arms.X] table: TrainConfig fields, not set by the driver, booleans as booleans."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a table of flags, got {type(options).__name__}")
    known = TrainConfig.flag_fields()
    for key, value in options.items():
        if key not in known:
            hint = close_names(key.replace("-", "_"), list(known))
            raise ValueError(f"{where}: unknown flag {key!r}: not a dtplib.train flag (the TrainConfig field names, "
                             f"e.g. train_data for --train-data){hint}")
        if key in DRIVER_FLAGS:
            instead = {"seed": "use seeds = [...]", "save_most_recent": "every run keeps epoch_latest.pt, which the "
                       "driver resumes and evaluates"}.get(key, "use --out")
            raise ValueError(f"{where}: {key!r} is set by the driver for each run ({instead})")
        if isinstance(known[key].default, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}: {key} is a switch: give true or false, got {value!r}")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: {key} must be a single value, got {value!r}")


def _check_seeds(where: str, seeds) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"{where} must be a list of distinct integers, got {seeds!r}")
    return seeds


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file: structure and flag names, without touching data or models."""
    path = repo_path(path)
    raw = _read_grid_file(path)
    unknown = [key for key in raw if key not in TOP_LEVEL]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}{close_names(unknown[0], TOP_LEVEL)}; a grid has "
                         f"{', '.join(TOP_LEVEL)} (flags go in [shared] or [arms.NAME])")
    seeds = _check_seeds(f"{path}: seeds", raw.get("seeds", [0]))
    arms = raw.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"{path}: no arms: add [arms.NAME] tables (an empty table runs the shared flags alone)")
    arm_seeds, arm_finish = {}, {}
    for arm in arms:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arm):
            raise ValueError(f"{path}: arm name {arm!r}: use letters, digits and _ . + - (it names a run folder)")
        if isinstance(arms[arm], dict) and "seeds" in arms[arm]:
            arms[arm] = dict(arms[arm])
            arm_seeds[arm] = _check_seeds(f"{path}: [arms.{arm}] seeds", arms[arm].pop("seeds"))
        if isinstance(arms[arm], dict) and "finish" in arms[arm]:
            arms[arm] = dict(arms[arm])
            arm_finish[arm] = arms[arm].pop("finish")
            if arm_finish[arm] is not False:
                _check_finish(f"{path.name} [arms.{arm}.finish]", arm_finish[arm])
    shared = raw.get("shared", {})
    _check_flags(f"{path.name} [shared]", shared)
    for arm, options in arms.items():
        _check_flags(f"{path.name} [arms.{arm}]", options)
    reference = raw.get("reference")
    if reference is not None and reference not in arms:
        raise ValueError(f"{path}: reference {reference!r} is not an arm (arms: {', '.join(arms)})")
    data = raw.get("data")
    if data is not None:
        if not isinstance(data, dict) or set(data) != {"from_captions"}:
            raise ValueError(f"{path}: [data] holds one table, [data.from_captions] (dtplib.data.shards.from_captions "
                             "arguments)")
        accepted = set(inspect.signature(from_captions).parameters)
        bad = sorted(set(data["from_captions"]) - accepted)
        missing = sorted({"images", "captions", "out"} - set(data["from_captions"]))
        if bad or missing:
            problem = f"unknown argument {bad[0]!r}{close_names(bad[0], sorted(accepted))}" if bad else \
                f"needs {', '.join(missing)}"
            raise ValueError(f"{path}: [data.from_captions] {problem}")
    lists = {}
    for key in ("metrics", "figure_metrics"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {key} must be a list of column names, got {value!r}")
        lists[key] = value
    final = _check_final(path.name, raw["final"]) if "final" in raw else None
    timing = _check_timing(path.name, raw["timing"]) if "timing" in raw else None
    nproc = raw.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"{path}: nproc_per_node must be an integer >= 1 (processes per run, under torchrun), "
                         f"got {nproc!r}")
    contrasts = _check_contrasts(path.name, raw["contrasts"], arms) if "contrasts" in raw else None
    finish = _check_finish(f"{path.name} [finish]", raw["finish"]) if "finish" in raw else None
    grid = Grid(path, seeds, shared, arms, reference, data, **lists, description=str(raw.get("description", "")),
                final=final, timing=timing, arm_seeds=arm_seeds or None, nproc_per_node=nproc, contrasts=contrasts,
                finish=finish, arm_finish=arm_finish or None)
    for arm in arms:  # types and choices, by the training command's own parser
        parse_options(grid.options(arm, seeds[0]), f"{path.name} [arms.{arm}]")
        finish_flags = grid.finish_flags(arm)
        if finish_flags is not None:
            if "epochs" not in finish_flags:
                raise ValueError(f"{path.name}: [arms.{arm}.finish] needs epochs (the finish's length; else it would "
                                 "train as many epochs as the run), in [finish] or in the arm's own table")
            parse_options(grid.finish_options(arm, seeds[0]), f"{path.name} [arms.{arm}] with its [finish]")
    if "alignment" in raw:
        grid.alignment = _check_alignment(path.name, raw["alignment"], grid)
    if "protocol" in raw:
        grid.protocol = _check_protocol(path.name, raw["protocol"], arms)
    return grid


def _keyed_table(where: str, name: str, table, keys: dict) -> dict:
    """A [name] table whose keys are among `keys` (each with its default): the defaults with the table over them;
    one line for a value that is no table or an unknown key (with the close name)."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [{name}] must be a table ({', '.join(keys)}), got {table!r}")
    for key in table:
        if key not in keys:
            raise ValueError(f"{where}: [{name}] unknown key {key!r}{close_names(key, list(keys))}; it takes "
                             f"{', '.join(keys)}")
    return {**keys, **table}


def _check_protocol(where: str, table, arms: dict) -> dict:
    """A [protocol] table (`PROTOCOL_KEYS`): metric names among the evaluations' (`EVALUATED`, with final_ for the
    test split; choose_on a validation metric, without it), family pairs of arms or "best", best_of arms."""
    spec = _keyed_table(where, "protocol", table, PROTOCOL_KEYS)
    for key in ("primary_metric", "family"):
        if spec[key] is None:
            raise ValueError(f"{where}: [protocol] needs {key}")
    tested = [f"final_{m}" for m in EVALUATED]
    metrics = [spec["primary_metric"], *_string_list(where, "secondary_metrics", spec["secondary_metrics"])]
    for metric in metrics:
        if metric not in tested:
            raise ValueError(f"{where}: [protocol] metric {metric!r} is not a test metric of [final]"
                             f"{close_names(str(metric), tested)}; they are final_<metric> for {', '.join(EVALUATED)}")
    best_of = _string_list(where, "best_of", spec["best_of"])
    for arm in best_of:
        if arm not in arms:
            raise ValueError(f"{where}: [protocol] best_of: {arm!r} is not an arm{close_names(arm, list(arms))}")
    if best_of and spec["choose_on"] not in EVALUATED:
        hint = close_names(str(spec["choose_on"]), EVALUATED)
        raise ValueError(f"{where}: [protocol] choose_on must be a validation metric (the per-epoch evaluation, "
                         f"without final_: the choice never sees the test split){hint}; one of {', '.join(EVALUATED)}")
    if not best_of and isinstance(spec["family"], list) and any(isinstance(pair, list) and BEST in pair
                                                                 for pair in spec["family"]):
        raise ValueError(f"{where}: [protocol] family names {BEST!r}: give best_of and choose_on (the arms it is "
                         "chosen from, and the validation metric it is chosen on)")
    spec["family"] = _check_contrasts(f"{where}: [protocol] family", spec["family"],
                                      {**arms, **({BEST: {}} if best_of else {})})
    if spec["correction"] != "holm":
        raise ValueError(f"{where}: [protocol] correction must be \"holm\" (Holm-Bonferroni over the family), got "
                         f"{spec['correction']!r}")
    alpha, margin, resamples = spec["alpha"], spec["equivalence_margin"], spec["bootstrap"]
    if not isinstance(alpha, float) or not 0 < alpha < 0.5:
        raise ValueError(f"{where}: [protocol] alpha must be a number in (0, 0.5), got {alpha!r}")
    if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin <= 0):
        raise ValueError(f"{where}: [protocol] equivalence_margin must be a number > 0 (in the primary metric's "
                         f"units), got {margin!r}")
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"{where}: [protocol] bootstrap must be an integer >= 1 (resamples), got {resamples!r}")
    return spec


def _string_list(where: str, key: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: [protocol] {key} must be a list of names, got {value!r}")
    return value


def _check_finish(where: str, table) -> dict:
    """A [finish] or [arms.NAME.finish] table: dtplib.train flags, as in [shared], but not the weights it starts
    from (the driver's: the run's last checkpoint)."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of dtplib.train flags (e.g. epochs = 1, force_image_size = 64), "
                         f"got {table!r}")
    _check_flags(where, table)
    for key in FINISH_DRIVER_FLAGS:
        if key in table:
            raise ValueError(f"{where}: {key!r} is set by the driver (the finish starts from its run's last "
                             "checkpoint)")
    return table


def _check_contrasts(where: str, contrasts, arms: dict) -> list[tuple[str, str]]:
    """`contrasts = [["learned-4x", "uniform-4x"], ...]`: pairs of two different arms (arm, against)."""
    if not isinstance(contrasts, list) or not contrasts:
        raise ValueError(f"{where}: contrasts must be a list of [arm, against] pairs, got {contrasts!r}")
    pairs = []
    for pair in contrasts:
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(a, str) for a in pair):
            raise ValueError(f"{where}: contrasts: {pair!r} is not a pair of arm names [arm, against]")
        for arm in pair:
            if arm not in arms:
                raise ValueError(f"{where}: contrasts: {arm!r} is not an arm{close_names(arm, list(arms))}")
        if pair[0] == pair[1]:
            raise ValueError(f"{where}: contrasts: {pair!r} compares an arm with itself")
        pairs.append((pair[0], pair[1]))
    return pairs


def pooling_arms(grid: Grid) -> dict[str, bool]:
    """The arms whose tower pools tokens (DTP at compression > 1, by --compression, --forced-boundaries or a
    DTP-ViT-* name), each with whether it predicts its boundaries (no --forced-boundaries)."""
    arms = {}
    for arm in grid.arms:
        config = parse_options(grid.options(arm, grid.seeds_of(arm)[0]), arm)
        if config.dtp is not None and config.dtp.compression > 1:
            arms[arm] = config.dtp.forced_boundaries is None
    return arms


def _learned_arms(grid: Grid) -> list[str]:
    """Arms whose tower predicts its boundaries: DTP (compression > 1) without --forced-boundaries."""
    return [arm for arm, learned in pooling_arms(grid).items() if learned]


def _check_alignment(where: str, table, grid: Grid) -> dict:
    """An [alignment] table: arms (default: every learned-boundary arm), coco, num_images, draws, batch_size,
    overlays (arms whose overlay_seed run gets overlay figures), overlay_seed, overlay_images."""
    spec = _keyed_table(where, "alignment", table, ALIGNMENT_KEYS)
    dtp = pooling_arms(grid)
    if spec["arms"] is None:
        spec["arms"] = _learned_arms(grid)
    for key in ("arms", "overlays"):
        if not isinstance(spec[key], list) or not all(isinstance(a, str) for a in spec[key]):
            raise ValueError(f"{where}: [alignment] {key} must be a list of arm names, got {spec[key]!r}")
        for arm in spec[key]:
            if arm not in grid.arms:
                raise ValueError(f"{where}: [alignment] {key}: {arm!r} is not an arm"
                                 f"{close_names(arm, list(grid.arms))}")
            if arm not in dtp:
                raise ValueError(f"{where}: [alignment] {key}: arm {arm!r} pools no tokens (compression 1): it has "
                                 "no boundaries to align")
    for key in ("draws", "batch_size", "overlay_seed", "num_images"):
        value, least = spec[key], 0 if key == "overlay_seed" else 1
        if key == "num_images" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}: [alignment] {key} must be an integer >= {least}, got {value!r}")
    for key in ("coco", "overlay_images"):
        if not isinstance(spec[key], str):
            raise ValueError(f"{where}: [alignment] {key} must be a path, got {spec[key]!r}")
    return spec


def _check_final(where: str, final) -> dict:
    """A [final] table: `python -m dtplib.evaluate` flags (field names, as in [shared]) with at least one data flag,
    checked by that command's own parser; the checkpoint and output are the driver's."""
    if not isinstance(final, dict) or not any(key in final for key in FINAL_PATH_FLAGS):
        raise ValueError(f"{where}: [final] must be a table of dtplib.evaluate flags with at least one of "
                         f"{', '.join(FINAL_PATH_FLAGS)}, got {final!r}")
    parser = evaluate.build_parser()
    known = list(vars(parser.parse_args(["--checkpoint", "-"])))
    for key, value in final.items():
        if key not in known:
            raise ValueError(f"{where}: [final] unknown flag {key!r}: not a dtplib.evaluate flag"
                             f"{close_names(key.replace('-', '_'), known)}")
        if key in FINAL_SET_BY_DRIVER:
            raise ValueError(f"{where}: [final] {key!r} is set by the driver (each run's last checkpoint)")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: [final] {key} must be a single value, got {value!r}")

    def error(message: str):
        raise ValueError(f"{where}: [final]: {message}")

    parser.error = error
    parser.parse_args(final_argv(final, "checkpoint.pt", "final.json"))
    return final


def _check_timing(where: str, timing) -> dict:
    """A [timing] table: seed (whose runs are timed), warmup (>= 0), steps and batch_size (>= 1), integers."""
    spec = _keyed_table(where, "timing", timing, TIMING_KEYS)
    for key, value in timing.items():
        least = 0 if key in ("seed", "warmup") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}: [timing] {key} must be an integer >= {least}, got {value!r}")
    return spec


def final_argv(final: dict, checkpoint: str | Path, output: str | Path, items: str | Path | None = None) -> list[str]:
    """The `dtplib.evaluate` command line of a [final] table, paths as `resolved` gives them; `items`: where its
    per-item scores go."""
    return flags(**resolved(final, FINAL_PATH_FLAGS), checkpoint=str(checkpoint), output=str(output),
                 **({} if items is None else {"items": str(items)}))


def check_final_data(grid: Grid) -> None:
    """The [final] data exists (and class folders are not empty) before anything trains; paths inside the folder
    that [data.from_captions] writes are left to that step (a fresh clone has not made its shards yet)."""
    if grid.final:
        made = data_path(grid.data["from_captions"]["out"]).resolve() if grid.data else None
        paths = {key: path for key, path in resolved({k: v for k, v in grid.final.items() if k in FINAL_PATH_FLAGS},
                                                     FINAL_PATH_FLAGS).items()
                 if made is None or not Path(path).resolve().is_relative_to(made)}
        evaluate.check_data(paths.get("zeroshot_data"), paths.get("imagenet_val"), paths.get("val_data"),
                            bool(grid.final.get("zeroshot_skip_empty")), paths.get("probe_data"))


def shown_flags(options: dict) -> list[str]:
    """Flags as the grid writes them, paths unresolved (`$DTPLIB_DATA/...` stays), for the reports."""
    argv = []
    for key, value in options.items():
        if key in PATH_FLAGS and isinstance(value, str):
            argv += [f"--{key.replace('_', '-')}", value]
        else:
            argv += flags(**{key: value})
    return argv


def resolved(options: dict, path_flags: Sequence[str] = PATH_FLAGS) -> dict:
    """Path flags (dtplib.train's, or `path_flags`) with a leading $DTPLIB_DATA expanded, other relative paths
    from the repository root."""
    return {k: str(data_path(v)) if k in path_flags and isinstance(v, str) and "://" not in v else v
            for k, v in options.items()}


def parse_options(options: dict, where: str) -> TrainConfig:
    """The TrainConfig that `python -m dtplib.train` would parse from these options (a bad type or choice is a
    ValueError naming `where`); the model name and compression are checked too."""
    parser = TrainConfig.parser()

    def error(message: str):
        raise ValueError(f"{where}: {message}")

    parser.error = error  # argparse reports through error(): one line instead of exit 2
    values = vars(parser.parse_args(flags(**resolved(options))))
    try:
        return TrainConfig.from_options(**values)  # the model name and the tower's flags are checked here
    except ValueError as problem:
        raise ValueError(f"{where}: {problem}") from None


def last_checkpoint(run_dir: Path) -> Path:
    """A training's last checkpoint: its epoch_latest.pt (the driver trains every run with --save-most-recent).
    [timing] reads the main run's; the finish starts from it."""
    return run_dir / "checkpoints" / "epoch_latest.pt"


def finish_dir(run_dir: Path) -> Path:
    """Where a run's [finish] trains: <run>/finish/."""
    return run_dir / FINISH_DIR


def final_checkpoint(grid: Grid, arm: str, run_dir: Path) -> Path:
    """The checkpoint that [final] and [alignment] read: the finish's last when the arm has a [finish], else the
    run's own."""
    return last_checkpoint(finish_dir(run_dir) if grid.finish_flags(arm) is not None else run_dir)


def stage_epochs(grid: Grid, arm: str) -> tuple[int, int]:
    """(--epochs of the arm's main run, of its finish; 0 without one): the counts that make a run complete."""
    seed = grid.seeds_of(arm)[0]
    finish = grid.finish_options(arm, seed)
    return (parse_options(grid.options(arm, seed), arm).epochs,
            0 if finish is None else parse_options(finish, f"{arm} [finish]").epochs)


def run_complete(run_dir: Path, epochs: tuple[int, int]) -> bool:
    """Whether a run has trained its epochs (`stage_epochs`): the main run's, then its finish's."""
    return epochs_done(run_dir) >= epochs[0] and epochs_done(finish_dir(run_dir)) >= epochs[1]


def epochs_done(run_dir: Path) -> int:
    """Rows of the run's epochs.csv (0 when it has none yet)."""
    path = run_dir / "epochs.csv"
    if not path.is_file():
        return 0
    with path.open() as f:
        return max(sum(1 for line in f if line.strip()) - 1, 0)
