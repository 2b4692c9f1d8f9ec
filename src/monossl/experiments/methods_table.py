"""Every method on one image, side by side: `methods_table(ReproduceConfig) -> Table`
(`monossl reproduce methods`).

Rows, all on one trunk (the CIFAR trunk unless --arch), each its own run directory under OUT:

    random          the freshly initialised trunk
    <method>        the method on patches of one image (the built-in default unless --image),
                    preset `all`, for rotnet, deepcluster, bigan, simclr, moco and dino
    <method>-data   the same method and budget on the dataset's training images, no labels
    supervised      the trunk trained with the dataset's labels (as many samples as the main job's)

Every trunk is probed on `--data` (CIFAR-10 by default) and on each `--eval-data` set: linear
probes (protocol `cifar`) and weighted k-NN (k = 20, 200; eval/knn.py) on every tap. Budget
`main` trains every method for its own default length (its class's `defaults`, pretrain.defaults_of: the
main job's per-row budget) and probes on the whole dataset; `smoke` checks that every piece runs.
Writes table.md (linear, k-NN and the minutes each row took, per evaluation set, then whether each
one-image row beats the random trunk at every tap), table.csv, results.json, table.png (linear) and
knn.png (k = 20): per tap, each method on one image beside it on the dataset, random and
supervised as lines. Reruns, stopped rows: experiments/table.py.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from monossl import runs
from monossl.errors import UserError
from monossl.experiments.compare import supervised_steps
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
    seen_text,
)
from monossl.models import load_trunk, random_trunk, save_trunk, trunk_config_from
from monossl.pretrain import PretrainConfig, defaults_of

log = logging.getLogger(__name__)

EXPERIMENT = "methods"
METHODS = ("rotnet", "deepcluster", "bigan", "simclr", "moco", "dino")
ROWS = ("random", *METHODS, *(f"{m}-data" for m in METHODS), "supervised")
ARCHS = ("cifar", "resnet18-cifar")
KNN = (20, 200)

BUDGETS = {
    "smoke": Budget(
        "smoke", steps={**{m: 4 for m in METHODS}, "supervised": 4},
        batch={**{m: 16 for m in METHODS}, "deepcluster": 32, "supervised": 16},
        dc_patches=256, dc_epochs=1, probe_subset=1000, probe_test_subset=500, probe_epochs=2,
        note="a check that every piece runs; the numbers mean nothing"),
    "main": Budget(
        "main", dc_patches=None, dc_epochs=None,
        note="every method at its own default length (the main job's per-row budget), full probes; "
             "about 1 h on 2 CPU cores for the CIFAR trunk"),
}


def settings(config: ReproduceConfig) -> dict:
    """The resolved settings (budget + overrides): what a rerun must match."""
    from monossl.data.sources import DEFAULT_IMAGE

    for option in ("method", "finetune_steps", "dc_patches"):
        if getattr(config, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} does not apply to {EXPERIMENT}")
    if config.budget not in BUDGETS:
        raise UserError(f"--budget {config.budget}: {EXPERIMENT} has budgets {', '.join(BUDGETS)}")
    arch = config.arch or "cifar"
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: {EXPERIMENT} takes {', '.join(ARCHS)}")
    if config.widths and arch != "cifar":
        raise UserError("--widths applies to --arch cifar only")
    trunk_config_from(config.widths, None)  # validates --widths
    b = BUDGETS[config.budget]
    data = config.data or "cifar10"
    eval_data = [data, *[d for d in (config.eval_data or []) if d != data]]
    _probe_dirs(eval_data)  # refuses two sets that would share a folder
    steps = {m: config.steps or b.steps.get(m) for m in METHODS}
    batch = {m: config.batch_size or b.batch.get(m) or defaults_of(m).batch_size for m in METHODS}
    # supervision sees as many samples as the main job's one-image row (SimCLR's 2 views)
    sup_steps = config.steps or b.steps.get("supervised") or supervised_steps("simclr", None)
    return {
        "experiment": EXPERIMENT, "budget": b.name, "budget_note": b.note, "arch": arch, "widths": config.widths,
        "image": config.images or [f"builtin:{DEFAULT_IMAGE}"], "data": data,
        "eval_data": eval_data,
        "seed": config.seed, "rows": parse_rows(config.rows, ROWS),
        "steps": {**steps, "supervised": sup_steps},
        "batch_size": {**batch, "supervised": config.batch_size or b.batch.get("supervised")
                       or defaults_of("supervised").batch_size},
        "dc_patches": b.dc_patches, "dc_epochs": None if config.steps else b.dc_epochs,
        "probe_subset": config.subset or b.probe_subset, "probe_test_subset": config.test_subset or b.probe_test_subset,
        "probe_epochs": config.probe_epochs or b.probe_epochs, "knn": list(KNN),
        "whiten_conv1": config.whiten_conv1,
    }


def pretrain_config(row: str, s: dict, row_dir: Path, config: ReproduceConfig) -> PretrainConfig:
    common = dict(out=row_dir, arch=s["arch"], widths=s["widths"], seed=s["seed"], device=config.device,
                  whiten_conv1=s["whiten_conv1"], progress=None if config.progress else False)
    if row == "supervised":
        return PretrainConfig(method="supervised", data=s["data"], steps=s["steps"]["supervised"],
                              batch_size=s["batch_size"]["supervised"], **common)
    method = row.removesuffix("-data")
    source = dict(data=s["data"]) if row.endswith("-data") else dict(images=list(s["image"]), preset="all")
    length = dict(steps=s["steps"][method])
    if method == "deepcluster" and s["dc_epochs"] and "images" in source:  # epochs over a small set of patches
        length = dict(epochs=s["dc_epochs"], num_patches=s["dc_patches"])
    return PretrainConfig(method=method, batch_size=s["batch_size"][method], **source, **length, **common)


def label(row: str, data: str = "data") -> str:
    if row in ("random", "supervised"):
        return row
    if row.endswith("-data"):
        return f"{row.removesuffix('-data')}, {data} train"
    return f"{row}, one image"


def _eval_sets(s: dict, input_size: int) -> dict:
    """{dataset: (train, test)} for the probes: subsets per the budget, resized to the trunk's input
    (STL-10's 96 px for a 32-px trunk) once here rather than per batch."""
    from monossl.data.datasets import load_pair, subset

    sets = {}
    for name in s["eval_data"]:
        pair = load_pair(name)
        if s["probe_subset"]:
            pair = (subset(pair[0], s["probe_subset"], seed=s["seed"]), pair[1])
        if s["probe_test_subset"]:
            pair = (pair[0], subset(pair[1], s["probe_test_subset"], seed=s["seed"]))
        sets[name] = tuple(d.resized(input_size) if hasattr(d, "resized") else d for d in pair)
    return sets


def _probe_dirs(eval_data: list[str], protocol: str = "cifar") -> dict[str, str]:
    """Each evaluation set's probe folder in a row's run directory, named as every other command
    names it (`probe_dir_name`: probe-<protocol> on CIFAR-10, probe-<protocol>-<name> on the others)."""
    from monossl.eval.results import probe_dir_name

    dirs: dict[str, str] = {}
    for spec in eval_data:
        name = probe_dir_name(protocol, spec)
        if name in dirs.values():
            raise UserError(f"--eval-data: two sets would share {name}/; give each kind once")
        dirs[spec] = name
    return dirs


def methods_table(config: ReproduceConfig) -> Table:
    """Pretrain and probe the asked rows (those not done before) and write the table."""
    from monossl.eval.probe import probe
    from monossl.eval.protocols import get_protocol

    s = settings(config)
    protocol = get_protocol("cifar" if s["arch"] == "cifar" else "resnet-cifar").with_overrides(
        epochs=s["probe_epochs"])
    probe_dirs = _probe_dirs(s["eval_data"], protocol.name)
    sets = _eval_sets(s, protocol.input_size)
    out = runs.lock_run_dir(config.out or f"runs/reproduce-methods-{config.budget}")
    check_table_settings(out, s, "reproduce.json")
    log.info(f"reproduce {EXPERIMENT}: budget {s['budget']} ({s['budget_note']}); {len(s['rows'])} rows x "
             f"{len(sets)} evaluation set(s) -> {out}")

    def trunk_of(row: str):
        row_dir = out / row
        if row != "random":
            return load_trunk(pretrained(pretrain_config(row, s, row_dir, config)))
        if (row_dir / "trunk.pt").exists():
            return load_trunk(row_dir)
        trunk_config = trunk_config_from(s["widths"], None) if s["arch"] == "cifar" else {}
        trunk, meta = random_trunk(s["arch"], s["seed"], **trunk_config), {"method": "random", "seed": s["seed"]}
        save_trunk(runs.ensure_writable_dir(row_dir) / "trunk.pt", trunk, meta)
        return trunk, meta

    def make(row: str, dataset: str):
        def probe_row():
            trunk, meta = trunk_of(row)
            train, test = sets[dataset]
            result = probe(trunk, train, test, protocol, device=config.device, seed=s["seed"], knn=KNN,
                           progress=config.progress, verbose=config.progress, meta=meta, dataset=dataset)
            result["seen"] = samples_seen(None if row == "random" else out / row)
            return result
        return probe_row

    rows = [Row(f"{r}@{d}", f"{label(r, s['data'])} -> {d}", out / r / probe_dirs[d] / "results.json", make(r, d))
            for r in s["rows"] for d in s["eval_data"]]
    done = run_rows(rows)
    table_config = {**s, "protocol": protocol.to_dict(), "seconds_this_invocation": done.seconds_this_invocation}
    md = write_table(out, s, done.results, done.stopped, table_config)
    return Table(out, md, done.stopped, ("table.md", "table.csv", "results.json", "table.png", "knn.png"))


# ---------------------------------------------------------------------------- the table


def beats_random(results: dict, dataset: str) -> list[dict]:
    """For each one-image row: does it beat the random trunk at every tap (linear top-1)?"""
    random = results.get(f"random@{dataset}")
    out = []
    for method in METHODS:
        row = results.get(f"{method}@{dataset}")
        if random is None or row is None:
            continue
        margins = {t: round(float(row["taps"][t]["top1"]) - float(random["taps"][t]["top1"]), 2)
                   for t in row["taps"]}
        out.append({"row": method, "holds": min(margins.values()) > 0, "margins": margins})
    return out


def write_table(out: Path, s: dict, results: dict, stopped: dict, config: dict) -> str:
    from monossl.eval.results import data_name
    from monossl.viz.figures import save_figure
    from monossl.viz.plots import methods_figure

    proto = config["protocol"]
    lines = [f"Every method on one image (`monossl reproduce methods`), budget `{s['budget']}` ({s['budget_note']}); "
             f"trunk {s['arch']}, image {', '.join(s['image'])}, seed {s['seed']}. Linear probes: top-1 (%) at the "
             f"final epoch, protocol `{proto['name']}` ({proto['epochs']} epochs); k-NN: weighted, cosine, T 0.07, "
             "on the same pooled features. Minutes: the row's pretraining and evaluation, wall clock.", ""]
    csv_rows, json_rows = [], {}
    for dataset in s["eval_data"]:
        names = [r for r in s["rows"] if f"{r}@{dataset}" in results]
        if not names:
            continue
        taps = list(results[f"{names[0]}@{dataset}"]["taps"])
        linear = {r: {t: float(results[f"{r}@{dataset}"]["taps"][t]["top1"]) for t in taps} for r in names}
        knn = {r: results[f"{r}@{dataset}"].get("knn", {}) for r in names}
        minutes = {r: _minutes(results, r, s["eval_data"]) for r in names}
        n = results[f"{names[0]}@{dataset}"]
        lines += [f"### {dataset} ({n['n_train']} train / {n['n_test']} test images)", "",
                  runs.markdown_table(["row", *taps, *(f"k20 {t}" for t in taps), "minutes", "samples seen"],
                                      [[label(r, s["data"]), *linear[r].values(),
                                        *(knn[r].get(t, {}).get("k20", "") for t in taps),
                                        minutes[r], seen_text(results[f"{r}@{dataset}"].get("seen"))]
                                       for r in names]).rstrip("\n"), ""]
        checks = beats_random(results, dataset)
        for c in checks:
            worst = min(c["margins"], key=c["margins"].get)
            lines.append(f"- {c['row']} on one image {'beats' if c['holds'] else 'does NOT beat'} the random trunk "
                         f"at every tap (smallest margin {c['margins'][worst]:+.1f} at {worst})")
        lines.append("")
        for r in names:
            for t in taps:
                csv_rows.append([r, dataset, t, linear[r][t], results[f"{r}@{dataset}"]["taps"][t]["top5"],
                                 *(knn[r].get(t, {}).get(f"k{k}", "") for k in KNN), minutes[r]])
        json_rows[dataset] = {"linear": linear, "knn": knn, "minutes": minutes, "beats_random": checks}
        suffix = "" if dataset == s["eval_data"][0] else "-" + data_name(dataset)
        data_label = f"{s['data']} train"
        save_figure(methods_figure(linear, METHODS, f"linear probes on {dataset}, budget {s['budget']}",
                                   data_label=data_label), out / f"table{suffix}.png")
        save_figure(methods_figure({r: {t: v["k20"] for t, v in knn[r].items()} for r in names if knn[r]}, METHODS,
                                   f"k-NN (k = 20) on {dataset}, budget {s['budget']}", ylabel="k-NN top-1 (%)",
                                   data_label=data_label), out / f"knn{suffix}.png")
    for row, message in stopped.items():
        lines.append(f"Row `{row}` stopped: {message}")
    md = "\n".join(lines).rstrip("\n") + "\n"

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "dataset", "tap", "top1", "top5", *(f"knn_k{k}" for k in KNN), "row_minutes"])
    writer.writerows(csv_rows)
    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", buf.getvalue())
    runs.write_json(out / "results.json", {
        "title": f"every method on one image, budget {s['budget']}", "config": config, "tables": json_rows,
        "stopped": stopped,
        "rows": {name: {k: r.get(k) for k in ("taps", "knn", "knn_dims", "trunk", "n_train", "n_test", "timings",
                                              "knn_s", "row_seconds")} for name, r in results.items()},
        "environment": runs.environment(),
    })
    return md


def _minutes(results: dict, row: str, datasets: list[str]) -> float | str:
    """The row's wall clock over all its evaluation sets (its pretraining is counted in the first)."""
    seconds = [results.get(f"{row}@{d}", {}).get("row_seconds") for d in datasets]
    known = [x for x in seconds if x is not None]
    return round(sum(known) / 60, 1) if known else ""
