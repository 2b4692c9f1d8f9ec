"""Run directories and result files.

A run directory holds everything one run made:

    config.json      the resolved configuration (every default filled in)
    metrics.jsonl    one JSON object per logged step/epoch, appended
    last.pt          the latest checkpoint (written atomically)
    trunk.pt         the final trunk in the plain checkpoint format (models/__init__.py)
    results.json / results.md   what an evaluation produced

Every write goes to a temporary name in the same folder and is renamed into place,
so a crash never leaves a half-written file behind; a full disk is a one-line error naming the
file, with the half-written file removed (`writing`).

Everything read back from a run directory goes through `load_torch` / `read_json`: checkpoints
are loaded with `weights_only=True` (a run directory may come from anyone: nothing read from it
may run code), and a corrupt or truncated file is a one-line error naming it.

`lock_run_dir` claims a run directory while a command runs (`RUN/.lock`, flock), so two commands
never write into one run at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import re
import tempfile
from collections.abc import Collection
from pathlib import Path

from monossl.errors import UserError, first_line

_UMASK = os.umask(0)
os.umask(_UMASK)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> int | None:
    """The errno if `exc` (or an exception it was raised from) is a full disk or quota, else None.
    torch.save reports a failed write as a RuntimeError raised while handling the OSError."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path, partial: str | Path | None = None):
    """Turn a full disk inside the block into a one-line UserError naming `path`, after removing
    `partial` (the half-written file, if any); every other error passes through."""
    try:
        yield
    except Exception as exc:
        code = _disk_full(exc)
        if code is None:
            raise
        if partial is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        raise UserError(f"{os.strerror(code).lower()} writing {path}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        with writing(path):
            yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_torch(path: str | Path, obj: object) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through a Python file, so that a full disk surfaces as its OSError


def load_torch(path: str | Path, what: str = "checkpoint"):
    """A `torch.save`d file, loaded without running code from it (weights_only=True: tensors and
    plain values only). A missing, corrupt, truncated or code-carrying file is a one-line UserError
    that says what the file is not (torch's own text suggests weights_only=False: never shown)."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a {what} file") from None
    except PermissionError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    except pickle.UnpicklingError as exc:
        # weights_only refused it: either it names something to call (code), or it is no pickle at all
        called = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if called:
            raise UserError(f"{path} is not a plain {what}: it would call {called.group(1)} when loaded "
                            f"(only tensors and plain values are read from a run directory)") from None
        raise UserError(f"{path} is not a readable {what} (truncated or corrupt)") from None
    except Exception:  # torch raises many types, none of them telling, for a corrupt or truncated file
        raise UserError(f"{path} is not a readable {what} (truncated or corrupt)") from None


def read_json(path: str | Path, what: str = "file"):
    """A JSON object written by `write_json`; a corrupt or truncated file is a one-line UserError."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable {what}: {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a readable {what}: it holds a JSON {type(obj).__name__}, not an object")
    return obj


def _json_default(obj: object):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line; a line is written with one call so a crash can cut at most that line."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read metrics.jsonl, ignoring a last line cut short by a crash."""
    records: list[dict] = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curve_records(records: list[dict], event: str = "probe") -> list[dict]:
    """The evaluation lines of one kind (`--probe-every`: "probe"; a distilled student: "student") of a
    metrics.jsonl as read by read_jsonl, in step order."""
    return sorted((r for r in records if r.get("event") == event), key=lambda r: r["step"])


def changed_settings(previous: dict, current: dict, ignore: Collection[str] = ()) -> list[str]:
    """The keys of `current` whose value differs from `previous` (compared as JSON, so tuples and
    lists alike; nested dicts name their differing keys as `outer.inner`). Keys `previous` does not
    hold (written by an older version) and keys in `ignore` are not compared."""
    changed = []
    for key, value in current.items():
        if key in ignore or key not in previous:
            continue
        before = previous[key]
        if isinstance(value, dict) and isinstance(before, dict):
            changed += [f"{key}.{k}" for k in changed_settings(before, value)]
        elif json.dumps(before, default=str) != json.dumps(value, default=str):
            changed.append(key)
    return changed


def check_settings(path: str | Path, settings: dict, refusal: str, ignore: Collection[str] = (),
                   what: str = "settings") -> bool:
    """The one check that a directory's outputs come from one set of settings.

    If `path` exists, raise UserError(`refusal` with {changed} replaced by the differing keys) when
    `settings` differ from what it holds; return True. Otherwise return False: the caller writes
    its record (`runs.write_json(path, ...)`) once its other checks have passed."""
    path = Path(path)
    if not path.exists():
        return False
    previous = read_json(path, what)
    changed = changed_settings(previous if isinstance(previous, dict) else {}, settings, ignore)
    if changed:
        raise UserError(refusal.replace("{changed}", ", ".join(changed)))  # not str.format: paths may hold braces
    return True


def ensure_writable_dir(path: str | Path) -> Path:
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


_LOCKS: dict[str, int] = {}  # run directory -> open .lock file descriptor


def lock_run_dir(path: str | Path) -> Path:
    """Create the run directory `path` (as `ensure_writable_dir`) and claim it for this process,
    until `unlock_run_dirs()` (the CLI calls it when a command ends) or the process exits.

    `path/.lock` is locked with flock and holds the owner's pid. The kernel drops the lock when its
    process ends, however it ends, so a lock file left by a killed run never blocks a resume; while
    the owner lives, any other process is refused with a one-line error naming it. Claiming a
    directory this process already holds is a no-op (a command that runs another in-process)."""
    path = ensure_writable_dir(path)
    key = str(path.resolve())
    if key in _LOCKS:
        return path
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{path} is in use by another monossl process (pid {owner}); "
                        "wait for it to finish or choose another --out") from None
    with writing(path / ".lock"):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd
    return path


def unlock_run_dirs() -> None:
    """Release every run directory this process claimed."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])  # closing the last descriptor releases the flock


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
        "cpu": _cpu_model(),
        # the vector instructions torch's kernels use (ATEN_CPU_CAPABILITY can lower it) and whether
        # oneDNN multiplies in bf16 here (ONEDNN_MAX_CPU_ISA can turn it off): the probes' precision and
        # speed follow them (eval/features.py, probe_matmul_dtype)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": onednn_bf16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return info


def _cpu_model() -> str | None:
    """The CPU's model name where the OS says it (Linux), else None: `platform.processor()` gives only
    the architecture on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def onednn_bf16() -> bool:
    """Whether oneDNN multiplies in bf16 on this CPU (AVX512-BF16 or AMX, unless ONEDNN_MAX_CPU_ISA
    holds it lower)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
        return False


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; floats printed with one decimal."""

    def cell(v: object):
        if isinstance(v, float):
            return f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
