"""What one image can carry: `distillation_table(ReproduceConfig) -> Table` (`monossl reproduce distillation`).

One teacher (the CIFAR trunk trained with labels, row `teacher`) is distilled into fresh students
(methods/distill.py) through different unlabelled sources, each student scored by its own head on
the labelled test set:

    data            the dataset's training images (the upper bound: the teacher's own inputs)
    none ... all    patches of one image (the built-in default) with each augmentation preset:
                    which augmentations carry the classes?
    deka            patches of ten built-in photographs (the paper's "deka" variant)
    dead-leaves     patches of a procedural image with no natural content (data/procedural.py)
    noise           patches of uniform noise (the lower bound)

The rows of `SEEDED_ROWS` (one image, dead leaves, noise) run once per seed of the budget, so the
gaps between them can be told from seed noise (mean, sample standard deviation and each seed's
number in the table). Every row's student is its own run directory (OUT/<row>[-seed<k>]/); reruns,
stopped rows: experiments/table.py. Writes table.md, table.csv, results.json and table.png, with
the number of the paper this follows (Asano & Saeed 2023) beside ours.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from pathlib import Path

from monossl import paper, runs
from monossl.errors import UserError
from monossl.experiments.table import (
    Budget,
    ReproduceConfig,
    Row,
    Table,
    check_table_settings,
    parse_rows,
    pretrained,
    run_rows,
)
from monossl.pretrain import PretrainConfig

log = logging.getLogger(__name__)

EXPERIMENT = "distillation"
PRESET_ROWS = ("none", "jitter", "rotation", "scale", "rotation+jitter", "rotation+scale", "jitter+scale", "all")
ROWS = ("teacher", "data", *PRESET_ROWS, "deka", "dead-leaves", "noise")
SEEDED_ROWS = ("all", "dead-leaves", "noise")
DEKA = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
        "coins", "grass", "brick")
SOURCES = {"dead-leaves": "procedural:dead-leaves", "noise": "procedural:noise"}

BUDGETS = {
    "smoke": Budget(
        "smoke", steps={"supervised": 4, "distill": 4}, batch={"supervised": 16, "distill": 16},
        probe_test_subset=200, note="a check that every piece runs; the numbers mean nothing"),
    "quick": Budget(
        "quick", steps={"supervised": 8000, "distill": 1500}, batch={"supervised": 128, "distill": 128},
        probe_test_subset=2000,
        note="on 2 CPU cores: the teacher about 10 min (8000 x 128), each student about 2.5 min (1500 x 128)"),
    "paper": Budget(
        "paper", steps={"supervised": 20000, "distill": 50000}, batch={"supervised": 256, "distill": 256},
        note="for a GPU; lengths chosen here (the paper trains far larger students for hundreds of epochs)"),
}
SEEDS = {"smoke": (0, 1), "quick": (0, 1, 2), "paper": (0, 1, 2)}


def settings(config: ReproduceConfig) -> dict:
    from monossl.data.sources import DEFAULT_IMAGE

    for option in ("method", "arch", "finetune_steps", "dc_patches", "subset", "probe_epochs", "eval_data"):
        if getattr(config, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} does not apply to {EXPERIMENT}")
    if config.budget not in BUDGETS:
        raise UserError(f"--budget {config.budget}: {EXPERIMENT} has budgets {', '.join(BUDGETS)}")
    b = BUDGETS[config.budget]
    return {
        "experiment": EXPERIMENT, "budget": b.name, "budget_note": b.note, "data": config.data or "cifar10",
        "image": config.images or [f"builtin:{DEFAULT_IMAGE}"], "seed": config.seed, "widths": config.widths,
        "rows": parse_rows(config.rows, ROWS), "seeds": [config.seed + k for k in SEEDS[b.name]],
        "steps": {m: config.steps or b.steps[m] for m in ("supervised", "distill")},
        "batch_size": {m: config.batch_size or b.batch[m] for m in ("supervised", "distill")},
        "eval_subset": config.test_subset or b.probe_test_subset,
        "whiten_conv1": config.whiten_conv1,
    }


def _source(row: str, s: dict) -> dict:
    """What a student row distils through: DistillationConfig fields."""
    if row == "data":
        return {"data": s["data"]}
    if row in PRESET_ROWS:
        return {"images": list(s["image"]), "preset": row}
    if row == "deka":
        return {"images": [f"builtin:{name}" for name in DEKA]}
    return {"images": [SOURCES[row]]}


def distillation_table(config: ReproduceConfig) -> Table:
    from monossl.eval.accuracy import classifier_accuracy
    from monossl.eval.distillation import DistillationConfig, distill
    from monossl.models.classifier import load_classifier

    s = settings(config)
    out = runs.lock_run_dir(config.out or f"runs/reproduce-{EXPERIMENT}-{s['budget']}")
    check_table_settings(out, s, "reproduce.json")
    log.info(f"reproduce {EXPERIMENT}: budget {s['budget']} ({s['budget_note']}) -> {out}")
    teacher_dir = out / "teacher"
    progress = None if config.progress else False

    def make_teacher():
        from monossl.data.datasets import load_dataset

        pretrained(PretrainConfig(method="supervised", data=s["data"], out=teacher_dir, widths=s["widths"],
                                  steps=s["steps"]["supervised"], batch_size=s["batch_size"]["supervised"],
                                  seed=s["seed"], device=config.device, whiten_conv1=s["whiten_conv1"],
                                  progress=progress))
        teacher = load_classifier(teacher_dir)[0]
        return {"teacher": classifier_accuracy(teacher, load_dataset(s["data"], "test"))}

    def make_student(row: str, seed: int, row_dir: Path):
        def student():
            if "teacher" not in s["rows"] and not (teacher_dir / "classifier.pt").exists():
                raise UserError(f"{teacher_dir} holds no teacher yet: run the table with the teacher row first")
            result = distill(DistillationConfig(
                teacher=str(teacher_dir), out=row_dir, eval_data=s["data"], widths=s["widths"],
                steps=s["steps"]["distill"], batch_size=s["batch_size"]["distill"], seed=seed,
                eval_subset=s["eval_subset"], whiten_conv1=s["whiten_conv1"], device=config.device,
                progress=progress, resume=(row_dir / "last.pt").exists(), **_source(row, s)))
            assert result is not None  # no stop_after here: the run finished
            return {**result, "row": row}
        return student

    rows = []
    for row in s["rows"]:
        if row == "teacher":
            rows.append(Row("teacher", "the teacher (supervised)", teacher_dir / "teacher.json", make_teacher,
                            runs.write_json))
            continue
        for seed in (s["seeds"] if row in SEEDED_ROWS else [s["seed"]]):
            name = f"{row}-seed{seed}" if row in SEEDED_ROWS else row
            rows.append(Row(name, f"student through {row}, seed {seed}", out / name / "distill.json",
                            make_student(row, seed, out / name), runs.write_json))
    done = run_rows(rows)
    table_config = {**s, "seconds_per_row": done.seconds, "seconds_this_invocation": done.seconds_this_invocation}
    md = write_table(out, s["rows"], done.results, done.stopped, table_config)
    return Table(out, md, done.stopped, ("table.md", "table.csv", "results.json", "table.png"))


def summarise(rows: list[str], results: dict) -> dict:
    """{row: {"top1": mean, "std": sample std or None, "seeds": {seed: top1}, "agreement": mean}} over the
    row's finished runs."""
    table = {}
    for row in rows:
        if row == "teacher":
            if "teacher" in results:
                t = results["teacher"]["teacher"]
                table[row] = {"top1": t["top1"], "std": None, "seeds": {}, "agreement": None, "top5": t["top5"]}
            continue
        runs_of_row = {int(name.rsplit("-seed", 1)[1]) if "-seed" in name else None: r
                       for name, r in results.items() if name == row or name.startswith(f"{row}-seed")}
        if not runs_of_row:
            continue
        top1 = [r["student"]["top1"] for r in runs_of_row.values()]
        table[row] = {"top1": round(statistics.mean(top1), 2),
                      "std": round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
                      "seeds": {str(k): r["student"]["top1"] for k, r in runs_of_row.items() if k is not None},
                      "agreement": round(statistics.mean(r["student"]["agreement"] for r in runs_of_row.values()), 2),
                      "top5": round(statistics.mean(r["student"]["top5"] for r in runs_of_row.values()), 2),
                      "fraction_of_teacher": round(statistics.mean(r["fraction_of_teacher"]
                                                                   for r in runs_of_row.values()), 4)}
    return table


