"""The sources table's files (experiments/sources_table.py): table.md, table.csv, results.json and
table.png, every number drawn from the rows' own probe results (`{"<row>@seed<k>": result}`), each
cell the mean ± sample sd over the seeds that finished it (experiments/seeds.py)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from monossl import runs
from monossl.experiments.seeds import aggregate, format_cell
from monossl.experiments.table import seen_text

#: the numbers of a row that get a cell: (metric name, how to read them from one probe result)
METRICS = ("linear", "knn_k20", "knn_k200", "student")
#: the generated sources (the rest are photographs, controls or the dataset)
SYNTHETIC = ("fractal-one", "fractals", "dead-leaves", "spectral", "noise")


def _values(result: dict, metric: str) -> dict[str, float]:
    """{tap (or score): value} of one row's result for `metric`."""
    if metric == "linear":
        return {t: float(v["top1"]) for t, v in result["taps"].items()}
    if metric.startswith("knn_"):
        k = metric.removeprefix("knn_")
        return {t: float(v[k]) for t, v in result.get("knn", {}).items() if k in v}
    student = result.get("student") or {}
    return {k: float(student[k]) for k in ("top1", "agreement") if k in student}


def summarise(s: dict, results: dict) -> dict:
    """{metric: aggregated cells}, {row: minutes (mean over seeds)}, {row: samples seen} of the finished rows."""
    by_seed: dict[str, dict[int, dict]] = {m: {} for m in METRICS}
    seconds: dict[str, list[float]] = {}
    seen: dict[str, dict] = {}
    for seed in s["seeds"]:
        for row in s["rows"]:
            result = results.get(f"{row}@seed{seed}")
            if result is None:
                continue
            for metric in METRICS:
                values = _values(result, metric)
                if values:
                    by_seed[metric].setdefault(seed, {})[row] = values
            if result.get("row_seconds") is not None:
                seconds.setdefault(row, []).append(float(result["row_seconds"]))
            seen.setdefault(row, result.get("seen") or {})
    cells = {m: aggregate(v) for m, v in by_seed.items()}
    minutes = {r: round(statistics.fmean(v) / 60, 2) for r, v in seconds.items()}
    return {"cells": cells, "minutes": minutes, "seen": seen}


def write_table(out: Path, s: dict, results: dict, stopped: dict, config: dict, labels: dict[str, str],
                specs: dict[str, str]) -> str:
    """table.md, table.csv, results.json and table.png; returns the Markdown (drawn from results.json, as
    the README's copy is: `markdown`). labels: {row: its name in the table}; specs: {row: the --image list
    (comma-separated) or --data spec it trains on}."""
    summary = summarise(s, results)
    cells, minutes = summary["cells"], summary["minutes"]
    trained = "distillation students of " + str(s["teacher"]) if s["teacher"] else s["method"]
    record = {
        "kind": "sources", "title": f"sources on equal footing ({trained}), budget {s['budget']}", "config": config,
        "labels": {r: labels[r] for r in s["rows"]}, "cells": cells, "minutes": minutes, "seen": summary["seen"],
        "stopped": stopped,
        "rows": {name: {k: r.get(k) for k in ("taps", "knn", "student", "seen", "trunk", "n_train", "n_test",
                                              "row_seconds")} for name, r in results.items()},
        "environment": runs.environment()}
    md = caption(record) + "\n\n" + markdown(record) + "\n\n" + winners_markdown(record)
    if cells["student"]:
        md += "\n\nThe students' own heads on the test set:\n\n" + winners_markdown(record, "student")
    for row, message in stopped.items():
        md += f"\n\nRow `{row}` stopped: {message}"
    md += "\n"
    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", _csv(cells, minutes, s["seeds"]))
    runs.write_json(out / "results.json", record)
    linear = cells["linear"]
    done = [r for r in s["rows"] if r in linear]
    if done:
        _figure(out, s, {labels[r]: {t: c["mean"] for t, c in linear[r].items()} for r in done},
                {labels[r]: {t: c["sd"] for t, c in linear[r].items()} for r in done},
                {labels[r]: specs[r] for r in done if r in specs})
    return md


def caption(record: dict) -> str:
    """What the table is: method, budget, trunk, probes, what a cell and a minute are."""
    s = record["config"]
    proto = s["protocol"]
    trained = "distillation students of " + str(s["teacher"]) if s["teacher"] else s["method"]
    steps = s["steps"] or "the method's default number of"
    batch = f"{s['batch_size']} samples" if s["batch_size"] else "its default batch"
    return (f"Sources on equal footing (`monossl reproduce sources`), {trained}, budget `{s['budget']}` "
            f"({s['budget_note']}): the CIFAR trunk (widths {s['widths'] or 'default'}) from the same initial "
            f"weights per seed, each trained row {steps} steps of {batch} on its source; linear probes on "
            f"{s['data']} per tap (top-1 %, final epoch, protocol `{proto['name']}`, {proto['epochs']} epoch(s)) "
            "and weighted k-NN (k = 20) on the same pooled features. Cells: mean ± sample sd over the seeds "
            "that finished the row (its `seeds` column); minutes: each row's training and evaluation, wall "
            "clock, mean over seeds.")


