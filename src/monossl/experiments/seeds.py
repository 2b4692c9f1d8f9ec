"""One table over several seeds: per-cell mean and sample standard deviation.

`aggregate({seed: {row: {tap: top-1}}})` gives, per row and tap, the seeds' values, their mean and
their sample standard deviation (n - 1 in the denominator: the spread of the seeds we ran, as an
estimate of the spread of a new seed; None with one seed). A row may have run for fewer seeds than
the table (the converged references run for the first seed only by default): its cells say how
many (`n`). `markdown_cells` writes "mean ± sd" cells, `cells_csv` one line per row and tap.
"""

from __future__ import annotations

import csv
import io
import statistics


def aggregate(tables: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """{seed: {row: {tap: value}}} -> {row: {tap: {"mean", "sd", "n", "values": {seed: value}}}}, rows and
    taps in the order they first appear."""
    cells: dict[str, dict[str, dict]] = {}
    for seed, table in tables.items():
        for row, taps in table.items():
            for tap, value in taps.items():
                cells.setdefault(row, {}).setdefault(tap, {"values": {}})["values"][seed] = float(value)
    for row_cells in cells.values():
        for cell in row_cells.values():
            values = list(cell["values"].values())
            cell["n"] = len(values)
            cell["mean"] = round(statistics.fmean(values), 3)
            cell["sd"] = round(statistics.stdev(values), 3) if len(values) > 1 else None
    return cells


def format_cell(cell: dict, digits: int = 1) -> str:
    """"64.8 ± 0.4" (several seeds), "64.8" (one)."""
    if cell["sd"] is None:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"


def markdown_cells(cells: dict[str, dict[str, dict]], rows: list[str], taps: list[str]) -> list[list[str]]:
    """Table body: "mean ± sd" per tap, rows in `rows` order (rows without cells are left out)."""
    return [[format_cell(cells[r][t]) if t in cells[r] else "" for t in taps] for r in rows if r in cells]


def cells_csv(cells: dict[str, dict[str, dict]]) -> str:
    """table.csv of an aggregated table: row, tap, n, mean, sd, then each seed's value."""
    seeds = sorted({s for taps in cells.values() for c in taps.values() for s in c["values"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "tap", "n", "mean", "sd"] + [f"seed{s}" for s in seeds])
    for row, taps in cells.items():
        for tap, c in taps.items():
            writer.writerow([row, tap, c["n"], c["mean"], "" if c["sd"] is None else c["sd"]]
                            + [c["values"].get(s, "") for s in seeds])
    return buf.getvalue()
