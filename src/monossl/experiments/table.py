"""What every table of `monossl compare` and `monossl reproduce` shares.

A table is a list of rows; each row makes a trunk (random, pretrained, or pretrained then
fine-tuned: its own run directory under the table's directory) and probes it. `run_rows` runs
them in order: a row whose probe results exist is read back, not redone (a rerun resumes a table,
and a row's pretraining resumes from its last checkpoint); a row whose training stops
(`TrainingStopped`) is recorded as stopped and the others still run. `Budget` is how much of
everything one table gets; `cells`, `cell_rows` and `cells_csv` put our numbers beside the paper's.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from monossl import runs
from monossl.errors import TrainingStopped, UserError
from monossl.eval.accuracy import StudentEval
from monossl.eval.curves import CurveProbe
from monossl.eval.results import ProbeResult, write_results
from monossl.pretrain import PretrainConfig, pretrain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How much of everything one table gets (None: the protocol's or the method's default).

    steps/batch: pretraining per method ("supervised" too); DeepCluster trains `dc_epochs` epochs over
    the stream's first `dc_patches` patches; supervision trains `supervised_epochs` epochs over --data
    when it has no steps. Fine-tuning (the ImageNet table): `finetune_steps`, or `finetune_epochs`
    over --data's training images, of `finetune_batch`. Probes: class-balanced subsets of the probe's
    train and test images, and `probe_epochs`."""

    name: str
    steps: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    dc_patches: int | None = 8192
    dc_epochs: int | None = 4
    supervised_epochs: int | None = None
    finetune_steps: int | None = None
    finetune_epochs: int | None = None
    finetune_batch: int = 128
    probe_subset: int | None = None
    probe_test_subset: int | None = None
    probe_epochs: int | None = None
    note: str = ""


@dataclass
class ReproduceConfig:
    """The options of `monossl reproduce` (both tables; each refuses those that are not its own).
    None: the budget's value."""

    method: str | None = None
    budget: str = "smoke"
    images: list[str] | None = None  # None: the built-in default image
    data: str | None = None
    eval_data: list[str] | None = None  # methods: more labelled sets to probe on, besides `data`
    arch: str | None = None
    out: str | Path | None = None
    rows: str | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    steps: int | None = None
    batch_size: int | None = None
    probe_epochs: int | None = None
    subset: int | None = None
    test_subset: int | None = None
    widths: str | None = None
    whiten_conv1: bool | None = None
    finetune_steps: int | None = None
    dc_patches: int | None = None
    seeds: list[int] | None = None  # sources: several seeds (None: `seed` alone)
    distill: str | None = None  # sources: a teacher's run directory; its rows become distillation students


@dataclass
class Table:
    """A written table: its directory, its Markdown, the rows whose training stopped, the files written."""

    out: Path
    markdown: str
    stopped: dict
    files: tuple[str, ...]


@dataclass
class Row:
    """One row: `make()` trains what is missing and returns its result, written to `result_file`
    by `write` (default: a probe result, eval.probe's dict: results.json and results.md beside it).
    A row whose result file exists is done."""

    name: str
    label: str
    result_file: Path
    make: Callable[[], dict]
    write: Callable[[Path, dict], None] | None = None


@dataclass
class RowResults:
    results: dict = field(default_factory=dict)  # row -> probe result
    stopped: dict = field(default_factory=dict)  # row -> why its training stopped
    seconds: dict = field(default_factory=dict)  # row -> wall clock of the invocation that made it
    seconds_this_invocation: float = 0.0


ROW_SECONDS_NOTE = "this row's training (this invocation only) + evaluation, wall clock"


def parse_rows(text: str | None, known: Sequence[str], default: Sequence[str] | None = None) -> list[str]:
    """'--rows a,b' -> the asked rows in the table's own order (default: all of `known`)."""
    if not text:
        return list(default or known)
    asked = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in asked if r not in known]
    if unknown or not asked:
        raise UserError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(known)}")
    return [r for r in known if r in asked]


def check_table_settings(out: Path, settings: dict, filename: str,
                         ignore: Collection[str] = ("rows", "budget_note")) -> None:
    """Refuse to mix settings in one table directory (the rows may differ: a table can be run a few rows
    at a time; a budget's note is prose, not a setting); the first run records them."""
    path = out / filename
    if not runs.check_settings(path, settings, f"{out} holds a table made with other settings ({{changed}}); "
                               "rerun with the same options to resume it, or choose another --out",
                               ignore=ignore, what="table settings"):
        runs.write_json(path, settings)


def pretrained(config: PretrainConfig, evaluators: Sequence[CurveProbe | StudentEval] = ()) -> Path:
    """A row's pretraining: its run directory, trained first unless it holds a finished trunk.pt;
    a run interrupted earlier (last.pt without trunk.pt) is resumed, not refused."""
    out = Path(config.out)
    if not (out / "trunk.pt").exists():
        pretrain(dataclasses.replace(config, resume=(out / "last.pt").exists()), evaluators=evaluators)
    return out


