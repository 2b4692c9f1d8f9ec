"""The main job, `compare(CompareConfig) -> Table`: the paper's per-layer figure at CIFAR scale,
with the controls that say how much of a gain is the data's statistics and how much is learning.

Rows on one trunk, every one from the same initial weights (`torch.manual_seed(seed)`, then the
trunk), each probed with the same linear classifiers on conv1..conv4 of the frozen trunk:

    random        the freshly initialised trunk (no training, no data)
    image-stats   control: the random trunk with conv1 whitened by the one image's patches and every
                  BatchNorm's statistics re-estimated on them; no gradient step (step 0 of the image row)
    image         the self-supervised method (`method`) on patches of one image
    data-stats    control: the same as image-stats with the dataset's training images
    full          the same method, same budget, on the dataset's training images without labels
    supervised    the trunk trained with the dataset's labels, on at least as many samples as the
                  one-image row saw (so supervision is not handicapped)
    full-long, supervised-long
                  converged references (`references="long"`): the full and supervised rows trained for
                  REFERENCE_EPOCHS epochs, with learning curves; trained once under `reference_dir` and
                  reused by every later table with the same settings

"statistics" = image-stats - random; "learning" = image - image-stats (likewise for the dataset).
Several seeds (`seeds=[0, 1, 2]`) put each seed's table in `out/seed-K/` and the per-cell mean ± sample
standard deviation in `out/` (experiments/seeds.py); one seed writes its table in `out/` itself.
Each table writes table.md, table.csv, results.json (every row's samples and epochs seen), a bar chart
(table.png) and the conv1 filters of every row (filters.png). Each row is its own run directory
(experiments/table.py: reruns skip finished rows, resume an interrupted one, and refuse other
settings for the same `out`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from monossl import runs
from monossl.errors import TrainingStopped, UserError
from monossl.eval.results import probe_dir_name
from monossl.experiments.compare_output import STATISTICS_OF, row_labels, write_seed_table, write_table
from monossl.experiments.table import (
    Row,
    Table,
    check_table_settings,
    parse_rows,
    pretrained,
    run_rows,
    samples_seen,
)
from monossl.models import load_trunk, random_trunk, save_trunk, trunk_config_from
from monossl.pretrain import (
    BN_SAMPLES,
    WHITEN_CONV1_ARCHS,
    PretrainConfig,
    defaults_of,
    method_class,
    statistics_trunk,
)

ROWS = {
    "random": "random trunk",
    "image-stats": "image statistics only (no training)",
    "image": "one image",
    "data-stats": "dataset statistics only (no training)",
    "full": "full data (no labels)",
    "supervised": "supervised",
    "full-long": "full data (no labels), converged reference",
    "supervised-long": "supervised, converged reference",
}
MAIN_ROWS = ("random", "image-stats", "image", "data-stats", "full", "supervised")
REFERENCE_ROWS = ("full-long", "supervised-long")
#: the converged references' budget: epochs over the dataset's training images. Set by the time a 2-core
#: machine can give them (about 45 min for both), not yet by their curves: whether the probes have
#: stopped rising is what the curves (REFERENCE_CURVE_POINTS per run) are drawn to show
REFERENCE_EPOCHS = {"long": {"full-long": 12, "supervised-long": 24}}
REFERENCE_CURVE_POINTS = 8
#: the self-supervised method of the main job (docs/one_image.md, "The recipe")
DEFAULT_METHOD = "simclr"


@dataclass
class CompareConfig:
    data: str = "cifar10"
    method: str = DEFAULT_METHOD
    image: str | None = None  # None: the built-in default image
    preset: str = "all"
    rows: str | None = None  # "random,image": a subset, in the table's order
    widths: str | None = None
    conv1_kernel: int | None = None
    whiten_conv1: bool | None = None  # None: the trunk's default (whitened on the CIFAR trunk)
    out: str | Path = "runs/compare"
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # several seeds: out/seed-K each, mean ± sd in out
    references: str | None = None  # "long": add the converged full-data and supervised rows
    reference_seeds: list[int] | None = None  # seeds that get the references (None: the first seed)
    reference_dir: str | Path | None = None  # None: `references/` beside `out`
    steps: int | None = None  # of the image and full rows (None: pretrain's default for the method)
    supervised_steps: int | None = None  # None: as many samples as the image row
    probe_epochs: int | None = None
    subset: int | None = None  # probe on a class-balanced subset of N training images
    test_subset: int | None = None
    device: str = "auto"
    progress: bool = True


def supervised_steps(method: str, steps: int | None) -> int:
    """Supervised steps that show the trunk at least as many samples as `steps` of `method`
    (RotNet's four rotations and SimCLR's two views count as samples)."""
    own, supervised = defaults_of(method), defaults_of("supervised")
    samples = (steps or own.steps) * own.batch_size * method_class(method).views
    return max(supervised.steps, math.ceil(samples / supervised.batch_size))


def compare(config: CompareConfig) -> Table:
    """The main job for one seed (`config.seed`) or several (`config.seeds`); see the module docstring."""
    if config.method == "supervised" or method_class(config.method).needs != "images":
        raise UserError(f"--method {config.method} is not self-supervised; choose one that learns from images alone")
    if config.references is not None and config.references not in REFERENCE_EPOCHS:
        raise UserError(f"--references {config.references!r}: choose from {', '.join(REFERENCE_EPOCHS)}")
    seeds = list(dict.fromkeys(config.seeds or [config.seed]))
    known = MAIN_ROWS + (REFERENCE_ROWS if config.references else ())
    rows = parse_rows(config.rows, known)
    reference_seeds = seeds[:1] if config.reference_seeds is None else config.reference_seeds
    if config.references is None and (config.reference_seeds is not None or config.reference_dir is not None):
        raise UserError("--reference-seeds and --reference-dir apply to --references only")
    if set(reference_seeds) - set(seeds):
        raise UserError(f"--reference-seeds {reference_seeds} are not all among the table's seeds {seeds}")
    if len(seeds) == 1:
        return _compare_seed(config, seeds[0], Path(config.out), rows)
    out = runs.lock_run_dir(config.out)
    _check_settings(out, {k: v for k, v in _settings(config).items() if k != "seed"})
    results = {}
    for seed in seeds:
        seed_rows = [r for r in rows if r not in REFERENCE_ROWS or seed in reference_seeds]
        table = _compare_seed(config, seed, out / f"seed-{seed}", seed_rows)
        results[seed] = runs.read_json(table.out / "results.json", "table results")
    md = write_seed_table(out, rows, results, _table_config(config, rows, seeds))
    return Table(out, md, {}, ("table.md", "table.csv", "results.json", "table.png"))


def _settings(config: CompareConfig) -> dict:
    """What defines the rows of a table directory: a rerun with other values is refused."""
    whiten = "cifar" in WHITEN_CONV1_ARCHS if config.whiten_conv1 is None else config.whiten_conv1
    return {"data": config.data, "method": config.method, "image": config.image, "preset": config.preset,
            "seed": config.seed, "steps": config.steps, "probe_epochs": config.probe_epochs,
            "subset": config.subset, "test_subset": config.test_subset, "widths": config.widths,
            "conv1_kernel": config.conv1_kernel, "whiten_conv1": whiten,
            "supervised_steps": config.supervised_steps or supervised_steps(config.method, config.steps),
            "statistics_bn_samples": BN_SAMPLES, "reference_epochs": REFERENCE_EPOCHS}


#: settings an older version did not record: a table directory without them is refused, not trusted
REQUIRED_SETTINGS = ("whiten_conv1", "statistics_bn_samples", "reference_epochs")


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    if path.exists():
        previous = runs.read_json(path, "table settings")
        missing = [k for k in REQUIRED_SETTINGS if not isinstance(previous, dict) or k not in previous]
        if missing:
            raise UserError(f"{out} holds a table made by an older version that did not record "
                            f"{', '.join(missing)}; choose another --out")
    check_table_settings(out, settings, "settings.json", ignore=("rows",))


def _table_config(config: CompareConfig, rows: list[str], seeds: list[int]) -> dict:
    from monossl.data.sources import DEFAULT_IMAGE
    from monossl.eval.protocols import get_protocol

    protocol = get_protocol("cifar").with_overrides(epochs=config.probe_epochs)
    settings = _settings(config)
    return {**{k: v for k, v in settings.items() if k != "seed"}, "image": config.image or f"builtin:{DEFAULT_IMAGE}",
            "method_steps": config.steps or defaults_of(config.method).steps, "seeds": seeds, "rows": rows,
            "trunk": {"widths": config.widths, "conv1_kernel": config.conv1_kernel},
            "protocol": protocol.to_dict(), "references": config.references}


def _compare_seed(config: CompareConfig, seed: int, out: Path, rows: list[str]) -> Table:
    from monossl.data.datasets import load_pair, subset
    from monossl.data.sources import DEFAULT_IMAGE
    from monossl.eval.probe import probe
    from monossl.eval.protocols import get_protocol

    config = replace(config, seed=seed)
    image = config.image or f"builtin:{DEFAULT_IMAGE}"
    settings = _settings(config)
    train_set, test_set = load_pair(config.data)
    if config.subset:
        train_set = subset(train_set, config.subset, seed=seed)
    if config.test_subset:
        test_set = subset(test_set, config.test_subset, seed=seed)
    protocol = get_protocol("cifar").with_overrides(epochs=config.probe_epochs)
    out = runs.lock_run_dir(out)  # only now: bad input leaves no empty directory behind
    _check_settings(out, settings)

    # PretrainConfig fields: those every row shares, and each row's own
    common: dict[str, Any] = dict(
        method=config.method, widths=config.widths, conv1_kernel=config.conv1_kernel, seed=seed,
        whiten_conv1=settings["whiten_conv1"], device=config.device, steps=config.steps,
        progress=None if config.progress else False)
    per_row: dict[str, dict[str, Any]] = {
        "image": dict(images=[image], preset=config.preset), "full": dict(data=config.data),
        "supervised": dict(method="supervised", data=config.data, steps=settings["supervised_steps"])}
    for row in REFERENCE_ROWS:
        per_row[row] = {**per_row[row.removesuffix("-long")], "steps": None,
                        "epochs": REFERENCE_EPOCHS.get(config.references or "", {}).get(row)}

    def row_config(row: str, run_dir: Path) -> PretrainConfig:
        return PretrainConfig(out=run_dir, **{**common, **per_row[row]})

    def trunk_of(row: str):
        """The row's trunk and meta: made (trained, resumed, or for a control computed) when missing."""
        if row == "random":
            return random_trunk("cifar", seed, **trunk_config_from(config.widths, config.conv1_kernel)), \
                {"method": "random", "seed": seed}
        if row in STATISTICS_OF:
            if not (out / row / "trunk.pt").exists():
                trunk, meta = statistics_trunk(row_config(STATISTICS_OF[row], out / row))
                save_trunk(out / row / "trunk.pt", trunk, meta)
            return load_trunk(out / row)
        if row in REFERENCE_ROWS:
            return load_trunk(_reference_run(config, row, row_config, out))
        return load_trunk(pretrained(row_config(row, out / row)))

    def make(row: str):
        def probe_row():
            trunk, meta = trunk_of(row)
            result = probe(trunk, train_set, test_set, protocol, device=config.device, seed=seed,
                           progress=config.progress, meta=meta, dataset=config.data)
            result["seen"] = _seen(row, out, meta)
            return result
        return probe_row

    done = run_rows([Row(r, ROWS[r], out / r / probe_dir_name(protocol.name, config.data) / "results.json", make(r))
                     for r in rows])
    if done.stopped:  # the comparison needs every row
        raise TrainingStopped("; ".join(f"{r}: {m}" for r, m in done.stopped.items()))
    for row in set(rows) & set(REFERENCE_ROWS):  # their learning curves (quick probes on training images)
        run_dir = Path(runs.read_json(out / row / "reference.json", "reference")["run"])
        done.results[row]["curves"] = runs.curve_records(runs.read_jsonl(run_dir / "metrics.jsonl"))
    table_config = {**_table_config(config, rows, [seed]), "seed": seed, "seconds_per_row": done.seconds}
    md = write_table(out, rows, done.results, table_config)
    _write_figures(out, rows, done.results, config)
    return Table(out, md, {}, ("table.md", "table.csv", "results.json", "table.png", "filters.png"))


