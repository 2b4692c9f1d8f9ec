"""The report (`monossl report`): one page with the results tables and the figures.

Writes DIR/report.md (figures as PNG files beside it) and DIR/report.html (self-contained:
the same figures embedded as base64 data URIs, no external file or network needed).

Inputs, any mix of:

* a **results file** (`results.json`) or a directory holding one:
  - a table (`monossl compare`, `monossl reproduce ...`): `{"table": {row: {tap: top1}}}`; a cell
    may also be `{"ours": x, "paper": y, ...}` (then its paper number is used as given);
  - a probe's results (`monossl probe`): `{"taps": {tap: {"top1": ...}}, "trunk": {...}}`; all
    probe results given form one table, a row each;
* a **run directory** (holding trunk.pt and config.json) or a trunk.pt file: its conv1 filters
  are drawn, its training patches make the contact sheet (the first run with patches), and the
  probe results inside it (`probe-*/results.json`) are read as above.

A `monossl compare` directory counts as both: its results.json, and its row runs (the random
row is rebuilt from the compare's seed, as compare built it).

The numbers printed are those in the files, unrounded (Python's shortest round-trip form).
The paper's numbers (PAPER.md section 5, BiGAN on CIFAR-10) are put beside ours where the paper
has the cell: the random row (`Random features`), the supervised row (`Fully supervised`), and
BiGAN rows by their augmentation preset (`none` -> `No aug.`, ..., `all` -> `All`).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monossl.errors import UserError
from monossl.paper import CIFAR10_BIGAN, PRESET_TO_PAPER
from monossl.runs import curve_records, ensure_writable_dir, markdown_table, read_json, read_jsonl, write_text
from monossl.viz.filters import write_filters
from monossl.viz.networks import load_network, run_label
from monossl.viz.plots import ROW_LABELS, write_contact_sheet, write_layer_bars, write_learning_curves


def fmt(value: float | None) -> str:
    """A number as stored (shortest round-trip form: 57.83 -> '57.83'); None -> ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def paper_row_for(row: str, meta: dict | None = None, dataset: str | None = None) -> str | None:
    """The paper's CIFAR-10 row matching our row (name and/or trunk meta), or None."""
    meta = meta or {}
    if dataset and str(dataset).split(":")[0] != "cifar10":  # not cifar100
        return None
    if row in CIFAR10_BIGAN:
        return row
    method = meta.get("method") or row
    if method == "random" or row == "random":
        return "Random features"
    if method == "supervised" or row == "supervised":
        return "Fully supervised"
    if method == "bigan" and meta.get("image"):
        return PRESET_TO_PAPER.get(meta.get("preset", "all"))
    if row in PRESET_TO_PAPER and method in (row, "bigan"):  # rows named by preset (reproduce cifar10-augmentations)
        return PRESET_TO_PAPER[row]
    return None


@dataclass
class Table:
    title: str
    source: str
    ours: dict = field(default_factory=dict)  # row -> {tap: value}
    paper: dict = field(default_factory=dict)  # row -> {tap: value} (only cells the paper has)
    paper_rows: dict = field(default_factory=dict)  # row -> the paper's row name
    labels: dict = field(default_factory=dict)  # row -> label shown
    note: str = ""

    @property
    def taps(self) -> list[str]:
        out: list[str] = []
        for cells in self.ours.values():
            out += [t for t in cells if t not in out]
        return out

    def header_and_rows(self) -> tuple[list[str], list[list[str]]]:
        taps = self.taps
        with_paper = {t for cells in self.paper.values() for t in cells}
        header = ["row"]
        for t in taps:
            header += [t] + ([f"{t} (paper)"] if t in with_paper else [])
        rows = []
        for r, cells in self.ours.items():
            label = self.labels.get(r, r)
            if r in self.paper_rows:
                label += f" [paper: {self.paper_rows[r]}]"
            line = [label]
            for t in taps:
                line.append(fmt(cells.get(t)))
                if t in with_paper:
                    line.append(fmt(self.paper.get(r, {}).get(t)))
            rows.append(line)
        return header, rows


def _cell(value: float | dict | None):
    """(ours, paper) of a table cell: a number, or a dict with ours/paper (or top1)."""
    if isinstance(value, dict):
        ours = value.get("ours", value.get("top1"))
        return ours, value.get("paper")
    return value, None