def samples_seen(run_dir: Path | None) -> dict:
    """How much data a trunk saw, from its run's config.json: steps, images (patches) drawn, samples
    through the trunk (a method's views count: SimCLR's two per image, RotNet's four rotations) and
    epochs over a finite training set (None for the unlimited patch stream). None: an untrained trunk."""
    from monossl.pretrain import method_class

    if run_dir is None:
        return {"steps": 0, "images": 0, "samples": 0, "epochs": 0.0}
    record = runs.read_json(Path(run_dir) / "config.json", "run configuration")
    images = record["total_steps"] * record["batch_size"]
    length = record["source"].get("length")
    return {"steps": record["total_steps"], "images": images, "samples": images * method_class(record["method"]).views,
            "epochs": round(images / length, 2) if length else None}


def seen_text(seen: dict | None) -> str:
    """A table's "samples seen" cell: samples through the trunk, and epochs over a finite set."""
    if not seen or not seen.get("samples"):
        return "0" if seen else ""
    text = f"{seen['samples']:,}"
    if seen.get("note"):
        return f"{text} ({seen['note']})"
    if seen.get("epochs"):
        return f"{text} ({seen['epochs']:g} epochs)"
    return f"{text} ({seen['images']:,} patches)"


def run_rows(rows: list[Row]) -> RowResults:
    """Make and probe every row not done before; see the module docstring."""
    done = RowResults()
    started = time.perf_counter()
    for i, row in enumerate(rows, 1):
        where = f"[{i}/{len(rows)} {row.name}]"
        results_json = row.result_file
        if results_json.exists():
            done.results[row.name] = runs.read_json(results_json, "probe result")
            done.seconds[row.name] = done.results[row.name].get("row_seconds")
            log.info(f"{where} done before: {results_json}")
            continue
        log.info(f"{where} {row.label}")
        t0 = time.perf_counter()
        try:
            result = row.make()
        except TrainingStopped as exc:
            done.stopped[row.name] = str(exc)
            log.warning(f"{where} {exc}")
            continue
        # the row's wall clock, kept beside its probe so that a rerun that skips the row still reports it
        result["row_seconds"] = round(time.perf_counter() - t0, 1)
        result["row_seconds_note"] = ROW_SECONDS_NOTE
        if row.write is None:  # then the row made a probe result (eval.probe's dict)
            write_results(results_json.parent, cast(ProbeResult, result))
        else:
            row.write(results_json, result)
        done.results[row.name], done.seconds[row.name] = result, result["row_seconds"]
    done.seconds_this_invocation = round(time.perf_counter() - started, 1)
    if not done.results:
        raise UserError("no row finished: " + "; ".join(f"{r}: {m}" for r, m in done.stopped.items()))
    return done


# ------------------------------------------------------------------------ our numbers beside the paper's


def cells(results: dict, rows: list[str], taps: Sequence[str], paper_of: Callable[[str], dict]) -> dict:
    """{row: {tap: {"ours", "paper", "diff"}}} for the rows with results; paper_of(row) -> {tap: the
    paper's top-1}."""
    table: dict = {}
    for row in rows:
        if row not in results:
            continue
        paper = paper_of(row)
        table[row] = {}
        for tap in taps:
            ours = float(results[row]["taps"][tap]["top1"])
            table[row][tap] = {"ours": ours, "paper": paper[tap], "diff": round(ours - paper[tap], 2)}
    return table


def cell_rows(rows: Sequence[str], taps: Sequence[str], table: dict, stopped: dict, label_of: Callable[[str], str],
              paper_of: Callable[[str], dict]) -> list[list[str]]:
    """Markdown table body: `ours (paper, diff)` per tap, or `stopped|not run (paper)` for rows without results."""
    body = []
    for row in rows:
        if row in table:
            body.append([label_of(row)] + [f"{c['ours']:.1f} ({c['paper']:.1f}, {c['diff']:+.1f})"
                                           for c in table[row].values()])
        else:
            why = "stopped" if row in stopped else "not run"
            body.append([label_of(row)] + [f"{why} ({paper_of(row)[t]:.1f})" for t in taps])
    return body


def cells_csv(rows: Sequence[str], taps: Sequence[str], table: dict, results: dict, stopped: dict,
              paper_name: Callable[[str], str | None], paper_of: Callable[[str], dict]) -> str:
    """table.csv: one line per row and tap (ours, paper, diff, top-5, best epoch, pooled size, status)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "paper_row", "tap", "ours", "paper", "diff", "top5", "best_top1", "best_epoch",
                     "pooled_size", "status"])
    for row in rows:
        for tap in taps:
            if row in table:
                v, c = results[row]["taps"][tap], table[row][tap]
                writer.writerow([row, paper_name(row), tap, c["ours"], c["paper"], c["diff"], v["top5"],
                                 v["best_top1"], v["best_epoch"], v["pooled_size"], "done"])
            else:
                writer.writerow([row, paper_name(row), tap, "", paper_of(row)[tap], "", "", "", "", "",
                                 "stopped" if row in stopped else "not run"])
    return buf.getvalue()
