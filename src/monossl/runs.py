"""Run directories and result files.

A run directory holds everything one run made:

    config.json      the resolved configuration (every default filled in)
    metrics.jsonl    one JSON object per logged step/epoch, appended
    last.pt          the latest checkpoint (written atomically)
    trunk.pt         the final trunk in the plain checkpoint format (models/__init__.py)
    results.json / results.md   what an evaluation produced

Every write goes to a temporary name in the same folder and is renamed into place,
so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import tempfile
from pathlib import Path

from monossl.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_torch(path, obj) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def append_jsonl(path, record: dict) -> None:
    """Append one line; a line is written with one call so a crash can cut at most that line."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def write_jsonl(path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    """Read metrics.jsonl, ignoring a last line cut short by a crash."""
    records = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curve_records(records: list[dict]) -> list[dict]:
    """The learning-curve lines (`--probe-every`) of a metrics.jsonl as read by read_jsonl, in step order."""
    return sorted((r for r in records if r.get("event") == "probe"), key=lambda r: r["step"])


def ensure_writable_dir(path) -> Path:
    """Create `path` (and parents) or fail with a one-line error naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".monossl-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output directory {path}: {exc.strerror or exc}") from None
    return path


def environment() -> dict:
    """Versions and hardware, recorded beside every result."""
    import numpy
    import torch

    info = {
        "monossl": __import__("monossl").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return info


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; floats printed with one decimal."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