def table_from_results(data: dict, source: str) -> Table:
    """A Table from a results.json with a `table` mapping (compare, reproduce)."""
    if not isinstance(data.get("table"), dict) or not data["table"]:
        raise UserError(f"{source}: no `table` of results in it")
    config = data.get("config", {}) if isinstance(data.get("config"), dict) else {}
    dataset = config.get("data")
    rows_info = data.get("rows", {}) if isinstance(data.get("rows"), dict) else {}
    t = Table(title=data.get("title") or f"results of {source}", source=source)
    for row, cells in data["table"].items():
        if not isinstance(cells, dict):
            raise UserError(f"{source}: row {row!r} of `table` is not a mapping tap -> value")
        meta = ((rows_info.get(row) or {}).get("trunk", {}).get("meta", {})
                if isinstance(rows_info.get(row), dict) else {})
        t.ours[row] = {}
        given_paper = {}
        for tap, value in cells.items():
            ours, paper = _cell(value)
            t.ours[row][tap] = ours
            if paper is not None:
                given_paper[tap] = paper
        if given_paper:
            t.paper[row] = given_paper
        else:
            prow = paper_row_for(row, meta, dataset)
            if prow:
                cells_p = {tap: CIFAR10_BIGAN[prow][tap] for tap in t.ours[row] if tap in CIFAR10_BIGAN[prow]}
                if cells_p:
                    t.paper[row], t.paper_rows[row] = cells_p, prow
        t.labels[row] = ROW_LABELS.get(row, row)
    bits = []
    if dataset:
        bits.append(f"data {dataset}")
    proto = config.get("protocol")
    if isinstance(proto, dict) and proto.get("name"):
        bits.append(f"protocol `{proto['name']}` ({proto.get('epochs', '?')} epochs)")
    if config.get("seed") is not None:
        bits.append(f"seed {config['seed']}")
    t.note = "Linear-probe top-1 (%), final epoch" + ("; " + ", ".join(bits) if bits else "") + "."
    return t


def probe_row(data: dict, source: str) -> tuple[str, dict, str | None]:
    """(label, {tap: top1}, paper row) of one probe results.json."""
    taps = data.get("taps")
    if not isinstance(taps, dict) or not taps:
        raise UserError(f"{source}: no `taps` in it (not a probe's results.json)")
    try:
        cells = {tap: v["top1"] for tap, v in taps.items()}
    except (TypeError, KeyError):
        raise UserError(f"{source}: a tap has no top1") from None
    meta = (data.get("trunk") or {}).get("meta", {}) or {}
    label = run_label(meta) if meta else Path(source).parent.name
    return label, cells, paper_row_for(meta.get("method", ""), meta, data.get("dataset"))


# ---------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    tables: list = field(default_factory=list)  # Table
    probes: list = field(default_factory=list)  # (source, data)
    runs: list = field(default_factory=list)  # spec for viz.networks.load_network (path or random:SEED)
    patch_runs: list = field(default_factory=list)  # run directories with config.json


def _is_run(path: Path) -> bool:
    return (path / "trunk.pt").is_file()


def gather(specs: Sequence[str | Path]) -> Inputs:
    """Sort the command's arguments into tables, probe results and runs (see module docstring)."""
    got = Inputs()
    seen_probe = set()

    def add_results(path: Path, data: dict | None = None):
        data = read_json(path, "results file") if data is None else data
        if "table" in data:
            got.tables.append(table_from_results(data, str(path)))
        elif "taps" in data:
            if path.resolve() not in seen_probe:
                seen_probe.add(path.resolve())
                got.probes.append((str(path), data))
        else:
            raise UserError(f"{path}: neither a results table (`table`) nor probe results (`taps`)")
        return data

    def add_run(path: Path, probes: bool = True):
        if str(path) not in got.runs:
            got.runs.append(str(path))
        cfg = path / "config.json"
        if cfg.is_file() and path not in got.patch_runs:
            try:
                if "patch_config" in json.loads(cfg.read_text()):
                    got.patch_runs.append(path)
            except json.JSONDecodeError:
                pass
        if probes:
            for probe in sorted(path.glob("probe-*/results.json")):
                add_results(probe)

    for spec in specs:
        path = Path(spec)
        if not path.exists():
            raise UserError(f"no such run or results file: {spec}")
        if path.is_file():
            if path.suffix == ".json":
                add_results(path)
            elif path.suffix == ".pt":
                got.runs.append(str(path))
            else:
                raise UserError(f"{spec}: give a results.json, a run directory or a trunk.pt")
            continue
        found = False
        if (path / "results.json").is_file():
            data = add_results(path / "results.json")
            found = True
            if "table" in data:  # a compare directory: its rows are runs too
                seed = (data.get("config") or {}).get("seed", 0)
                for row in data["table"]:
                    sub = path / row
                    if row == "random" and not _is_run(sub):
                        got.runs.append(f"random:{seed}")
                    elif _is_run(sub):
                        add_run(sub, probes=False)  # their probe results are the table's rows
        if _is_run(path):
            add_run(path)
            found = True
        if not found:
            raise UserError(f"{spec}: no results.json or trunk.pt in it (not a run or results directory)")
    if got.probes:
        t = Table(title="linear probes", source=", ".join(s for s, _ in got.probes))
        datasets = set()
        for source, data in got.probes:
            label, cells, prow = probe_row(data, source)
            key, k = label, 2
            while key in t.ours:
                key, k = f"{label} ({k})", k + 1
            t.ours[key] = cells
            if prow:
                p = {tap: CIFAR10_BIGAN[prow][tap] for tap in cells if tap in CIFAR10_BIGAN[prow]}
                if p:
                    t.paper[key], t.paper_rows[key] = p, prow
            datasets.add(str(data.get("dataset")))
        protocols = {(data.get("protocol") or {}).get("name") for _, data in got.probes}
        t.note = (f"Linear-probe top-1 (%), final epoch; data {', '.join(sorted(datasets))}; "
                  f"protocol {', '.join(sorted(str(p) for p in protocols))}.")
        got.tables.append(t)
    return got