def markdown(record: dict) -> str:
    """The linear-probe table (a row per source: mean ± sd per tap, seeds, minutes, samples seen, the
    students' own scores under --distill) and the k-NN table below it, from a sources results.json."""
    s, labels, cells = record["config"], record["labels"], record["cells"]
    linear, knn, student = cells["linear"], cells["knn_k20"], cells["student"]
    rows = [r for r in s["rows"] if r in labels]
    done = [r for r in rows if r in linear]
    taps = list(linear[done[0]]) if done else []
    header = ["source", *taps, "seeds", "minutes", "samples seen"]
    if s["teacher"]:
        header += ["student top-1", "agreement"]
    body = []
    for row in rows:
        if row not in linear:
            why = "stopped" if any(k.startswith(f"{row}@") for k in record["stopped"]) else "not run"
            body.append([labels[row], *([why] * len(taps)), "", "", ""] + (["", ""] if s["teacher"] else []))
            continue
        line = [labels[row], *(format_cell(linear[row][t]) for t in taps), min(c["n"] for c in linear[row].values()),
                record["minutes"].get(row, ""), seen_text(record["seen"].get(row))]
        if s["teacher"]:
            line += [format_cell(student[row][k]) if row in student and k in student[row] else ""
                     for k in ("top1", "agreement")]
        body.append(line)
    knn_body = [[labels[r], *(format_cell(knn[r][t]) if t in knn.get(r, {}) else "" for t in taps)] for r in done]
    return (runs.markdown_table(header, body).rstrip("\n") + "\n\nk-NN (k = 20) top-1 (%), the same trunks:\n\n"
            + runs.markdown_table(["source", *taps], knn_body).rstrip("\n"))


#: the rows a winner is chosen among: every source of one or a few images, synthetic or photographed (the
#: controls and the dataset's own 50,000 images are references, not contenders)
CONTENDERS = ("image", "chelsea", "coffee", "ten-images", "fractal-one", "fractals", "dead-leaves", "spectral",
              "noise")


def winners(record: dict, metric: str = "linear") -> dict[str, dict]:
    """Per tap (per score for "student": top1, agreement), the best contender by its mean and its lead over
    the runner-up: in points, and in sd units (the lead over the pooled sample sd of the two rows,
    sqrt((sd1^2 + sd2^2) / 2); None when either has one seed). Also the one image against the best
    synthetic source."""
    linear, labels = record["cells"][metric], record["labels"]
    rows = [r for r in CONTENDERS if r in linear]
    taps = list(linear[rows[0]]) if rows else []

    def lead(a: str, b: str, tap: str) -> dict:
        ca, cb = linear[a][tap], linear[b][tap]
        points = round(ca["mean"] - cb["mean"], 2)
        sds = (ca["sd"], cb["sd"])
        pooled = math.sqrt((sds[0] ** 2 + sds[1] ** 2) / 2) if None not in sds else None
        return {"points": points, "sd_units": round(points / pooled, 1) if pooled else None}

    out = {}
    for tap in taps:
        ranked = sorted(rows, key=lambda r: linear[r][tap]["mean"], reverse=True)
        entry: dict = {"best": labels[ranked[0]]}
        if len(ranked) > 1:
            entry.update(runner_up=labels[ranked[1]], **lead(ranked[0], ranked[1], tap))
        synthetic = [r for r in ranked if r in SYNTHETIC]
        if "image" in linear and synthetic:
            entry["image_vs_best_synthetic"] = {"synthetic": labels[synthetic[0]], **lead("image", synthetic[0], tap)}
        out[tap] = entry
    return out


def winners_markdown(record: dict, metric: str = "linear") -> str:
    """Which source wins at each tap (linear probes) or student score ("student"), by how much, and the
    one image against the best synthetic source."""
    def units(lead: dict) -> str:
        return "one seed: no sd" if lead["sd_units"] is None else f"{lead['sd_units']:g} sd"

    body = []
    for tap, w in winners(record, metric).items():
        vs = w.get("image_vs_best_synthetic")
        body.append([tap, w["best"], w.get("runner_up", ""),
                     f"{w['points']:+.1f} ({units(w)})" if "points" in w else "",
                     f"{vs['points']:+.1f} ({units(vs)}) vs {vs['synthetic']}" if vs else ""])
    first = "student score" if metric == "student" else "tap"
    return runs.markdown_table([first, "best source", "runner-up", "lead", "one image - best synthetic"],
                               body).rstrip("\n")


def _csv(cells: dict, minutes: dict, seeds: list[int]) -> str:
    """One line per row, metric and tap (or student score): n, mean, sd, each seed's value, minutes."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "metric", "tap", "n", "mean", "sd", *(f"seed{k}" for k in seeds), "row_minutes"])
    for metric, table in cells.items():
        for row, taps in table.items():
            for tap, c in taps.items():
                writer.writerow([row, metric, tap, c["n"], c["mean"], "" if c["sd"] is None else c["sd"],
                                 *(c["values"].get(k, "") for k in seeds), minutes.get(row, "")])
    return buf.getvalue()


def _figure(out: Path, s: dict, means: dict, errors: dict, specs: dict[str, str]) -> None:
    """table.png: bars per tap with one-sd error bars beside the first 16 samples of each trained row's
    source (what its first seed trains on first, at 32 px)."""
    from monossl.viz.figures import save_figure
    from monossl.viz.networks import data_images
    from monossl.viz.plots import sources_bars_figure

    samples = {name: data_images(spec, 16, size=32, seed=s["seeds"][0]) for name, spec in specs.items()}
    figure = sources_bars_figure(means, errors, samples,
                                 title=f"{s['data']}, budget {s['budget']}, seeds {', '.join(map(str, s['seeds']))}")
    save_figure(figure, out / "table.png")
