"""Figures of the report: the per-layer bar chart and the contact sheet of training patches.

Made with matplotlib's object API (no pyplot, no GUI backend; Agg when saved) and readable in
black and white: every row of the bar chart has its own hatch and grey level, and the paper's
numbers are black markers, so no information is carried by colour alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from monossl.errors import UserError
from monossl.runs import read_json
from monossl.viz.figures import image_name, new_figure, save_figure

# grey levels and hatches of the rows, in order (white first: prints cleanly)
FACES = ("white", "0.80", "0.55", "0.30", "0.92", "0.68", "0.42", "0.15")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")

# friendlier names of the rows `monossl compare` writes
ROW_LABELS = {
    "random": "random",
    "rotnet": "one image (RotNet)",
    "rotnet-full": "full data (RotNet)",
    "image": "one image",
    "full": "full data",
    "supervised": "supervised",
}


def _taps_of(table: dict) -> list[str]:
    taps: list[str] = []
    for cells in table.values():
        for t in cells:
            if t not in taps:
                taps.append(t)
    return taps


def layer_bars_figure(table: dict, paper: dict | None = None, title: str | None = None,
                      row_labels: dict | None = None, ylabel: str = "linear-probe top-1 (%)",
                      errors: dict | None = None):
    """Grouped bars: one group per tap (conv1, conv2, ...), one bar per row of `table`
    ({row: {tap: value}}, drawn in its order). paper: {row: {tap: value}} for the rows whose
    paper number is known, drawn as a black diamond on that bar (legend: "paper"). errors:
    {row: {tap: half-length}} drawn as error bars (e.g. the sd over seeds)."""
    if not table:
        raise UserError("no results to plot")
    rows = list(table)
    taps = _taps_of(table)
    labels = {**ROW_LABELS, **(row_labels or {})}
    paper = paper or {}
    n = len(rows)
    width = 0.8 / n
    fig = new_figure((max(5.0, 1.3 * len(taps) + 0.35 * n * len(taps)), 3.6))
    ax = fig.subplots()
    x = np.arange(len(taps))
    values = []
    for i, row in enumerate(rows):
        ys = [table[row].get(t) for t in taps]
        ys_plot = [np.nan if y is None else float(y) for y in ys]
        values += [y for y in ys_plot if not np.isnan(y)]
        pos = x - 0.4 + width * (i + 0.5)
        yerr = None
        if errors and row in errors:
            yerr = [errors[row].get(t) or 0.0 for t in taps]
            values += [y + e for y, e in zip(ys_plot, yerr) if not np.isnan(y)]
        ax.bar(pos, ys_plot, width, label=labels.get(row, row), facecolor=FACES[i % len(FACES)],
               edgecolor="black", hatch=HATCHES[i % len(HATCHES)], linewidth=0.8, yerr=yerr,
               error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "black"})
        pp = [paper.get(row, {}).get(t) for t in taps]
        if any(p is not None for p in pp):
            px = [p_ for p_, v in zip(pos, pp) if v is not None]
            py = [float(v) for v in pp if v is not None]
            values += py
            ax.plot(px, py, linestyle="none", marker="D", markersize=6, markerfacecolor="black",
                    markeredgecolor="white",
                    label="paper" if "paper" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(x, taps)
    ax.set_ylabel(ylabel)
    if values:  # bars start at 0 (honest lengths)
        ax.set_ylim(0, max(values) * 1.08 + 1)
    ax.grid(axis="y", color="0.85", linewidth=0.6)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    order = [i for i, k in enumerate(names) if k != "paper"] + [i for i, k in enumerate(names) if k == "paper"]
    ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=8, ncol=min(3, n + 1),
              loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def write_layer_bars(table: dict, out: str | Path, paper: dict | None = None, title: str | None = None,
                     row_labels: dict | None = None, errors: dict | None = None) -> Path:
    return save_figure(layer_bars_figure(table, paper, title, row_labels, errors=errors), out)


def methods_figure(values: dict, methods: Sequence[str], title: str | None = None,
                   ylabel: str = "linear-probe top-1 (%)",
                   data_label: str = "dataset"):
    """One panel per tap; in each, every method's one-image row (filled circle) beside the same method
    on the dataset (`<method>-data`, open square), with the random trunk (dashed) and supervision
    (dotted) as lines. values: {row: {tap: top-1}}. Markers, not bars, so the axis can zoom in."""
    if not values:
        raise UserError("no results to plot")
    taps = _taps_of(values)
    methods = [m for m in methods if m in values or f"{m}-data" in values]
    fig = new_figure((2.6 * len(taps) + 0.6, 3.4))
    axes = fig.subplots(1, len(taps), sharey=True, squeeze=False)[0]
    x = np.arange(len(methods))
    for ax, tap in zip(axes, taps):
        for row, style, label in (("random", "--", "random trunk"), ("supervised", ":", "supervised")):
            if tap in values.get(row, {}):
                ax.axhline(values[row][tap], color="black", linestyle=style, linewidth=1, label=label)
        for suffix, marker, face, label in (("", "o", "black", "one image"), ("-data", "s", "white", data_label)):
            ys = [values.get(f"{m}{suffix}", {}).get(tap, np.nan) for m in methods]
            ax.plot(x + (0.12 if suffix else -0.12), ys, linestyle="none", marker=marker, markersize=6,
                    markerfacecolor=face, markeredgecolor="black", label=label)
        ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(tap, fontsize=10)
        ax.grid(axis="y", color="0.85", linewidth=0.6)
        ax.set_axisbelow(True)
    axes[0].set_ylabel(ylabel)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, ncol=4, loc="lower center", frameon=False)
    fig.subplots_adjust(bottom=0.33, top=0.84, wspace=0.08)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------- patches


def ranked_bars_figure(values: dict[str, tuple[float, float | None]], xlabel: str, title: str | None = None,
                       reference: tuple[str, float] | None = None):
    """One horizontal bar per row, in the given order (top to bottom), with its value written at its
    end and, where given, a sample-std error bar; `reference` (label, value) is a dashed line."""
    names = list(values)
    fig = new_figure((6.0, 0.32 * len(names) + 1.2))
    ax = fig.subplots()
    ys = np.arange(len(names))[::-1]
    means = [values[n][0] for n in names]
    errors = [values[n][1] or 0.0 for n in names]
    ax.barh(ys, means, xerr=errors, color="0.7", edgecolor="black", linewidth=0.6, capsize=3)
    for y, m in zip(ys, means):
        ax.text(m + 1, y, f"{m:.1f}", va="center", fontsize=8)
    if reference is not None:
        ax.axvline(reference[1], color="black", linestyle="--", linewidth=0.8)
        ax.text(reference[1], len(names) - 0.4, f" {reference[0]}", fontsize=8, va="bottom")
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 100)
    ax.grid(axis="x", color="0.85", linewidth=0.6)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.json (not a run directory)")
    return read_json(path, "run configuration")


def patches_from_config(config: dict, n: int = 64) -> torch.Tensor:
    """The first n training patches of a run (its config.json): the same patches it trained on
    (the stream is a pure function of images, patch config and seed)."""
    from monossl.data.patch_config import PatchConfig
    from monossl.data.procedural_stream import open_stream

    images = config.get("image")
    if not images or "patch_config" not in config:
        raise UserError("this run was not trained on the patches of an image (no image/patch_config in config.json)")
    images = [images] if isinstance(images, str) else list(images)
    stream = open_stream(images, PatchConfig.from_dict(config["patch_config"]), seed=int(config.get("seed", 0)))
    return stream.batch(range(n))


def contact_sheet_figure(patches: torch.Tensor, title: str | None = None, ncols: int | None = None):
    """The patches (N, 3, H, W) in [0, 1] tiled in rows of `ncols` (default ceil(sqrt(N))), 1-px white gaps."""
    ncols = int(ncols or math.ceil(math.sqrt(patches.shape[0])))
    grid = make_grid(patches.detach().float().cpu().clamp(0, 1), nrow=ncols, padding=1, pad_value=1.0)
    grid = grid.permute(1, 2, 0).numpy()
    h, w = grid.shape[:2]
    fig = new_figure((4.5, 4.5 * h / w + 0.4))
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return fig


def run_patch_title(config: dict, n: int) -> str:
    cfg = config.get("patch_config", {})
    # patches_from_config has refused a config without "image"
    return (f"first {n} training patches: {image_name(config['image'])}, preset {config.get('preset', '?')}, "
            f"{cfg.get('size', '?')} px, seed {config.get('seed', 0)}")


def write_contact_sheet(run_dir: str | Path, out: str | Path, n: int = 64, ncols: int | None = None) -> Path:
    """Contact sheet of a run's first n training patches (from its config.json)."""
    config = read_run_config(run_dir)
    patches = patches_from_config(config, n)
    return save_figure(contact_sheet_figure(patches, run_patch_title(config, n), ncols), out, dpi=120)