# ---------------------------------------------------------------------------- output


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def paper_reference_table() -> tuple[list[str], list[list[str]]]:
    taps = ["conv1", "conv2", "conv3", "conv4"]
    return ["training data"] + taps, [[r] + [fmt(v[t]) for t in taps] for r, v in CIFAR10_BIGAN.items()]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_report(specs: Sequence[str | Path], out: str | Path, title: str = "monossl report", patches: int = 64,
                 scale: int = 4) -> dict:
    """Write out/report.md, out/report.html and the PNGs; returns {"tables": [...], "figures": [...]}."""
    if not specs:
        raise UserError("give at least one run directory or results file")
    got = gather(specs)
    out = ensure_writable_dir(out)
    sections: list[tuple[str, str, list]] = []  # (kind, title, payload)
    figures = []

    if not got.tables:
        sections.append(("text", "Results", ["No results file was given (only runs): no table."]))
    for i, t in enumerate(got.tables, 1):
        header, rows = t.header_and_rows()
        sections.append(("table", f"Results: {t.title}", [t.note + f" Source: `{t.source}`.", header, rows]))
        name = f"bars-{i}.png"
        write_layer_bars(t.ours, out / name, t.paper, title=t.title, row_labels=t.labels)
        figures.append(name)
        sections.append(("figure", f"Per layer: {t.title}",
                         [name, "Bars: ours, one per row (hatched, grey levels); black diamonds: the paper's "
                                "number for that row where it has one."]))
    ph, pr = paper_reference_table()
    sections.append(("table", "The paper's CIFAR-10 table (PAPER.md section 5)",
                     ["BiGAN trained on one image with different augmentations; linear probes, top-1 (%). "
                      "The paper's probes and budgets differ from ours; compare trends, not digits.", ph, pr]))
    if got.runs:
        networks = [load_network(s) for s in got.runs]
        write_filters(networks, out / "filters.png", scale=scale)
        figures.append("filters.png")
        sections.append(("figure", "conv1 filters",
                         ["filters.png", "Each filter with its BatchNorm scale folded in, min-max normalised on its "
                                         "own, enlarged; Sobel trunks as effective RGB filters. Runs: "
                          + "; ".join(f"{n.label} (`{s}`)" for n, s in zip(networks, got.runs)) + "."]))
    for i, run_dir in enumerate(got.runs, 1):
        records = curve_records(read_jsonl(Path(run_dir) / "metrics.jsonl")) if Path(run_dir).is_dir() else []
        if records:
            name = f"curves-{i}.png"
            write_learning_curves(records, out / name, title=str(run_dir))
            figures.append(name)
            sections.append(("figure", f"Learning curves: {run_dir}",
                             [name, "Validation top-1 of every tap during pretraining (`--probe-every`): quick "
                                    "probes on a split of the probe dataset's training images; step 0 is the "
                                    "untrained trunk."]))
    if got.patch_runs and patches > 0:
        run_dir = got.patch_runs[0]
        write_contact_sheet(run_dir, out / "patches.png", n=patches)
        figures.append("patches.png")
        sections.append(("figure", "Training patches",
                         ["patches.png", f"The first {patches} training patches of `{run_dir}` (rebuilt from its "
                                         "config.json: same images, patch configuration and seed)."]))

    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for kind, head, payload in sections:
        md += [f"## {head}", ""]
        body.append(f"<h2>{html.escape(head)}</h2>")
        if kind == "table":
            note, header, rows = payload
            md += [note, "", markdown_table(header, rows)]
            body += [f"<p>{_inline(note)}</p>", html_table(header, rows)]
        elif kind == "figure":
            name, caption = payload
            md += [f"![{head}]({name})", "", caption, ""]
            body += [f'<figure><img alt="{html.escape(head)}" src="{_data_uri(out / name)}">'
                     f"<figcaption>{_inline(caption)}</figcaption></figure>"]
        else:
            md += payload + [""]
            body += [f"<p>{_inline(p)}</p>" for p in payload]
    css = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#111}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;padding:.2em .5em;"
           "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
           "figcaption{font-size:.9em;color:#333}code{background:#eee;padding:0 .2em}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    write_text(out / "report.md", "\n".join(md).rstrip() + "\n")
    write_text(out / "report.html", page)
    return {"tables": got.tables, "figures": figures, "runs": got.runs, "out": str(out)}


def _inline(text: str) -> str:
    """Escape text for HTML and render `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
