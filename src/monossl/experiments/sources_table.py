"""One photograph beside other sources on equal footing: `sources_table(ReproduceConfig) -> Table`
(`monossl reproduce sources`).

Every row is the same trunk from the same initial weights per seed (`pretrain.initial_trunk`: the
seeded trunk, conv1 then whitened on the row's own first samples, as in `monossl compare`), trained
by the same method and budget (the main job's one-image row: SimCLR, its default length, unless
`--method`/`--budget`), and probed with the same protocol (linear per tap, protocol `cifar`, and
weighted k-NN per tap on the same pooled features):

    random        the freshly initialised trunk, nothing from any data
    image-stats   control: the random trunk with conv1 whitened on the one image's patches and every
                  BatchNorm's statistics re-estimated on them; no gradient step (`statistics_trunk`)
    image         the main job's one image (builtin:astronaut unless --image), preset all
    chelsea, coffee
                  two other built-in photographs, preset all
    ten-images    the ten built-in photographs of the "deka" setting (experiments/distillation.py)
    fractal-one   procedural:fractal:one (one IFS fractal, perturbed per sample)
    fractals      procedural:fractal (a new IFS fractal per sample)
    dead-leaves   procedural:dead-leaves (one dead-leaves image, preset all)
    spectral      procedural:spectral (1/f^a coloured noise, a new image per sample)
    noise         procedural:noise (one white-noise image, preset all)
    full          the dataset's own training images, without labels

`--distill TEACHER` (a run directory with classifier.pt) trains each trained row as a distillation
student of that teacher instead (methods/distill.py, through the row's source), probed the same
way and scored by its own head too. `--seeds 0,1,2` runs every row per seed (OUT/seed-K/<row>/) and
gives each cell's mean ± sample sd (experiments/seeds.py). Writes table.md, table.csv, results.json
and table.png (bars per tap with error bars beside each source's first samples). Reruns skip finished
rows; other settings in the same OUT are refused (experiments/table.py). The table covers every row
finished in OUT, so `--rows`/`--seeds` can add seeds to some rows later (the synthetic rows' three
seeds, say) and the table then shows each row's number of seeds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from monossl import runs
from monossl.errors import UserError
from monossl.eval.results import probe_dir_name
from monossl.experiments.compare import DEFAULT_METHOD
from monossl.experiments.distillation import DEKA
from monossl.experiments.sources_output import write_table
from monossl.experiments.table import (
    Budget,
    ReproduceConfig,
    Row,
    Table,
    check_table_settings,
    parse_rows,
    pretrained,
    run_rows,
    samples_seen,
)
from monossl.models import load_trunk, random_trunk, save_trunk, trunk_config_from
from monossl.pretrain import BN_SAMPLES, WHITEN_CONV1_ARCHS, PretrainConfig, method_class, statistics_trunk

log = logging.getLogger(__name__)

EXPERIMENT = "sources"
#: row -> the --image specs it trains on ("image": the settings' one image; "full": the dataset)
SOURCES: dict[str, list[str]] = {
    "chelsea": ["builtin:chelsea"],
    "coffee": ["builtin:coffee"],
    "ten-images": [f"builtin:{name}" for name in DEKA],
    "fractal-one": ["procedural:fractal:one"],
    "fractals": ["procedural:fractal"],
    "dead-leaves": ["procedural:dead-leaves"],
    "spectral": ["procedural:spectral"],
    "noise": ["procedural:noise"],
}
ROWS = ("random", "image-stats", "image", *SOURCES, "full")
UNTRAINED = ("random", "image-stats")
LABELS = {"random": "random trunk", "image-stats": "one image, statistics only", "image": "one image",
          "chelsea": "photograph: chelsea", "coffee": "photograph: coffee", "ten-images": "ten photographs",
          "fractal-one": "one fractal", "fractals": "many fractals", "dead-leaves": "dead leaves",
          "spectral": "spectral noise", "noise": "white noise", "full": "dataset images (no labels)"}
KNN = (20, 200)
#: DeepCluster on a stream: a finite set of its first patches (None: the method's default, 32,768)
DC_PATCHES = {"smoke": 256, "quick": None, "main": None}

BUDGETS = {
    "smoke": Budget(
        "smoke", steps={"ssl": 4, "distill": 4}, batch={"ssl": 16, "distill": 16},
        probe_subset=1000, probe_test_subset=500, probe_epochs=2,
        note="a check that every piece runs; the numbers mean nothing"),
    "quick": Budget(
        "quick", steps={"distill": 1500}, batch={"distill": 128},
        probe_subset=10000, probe_test_subset=2000, probe_epochs=15,
        note="the main job's one-image row per source (distillation students: 1500 x 128, the distillation "
             "table's quick budget); probes on 10,000 / 2,000 images, 15 epochs"),
    "main": Budget(
        "main", steps={"distill": 1500}, batch={"distill": 128},
        note="the main job's one-image row per source (distillation students: 1500 x 128, the distillation "
             "table's quick budget); full probes as the main job's"),
}


def settings(config: ReproduceConfig) -> dict:
    """The resolved settings (budget + overrides): what a rerun must match (its rows and seeds may differ)."""
    from monossl.data.sources import DEFAULT_IMAGE

    for option in ("arch", "finetune_steps", "eval_data"):
        if getattr(config, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} does not apply to {EXPERIMENT}")
    if config.budget not in BUDGETS:
        raise UserError(f"--budget {config.budget}: {EXPERIMENT} has budgets {', '.join(BUDGETS)}")
    if config.distill and config.method:
        raise UserError("--method and --distill: a sources table trains either a method or students; give one")
    method = "distill" if config.distill else (config.method or DEFAULT_METHOD)
    if method != "distill" and (method == "supervised" or method_class(method).needs != "images"):
        raise UserError(f"--method {method} is not self-supervised; choose one that learns from images alone")
    image = config.images or [f"builtin:{DEFAULT_IMAGE}"]
    if len(image) != 1 or image[0].startswith("procedural:"):
        raise UserError(f"--image: {EXPERIMENT} takes one photograph for its one-image row, got {image}")
    trunk_config_from(config.widths, None)  # validates --widths
    b = BUDGETS[config.budget]
    kind = "distill" if config.distill else "ssl"
    seeds = list(dict.fromkeys(config.seeds or [config.seed]))
    return {
        "experiment": EXPERIMENT, "budget": b.name, "budget_note": b.note, "method": method,
        "teacher": str(Path(config.distill).resolve()) if config.distill else None,
        "data": config.data or "cifar10", "image": image, "sources": {**SOURCES, "image": image},
        "rows": parse_rows(config.rows, ROWS), "seeds": seeds, "arch": "cifar", "widths": config.widths,
        "steps": config.steps or b.steps.get(kind), "batch_size": config.batch_size or b.batch.get(kind),
        "dc_patches": (config.dc_patches or DC_PATCHES[b.name]) if method == "deepcluster" else None,
        "probe_subset": config.subset or b.probe_subset, "probe_test_subset": config.test_subset or b.probe_test_subset,
        "probe_epochs": config.probe_epochs or b.probe_epochs, "knn": list(KNN),
        "whiten_conv1": ("cifar" in WHITEN_CONV1_ARCHS) if config.whiten_conv1 is None else config.whiten_conv1,
        "statistics_bn_samples": BN_SAMPLES,
    }


def source_of(row: str, s: dict) -> dict:
    """What a trained row trains on: PretrainConfig / DistillationConfig fields."""
    if row == "full":
        return {"data": s["data"]}
    return {"images": list(s["sources"][row]), "preset": "all"}


def row_config(row: str, s: dict, seed: int, run_dir: Path, device: str = "auto",
               progress: bool | None = False) -> PretrainConfig:
    """A row's self-supervised pretraining (the image row's for image-stats): the same trunk, seed,
    method and budget in every row; only the source differs."""
    row = "image" if row == "image-stats" else row
    source = source_of(row, s)
    extra: dict[str, Any] = {"num_patches": s["dc_patches"]} if s["dc_patches"] and "images" in source else {}
    method = s["method"]
    if method == "distill":
        extra["method_options"] = {"teacher": s["teacher"]}
    return PretrainConfig(method=method, out=run_dir, arch=s["arch"], widths=s["widths"], seed=seed,
                          whiten_conv1=s["whiten_conv1"], steps=s["steps"], batch_size=s["batch_size"],
                          device=device, progress=progress, **source, **extra)


def _probe_sets(s: dict, seed: int, cache: dict) -> tuple:
    from monossl.data.datasets import load_pair, subset

    if "pair" not in cache:
        cache["pair"] = load_pair(s["data"])
    train, test = cache["pair"]
    if s["probe_subset"]:
        train = subset(train, s["probe_subset"], seed=seed)
    if s["probe_test_subset"]:
        test = subset(test, s["probe_test_subset"], seed=seed)
    return train, test


def sources_table(config: ReproduceConfig) -> Table:
    """Train (or distil), probe and tabulate the asked rows for every seed; see the module docstring."""
    from monossl.eval.probe import probe
    from monossl.eval.protocols import get_protocol

    s = settings(config)
    if s["teacher"]:
        from monossl.models.teachers import load_teacher

        load_teacher(s["teacher"])  # a bad teacher is refused before anything is written
    protocol = get_protocol("cifar").with_overrides(epochs=s["probe_epochs"])
    probe_dir = probe_dir_name(protocol.name, s["data"])
    sets: dict = {}
    _probe_sets(s, s["seeds"][0], sets)  # a bad --data is refused before anything is written
    default_out = f"runs/reproduce-{EXPERIMENT}-{'distill' if s['teacher'] else s['method']}-{s['budget']}"
    out = runs.lock_run_dir(config.out or default_out)
    check_table_settings(out, s, "reproduce.json", ignore=("rows", "seeds", "budget_note"))
    log.info(f"reproduce {EXPERIMENT}: {s['method']}, budget {s['budget']} ({s['budget_note']}); "
             f"{len(s['rows'])} rows x seeds {s['seeds']} -> {out}")
    progress = None if config.progress else False

    def trunk_of(row: str, seed: int, row_dir: Path) -> tuple:
        if row in UNTRAINED and not (row_dir / "trunk.pt").exists():
            if row == "random":
                trunk, meta = random_trunk("cifar", seed, **trunk_config_from(s["widths"], None)), \
                    {"method": "random", "seed": seed, "total_steps": 0}
            else:
                trunk, meta = statistics_trunk(row_config(row, s, seed, row_dir, config.device))
            save_trunk(runs.ensure_writable_dir(row_dir) / "trunk.pt", trunk, meta)
        if row in UNTRAINED:
            return (*load_trunk(row_dir), None)
        if s["teacher"]:
            return _student(row, s, seed, row_dir, config.device, progress)
        return (*load_trunk(pretrained(row_config(row, s, seed, row_dir, config.device, progress))), None)

    def make(row: str, seed: int, row_dir: Path):
        def probe_row() -> dict:
            trunk, meta, student = trunk_of(row, seed, row_dir)
            train, test = _probe_sets(s, seed, sets)
            result = cast(dict, probe(trunk, train, test, protocol, device=config.device, seed=seed, knn=KNN,
                                      progress=config.progress, verbose=False, meta=meta, dataset=s["data"]))
            result["seen"] = _seen(row, row_dir, meta)
            if student is not None:
                result["student"] = student
            return result
        return probe_row

    rows = [Row(f"{row}@seed{seed}", f"{LABELS[row]}, seed {seed}",
                out / f"seed-{seed}" / row / probe_dir / "results.json",
                make(row, seed, out / f"seed-{seed}" / row))
            for seed in s["seeds"] for row in s["rows"]]
    done = run_rows(rows)
    results = finished_results(out, probe_dir, done.results)
    # the table covers every row finished in OUT under these settings, this invocation's and earlier ones'
    # (so seeds can be added to a few rows at a time): its rows in ROWS' order, its seeds sorted
    seeds = sorted({int(k.rsplit("@seed", 1)[1]) for k in results})
    table_rows = [r for r in ROWS if r in s["rows"] or any(k.startswith(f"{r}@") for k in results)]
    s = {**s, "rows": table_rows, "seeds": seeds}
    table_config = {**s, "protocol": protocol.to_dict(), "seconds_this_invocation": done.seconds_this_invocation}
    specs = {r: source_of(r, s).get("data") or ",".join(source_of(r, s)["images"])
             for r in s["rows"] if r not in UNTRAINED}
    md = write_table(out, s, results, done.stopped, table_config, LABELS, specs)
    return Table(out, md, done.stopped, ("table.md", "table.csv", "results.json", "table.png"))


def finished_results(out: Path, probe_dir: str, results: dict) -> dict:
    """`results` ({"<row>@seed<k>": probe result}) with every other row's result finished in OUT
    (OUT/seed-K/<row>/<probe_dir>/results.json): earlier invocations' rows and seeds, made under the same
    settings (a run with others is refused before anything is written)."""
    found = dict(results)
    for path in sorted(out.glob(f"seed-*/*/{probe_dir}/results.json")):
        row, seed = path.parent.parent.name, path.parent.parent.parent.name.removeprefix("seed-")
        key = f"{row}@seed{int(seed)}" if seed.isdigit() else ""
        if row in ROWS and key and key not in found:  # this invocation's rows are in `results` already
            found[key] = runs.read_json(path, "probe result")
    return found


def _student(row: str, s: dict, seed: int, row_dir: Path, device: str, progress: bool | None) -> tuple:
    """A distillation student through the row's source: (trunk, meta, its own head's scores)."""
    from monossl.eval.distillation import DistillationConfig, distill

    if (row_dir / "student.json").exists():
        scores = runs.read_json(row_dir / "student.json", "student result")
    else:
        scores = distill(DistillationConfig(
            teacher=s["teacher"], out=row_dir, eval_data=s["data"], widths=s["widths"], steps=s["steps"],
            batch_size=s["batch_size"], seed=seed, eval_subset=s["probe_test_subset"],
            whiten_conv1=s["whiten_conv1"], device=device, progress=progress,
            resume=(row_dir / "last.pt").exists(), **source_of(row, s)))
        if scores is None:  # stopped early (never with the table's settings)
            raise UserError(f"{row_dir}: the student stopped before its last step")
    student = {k: scores["student"][k] for k in ("top1", "top5", "agreement") if k in scores["student"]}
    return (*load_trunk(row_dir), {**student, "teacher_top1": scores["teacher"]["top1"],
                                   "fraction_of_teacher": scores["fraction_of_teacher"]})


def _seen(row: str, row_dir: Path, meta: dict) -> dict:
    """How much data the row's trunk saw (table.samples_seen; a control: its BatchNorm samples, no step)."""
    if row == "random":
        return samples_seen(None)
    if row == "image-stats":
        return {"steps": 0, "images": meta["bn_samples"], "samples": meta["bn_samples"], "epochs": None,
                "note": "BatchNorm statistics only"}
    return samples_seen(row_dir)