# ---------------------------------------------------------------------------- learning curves

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def learning_curves_figure(records: list[dict], title: str | None = None, ylabel: str = "validation top-1 (%)"):
    """Validation top-1 of every tap against training steps, from the {"event": "probe"} lines of
    metrics.jsonl (step 0 = the untrained trunk): records {"step", "top1": {line: value}}. One line
    per tap (or per key of "top1"), each with its own marker."""
    if not records:
        raise UserError("no probe evaluations to plot (train with --probe-every N)")
    taps = _taps_of({i: r["top1"] for i, r in enumerate(records)})
    fig = new_figure((5.6, 3.6))
    ax = fig.subplots()
    steps = [r["step"] for r in records]
    for i, tap in enumerate(taps):
        ax.plot(steps, [r["top1"].get(tap, np.nan) for r in records], marker=MARKERS[i % len(MARKERS)],
                color=str(0.6 * i / max(1, len(taps) - 1)), markersize=4, linewidth=1.2, label=tap)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(color="0.85", linewidth=0.6)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def write_learning_curves(records: list[dict], out: str | Path, title: str | None = None,
                          ylabel: str = "validation top-1 (%)") -> Path:
    return save_figure(learning_curves_figure(records, title, ylabel), out)


def sources_figure(specs: list[str], size: int = 32, count: int = 16, seed: int = 0, columns: int = 8):
    """A contact sheet per source: the first `count` samples (or patches) each of `specs` would give
    a run at `size` px with `--seed seed` (preset all for images), one panel per source, titled."""
    from monossl.data.patch_config import make_config
    from monossl.data.procedural_stream import open_stream

    fig = new_figure((columns * 0.62, len(specs) * (count / columns) * 0.62 + 0.35 * len(specs)))
    axes = fig.subplots(len(specs), 1, squeeze=False)[:, 0]
    for ax, spec in zip(axes, specs):
        samples = open_stream([spec], make_config("all", size=size), seed=seed).batch(range(count)).cpu()
        grid = make_grid(samples.clamp(0, 1), nrow=columns, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(spec, fontsize=8)
    return fig


def sources_bars_figure(means: dict[str, dict[str, float]], errors: dict[str, dict[str, float | None]],
                        samples: dict[str, torch.Tensor], title: str | None = None,
                        ylabel: str = "linear-probe top-1 (%)", columns: int = 8):
    """Grouped bars per tap (one bar per row of `means`, {row: {tap: value}}, in its order; `errors`
    the same shape, e.g. the sd over seeds, None for none) beside a contact sheet of each source's
    samples (`samples`: {title: (N, 3, H, W) in [0, 1]}, one panel each, top to bottom)."""
    if not means:
        raise UserError("no results to plot")
    rows, taps = list(means), _taps_of(means)
    n_panels = max(1, len(samples))
    bars_width, sheet_width = max(6.0, 1.0 * len(taps) + 0.2 * len(rows) * len(taps)), 2.6
    fig = new_figure((bars_width + sheet_width, max(4.5, 0.85 * n_panels)))
    grid = fig.add_gridspec(n_panels, 2, width_ratios=(bars_width, sheet_width), wspace=0.06, hspace=0.45)
    ax = fig.add_subplot(grid[:, 0])
    width, x, tops, lows = 0.84 / len(rows), np.arange(len(taps)), [1.0], []
    for i, row in enumerate(rows):
        ys = [float(means[row].get(t, np.nan)) for t in taps]
        err = [float(errors.get(row, {}).get(t) or 0.0) for t in taps]
        tops += [y + e for y, e in zip(ys, err) if not np.isnan(y)]
        lows += [y - e for y, e in zip(ys, err) if not np.isnan(y)]
        ax.bar(x - 0.42 + width * (i + 0.5), ys, width, yerr=err, label=row, facecolor=FACES[i % len(FACES)],
               edgecolor="black", hatch=HATCHES[(i + i // len(FACES)) % len(HATCHES)], linewidth=0.7,
               error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "black"})
    ax.set_xticks(x, taps)
    # the rows differ by a few points around 60%: from 0 they would all look alike, so the axis starts
    # at a multiple of 5 below the lowest bar (and its label says so)
    bottom = max(0.0, 5.0 * math.floor((min(lows, default=0.0) - 3.0) / 5.0))
    ax.set_ylabel(ylabel if bottom == 0 else f"{ylabel}, axis from {bottom:g}")
    ax.set_ylim(bottom, max(tops) + 0.08 * (max(tops) - bottom) + 1)
    ax.grid(axis="y", color="0.85", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=7, ncol=min(4, len(rows)), loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    for k, (name, images) in enumerate(samples.items()):
        panel = fig.add_subplot(grid[k, 1])
        sheet = make_grid(images.clamp(0, 1), nrow=columns, padding=1, pad_value=1.0)
        panel.imshow(sheet.permute(1, 2, 0).numpy(), interpolation="nearest")
        panel.set_axis_off()
        panel.set_title(name, fontsize=7)
    return fig
