"""What `monossl compare` writes: one seed's table, the table over seeds, and the split of each gain
into the data's statistics and what the task learned.

    statistics = <source>-stats - random     (whitened conv1 and BatchNorm statistics of the source)
    learning   = <trained row> - <source>-stats

for the one image (image-stats, image) and the dataset (data-stats, full), per tap. Over several
seeds each difference is taken within a seed first (the rows of one seed share their initial
weights), then its mean ± sample sd over seeds is reported, with every seed's value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from monossl import runs
from monossl.experiments.seeds import aggregate, cells_csv, format_cell, markdown_cells
from monossl.experiments.table import seen_text

#: each control row -> the trained row whose step 0 it is (its source, whitening and seed)
STATISTICS_OF = {"image-stats": "image", "data-stats": "full"}
#: (name, control row, trained row) of each split
SPLITS = tuple(({"image": "one image", "full": "full data"}[trained], control, trained)
               for control, trained in STATISTICS_OF.items())


def row_labels(method: str) -> dict[str, str]:
    """Each row's name in tables and figures."""
    return {"random": "random", "image-stats": "image statistics", "image": f"one image ({method})",
            "data-stats": "dataset statistics", "full": f"full data ({method})", "supervised": "supervised",
            "full-long": f"full data ({method}), converged", "supervised-long": "supervised, converged"}


def split_gains(table: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """{name: {"statistics": {tap: points}, "learning": {tap: points}}} for the splits whose three rows
    (random, control, trained) are in `table` ({row: {tap: top-1}})."""
    out = {}
    for name, control, trained in SPLITS:
        if all(r in table for r in ("random", control, trained)):
            taps = list(table["random"])
            out[name] = {
                "statistics": {t: round(table[control][t] - table["random"][t], 2) for t in taps},
                "learning": {t: round(table[trained][t] - table[control][t], 2) for t in taps},
            }
    return out


def _splits_markdown(splits: dict, taps: list[str], fmt: Callable[[float], str]) -> str:
    """One seed's split as a Markdown table under its caption ("" without splits)."""
    if not splits:
        return ""
    lines = ["", "Gain over the random trunk split into the data's statistics (control - random) and what the "
             "task learned (trained - control), points per tap:", ""]
    body = [[f"{name}: {part}"] + [fmt(parts[part][t]) for t in taps]
            for name, parts in splits.items() for part in ("statistics", "learning")]
    return "\n".join(lines) + "\n" + runs.markdown_table(["split"] + taps, body)


def write_table(out: Path, rows: list[str], results: dict, config: dict) -> str:
    """One seed's table.md, table.csv and results.json."""
    import csv
    import io

    taps = list(next(iter(results.values()))["taps"])
    table = {r: {t: float(results[r]["taps"][t]["top1"]) for t in taps} for r in rows}
    splits = split_gains(table)
    summary = {"config": config, "table": table, "rows": {r: {"seen": results[r].get("seen")} for r in rows}}
    md = (f"Linear-probe top-1 (%) on each conv tap, final epoch, protocol `{config['protocol']['name']}`, "
          f"data {config['data']}, seed {config['seed']}; {config['method']} for "
          f"{config.get('method_steps') or config['steps'] or 'its default'} steps, "
          f"supervised for {config['supervised_steps']} steps; conv1 "
          f"{'whitened' if config['whiten_conv1'] else 'plain'}.\n\n"
          + table_markdown(summary) + _splits_markdown(splits, taps, lambda v: f"{v:+.1f}"))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "tap", "top1", "top5", "best_top1", "best_epoch", "pooled_size", "samples", "epochs"])
    for r in rows:
        seen = results[r].get("seen") or {}
        for t in taps:
            v = results[r]["taps"][t]
            writer.writerow([r, t, v["top1"], v["top5"], v["best_top1"], v["best_epoch"], v["pooled_size"],
                             seen.get("samples", ""), seen.get("epochs", "")])
    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", buf.getvalue())
    runs.write_json(out / "results.json", {
        "kind": "compare",
        "config": config,
        "table": table,
        "splits": splits,
        "rows": {r: {k: results[r].get(k) for k in ("taps", "trunk", "n_train", "n_test", "timings", "seen",
                                                     "row_seconds", "curves") if k in results[r]} for r in rows},
        "environment": runs.environment(),
    })
    return md


def table_markdown(summary: dict) -> str:
    """One seed's table from its results.json: rows x taps of top-1 and the samples each row saw."""
    labels = row_labels(summary["config"]["method"])
    table = summary["table"]
    taps = list(next(iter(table.values())))
    body = [[labels[r]] + [float(table[r][t]) for t in taps] + [seen_text(summary["rows"][r].get("seen"))]
            for r in table]
    return runs.markdown_table(["training data"] + taps + ["samples seen"], body)


