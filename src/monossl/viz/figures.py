"""What every figure of monossl.viz shares: a pyplot-free matplotlib Figure, its atomic save, and
the short name of an image spec used in titles and labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from monossl.errors import UserError
from monossl.runs import atomic_path

FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_format(out: str | Path) -> str:
    """The format of a figure file from its suffix (png, pdf or svg); anything else is refused."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise UserError(f"--out {out}: write a .png, .pdf or .svg file")
    return suffix


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure without pyplot (no global state, no GUI backend: Agg when saved)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig: Figure, out: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (format from the file name)."""
    out = Path(out)
    fmt = figure_format(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white")
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def image_name(spec: str | Path | Sequence[str | Path]) -> str:
    """A short name of an image spec (or a list of them): builtin:astronaut -> astronaut, a path -> its stem."""
    if isinstance(spec, (list, tuple)):
        names = [image_name(s) for s in spec]
        return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"
    spec = str(spec)
    if spec.startswith("builtin:"):
        return spec.split(":", 1)[1]
    return Path(spec).stem or spec