def _reference_run(config: CompareConfig, row: str, row_config: Callable[[str, Path], PretrainConfig],
                   out: Path) -> Path:
    """A converged reference's run directory under `reference_dir`, named by everything that defines it:
    trained once (with learning curves, resumed when interrupted) and reused by every later table."""
    from monossl.eval.curves import CurveProbe
    from monossl.viz.plots import write_learning_curves

    base = Path(config.reference_dir) if config.reference_dir else Path(config.out).parent / "references"
    defining = {k: v for k, v in asdict(row_config(row, Path("."))).items() if k not in ("out", "device", "progress")}
    key = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:10]
    data_name = config.data.split(":")[0]  # the dataset's name; its path is in the key
    run_dir = base / f"{row}-{config.method if row == 'full-long' else 'supervised'}-{data_name}-" \
                     f"seed{config.seed}-{key}"
    cfg = row_config(row, run_dir)
    if not (run_dir / "trunk.pt").exists():
        from monossl.data.datasets import load_dataset

        n_images = len(load_dataset(config.data, "train"))
        assert cfg.epochs is not None  # a reference trains for REFERENCE_EPOCHS
        every = max(1, cfg.epochs * (n_images // defaults_of(cfg.method).batch_size) // REFERENCE_CURVE_POINTS)
        # the curves' usual 5,000 / 1,000 split of the training images, smaller on a small set
        curves = CurveProbe(config.data, "cifar", every, n_train=min(5000, n_images * 4 // 5),
                            n_val=min(1000, n_images // 5), seed=config.seed, device=config.device)
        pretrained(cfg, evaluators=[curves])
        records = runs.curve_records(runs.read_jsonl(run_dir / "metrics.jsonl"))
        if records:
            write_learning_curves(records, run_dir / "learning_curves.png", title=f"{row}, seed {config.seed}")
    runs.write_json(out / row / "reference.json", {"run": str(run_dir), "settings": defining})
    return run_dir


def _seen(row: str, out: Path, meta: dict) -> dict:
    """How much data a row's trunk saw (`table.samples_seen`); a control (its trunk's `meta`): the samples
    of its BatchNorm statistics, no step."""
    if row == "random":
        return samples_seen(None)
    if row in STATISTICS_OF:
        return {"steps": 0, "images": meta["bn_samples"], "samples": meta["bn_samples"], "epochs": None,
                "note": "BatchNorm statistics only"}
    if row in REFERENCE_ROWS:
        return samples_seen(Path(runs.read_json(out / row / "reference.json", "reference")["run"]))
    return samples_seen(out / row)


def _write_figures(out: Path, rows: list[str], results: dict, config: CompareConfig) -> None:
    """table.png (grouped bars per layer) and filters.png (conv1 of every row beside its activation
    patterns on the row's own training data, the dataset's for the random trunk; spatial coherence)."""
    from monossl.data.sources import DEFAULT_IMAGE
    from monossl.pretrain import WHITENING_SAMPLES, build_source, first_samples
    from monossl.viz.filters import write_filters
    from monossl.viz.networks import Network, data_images
    from monossl.viz.plots import write_layer_bars

    labels = row_labels(config.method)
    table = {r: {t: v["top1"] for t, v in results[r]["taps"].items()} for r in rows}
    write_layer_bars(table, out / "table.png", title=f"{config.data}, seed {config.seed}", row_labels=labels)
    random = random_trunk("cifar", config.seed, **trunk_config_from(config.widths, config.conv1_kernel))
    images = {}  # the rows' training data: the one image's patches (as its row trains on them), the dataset's

    def training_data(row: str):
        kind = "image" if row in ("image", "image-stats") else "data"
        if kind not in images:
            if kind == "image":  # the row's own stream (the method's patch size), not a preset-all one
                run = PretrainConfig(method=config.method, out=out, images=[config.image or f"builtin:{DEFAULT_IMAGE}"],
                                     preset=config.preset, seed=config.seed)
                images[kind] = first_samples(build_source(run, random)[0], WHITENING_SAMPLES)
            else:
                images[kind] = data_images(config.data, WHITENING_SAMPLES, seed=config.seed)
        return images[kind]

    networks = []
    for r in rows:
        if r == "random":
            trunk = random
        elif r in REFERENCE_ROWS:
            trunk = load_trunk(runs.read_json(out / r / "reference.json", "reference")["run"])[0]
        else:
            trunk = load_trunk(out / r)[0]
        networks.append(Network(labels[r], trunk.eval(), pattern_images=training_data(r),
                                pattern_data="the one image" if r in ("image", "image-stats") else config.data))
    write_filters(networks, out / "filters.png")