def curves_markdown(summary: dict) -> str:
    """The learning curves of the rows that have them (the converged references): validation top-1 per
    tap at each probed step, with the epochs over the training images that step stands for."""
    labels = row_labels(summary["config"]["method"])
    body = []
    for row, result in summary["rows"].items():
        seen = result.get("seen") or {}
        for point in result.get("curves", []):
            epochs = seen["epochs"] * point["step"] / seen["steps"] if seen.get("steps") else None
            body.append([labels[row], point["step"], "" if epochs is None else f"{epochs:.1f}",
                         *(float(v) for v in point["top1"].values())])
    if not body:
        return ""
    taps = list(next(p for r in summary["rows"].values() for p in r.get("curves", []))["top1"])
    return runs.markdown_table(["training data", "step", "epochs"] + taps, body)


def write_seed_table(out: Path, rows: list[str], results: dict[int, dict], config: dict) -> str:
    """The table over seeds (results: {seed: that seed's results.json}): table.md/csv, results.json and
    table.png with each cell's mean ± sample sd, and the statistics/learning split aggregated per seed."""
    from monossl.viz.plots import write_layer_bars

    cells = aggregate({seed: r["table"] for seed, r in results.items()})
    rows = [r for r in rows if r in cells]
    taps = list(next(iter(cells.values())))
    labels = row_labels(config["method"])
    per_seed_splits = {seed: split_gains(r["table"]) for seed, r in results.items()}
    flat = {seed: {f"{name}: {part}": values for name, parts in splits.items() for part, values in parts.items()}
            for seed, splits in per_seed_splits.items() if splits}
    seeds = sorted(results)
    # what a row saw and its curves: from the first seed that has the row (the references run for some seeds)
    first = {r: next(res["rows"][r] for res in results.values() if r in res["rows"]) for r in rows}
    summary = {
        "kind": "compare-seeds",
        "config": config, "cells": cells, "splits": aggregate(flat) if flat else {},
        "table": {r: {t: cells[r][t]["mean"] for t in taps} for r in rows},  # the means, as one seed's "table"
        "rows": {r: {"label": labels[r], **{k: v for k, v in first[r].items() if k in ("seen", "curves")}}
                 for r in rows},
        "seeds": {str(s): {"dir": f"seed-{s}", "table": results[s]["table"], "splits": per_seed_splits[s],
                           "row_seconds": {r: v.get("row_seconds") for r, v in results[s]["rows"].items()}}
                  for s in seeds},
        "environment": runs.environment(),
    }
    md = seed_table_markdown(summary)
    if summary["splits"]:
        md += ("\nGain over the random trunk split into the data's statistics (control - random) and what the "
               "task learned (trained - control), points per tap, mean ± sd of the per-seed differences:\n\n"
               + splits_markdown(summary))
    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", cells_csv(cells))
    runs.write_json(out / "results.json", summary)
    write_layer_bars({r: {t: cells[r][t]["mean"] for t in taps} for r in rows}, out / "table.png",
                     title=f"{config['data']}, mean ± sd over seeds {', '.join(map(str, seeds))}", row_labels=labels,
                     errors={r: {t: cells[r][t]["sd"] or 0.0 for t in taps} for r in rows})
    return md


def seed_table_markdown(summary: dict, caption: bool = True) -> str:
    """The table over seeds from its results.json (`write_seed_table`): rows x taps of mean ± sd, the
    number of seeds and the samples each row saw."""
    cells, config = summary["cells"], summary["config"]
    rows = list(summary["rows"])
    taps = list(next(iter(cells.values())))
    body = [[summary["rows"][r]["label"]] + cell_row
            + [str(cells[r][taps[0]]["n"]), seen_text(summary["rows"][r]["seen"])]
            for r, cell_row in zip(rows, markdown_cells(cells, rows, taps))]
    table = runs.markdown_table(["training data"] + taps + ["seeds", "samples seen"], body)
    if not caption:
        return table
    seeds = ", ".join(summary["seeds"])
    return (f"Linear-probe top-1 (%), mean ± sample sd over seeds {seeds} (final epoch, protocol "
            f"`{config['protocol']['name']}`, data {config['data']}; {config['method']} for "
            f"{config.get('method_steps') or config['steps'] or 'its default'} steps, "
            f"supervised for {config['supervised_steps']} steps; conv1 "
            f"{'whitened' if config['whiten_conv1'] else 'plain'}).\n\n" + table)


def splits_markdown(summary: dict) -> str:
    """The statistics/learning split over seeds: mean ± sd of the per-seed differences, per tap."""
    splits = summary["splits"]
    taps = list(next(iter(splits.values())))
    return runs.markdown_table(["split"] + taps, [[name] + [format_cell(splits[name][t]) for t in taps]
                                                  for name in splits])


def splits_per_seed_markdown(summary: dict) -> str:
    """Each seed's split: one line per seed, each cell conv1 / conv2 / ... in points."""
    names = [f"{name}: {part}" for name in next(iter(summary["seeds"].values()))["splits"]
             for part in ("statistics", "learning")]
    body = []
    for seed, entry in summary["seeds"].items():
        cells = []
        for full in names:
            name, part = full.split(": ")
            cells.append(" / ".join(f"{v:+.1f}" for v in entry["splits"][name][part].values()))
        body.append([seed] + cells)
    return runs.markdown_table(["seed"] + names, body)