def write_table(out: Path, rows: list[str], results: dict, stopped: dict, config: dict) -> str:
    from monossl.viz.figures import save_figure
    from monossl.viz.plots import ranked_bars_figure

    table = summarise(rows, results)
    header = ["source", "top-1", "seeds", "top-5", "agreement with teacher", "of the teacher"]
    body = []
    for row in rows:
        if row not in table:
            body.append([row, "stopped" if any(k.startswith(row) for k in stopped) else "not run", "", "", "", ""])
            continue
        v = table[row]
        spread = f" ± {v['std']:.1f}" if v["std"] is not None else ""
        body.append([row, f"{v['top1']:.1f}{spread}", ", ".join(f"{x:.1f}" for x in v["seeds"].values()),
                     f"{v['top5']:.1f}", "" if v["agreement"] is None else f"{v['agreement']:.1f}",
                     "" if row == "teacher" else f"{100 * v['fraction_of_teacher']:.0f}%"])
    lines = [
        f"Distillation through unlabelled sources (Asano & Saeed 2023), budget `{config['budget']}`: a CIFAR-trunk "
        f"teacher trained with {config['data']}'s labels ({config['steps']['supervised']} steps of "
        f"{config['batch_size']['supervised']}), distilled into fresh students of the same trunk "
        f"({config['steps']['distill']} steps of {config['batch_size']['distill']}, KL at T = 8, CutMix), each scored "
        f"by its own head on {config['data']}'s test set (top-1 %, final step); rows {', '.join(SEEDED_ROWS)}: mean "
        f"± sample std over seeds {', '.join(map(str, config['seeds']))}. One image: {', '.join(config['image'])}.",
        "",
        runs.markdown_table(header, body).rstrip("\n"),
        "",
        f"The paper: a student distilled through one image reaches {paper.AIP_CIFAR10_ONE_IMAGE:.0f}% on CIFAR-10 "
        f"from a teacher of about {paper.AIP_CIFAR10_TEACHER:.0f}% (far larger networks, far longer training).",
    ]
    for row, message in stopped.items():
        lines += ["", f"Row `{row}` stopped: {message}"]
    md = "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["source", "top1_mean", "top1_std", "seed", "top1", "top5", "agreement"])
    for row, v in table.items():
        for seed, top1 in (v["seeds"] or {"": v["top1"]}).items():
            writer.writerow([row, v["top1"], v["std"] if v["std"] is not None else "", seed, top1, v["top5"],
                             v["agreement"] if v["agreement"] is not None else ""])
    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", buf.getvalue())
    runs.write_json(out / "results.json", {
        "title": f"Distillation through unlabelled sources, budget {config['budget']}", "config": config,
        "table": table, "stopped": stopped, "paper": {"one_image": paper.AIP_CIFAR10_ONE_IMAGE,
                                                      "teacher": paper.AIP_CIFAR10_TEACHER},
        "rows": results, "environment": runs.environment()})
    students = {r: (v["top1"], v["std"]) for r, v in table.items() if r != "teacher"}
    teacher = ("teacher", table["teacher"]["top1"]) if "teacher" in table else None
    save_figure(ranked_bars_figure(students, f"student top-1 on {config['data']} test (%)", reference=teacher,
                                   title=f"distilled through each source, budget {config['budget']}"),
                out / "table.png")
    return md
