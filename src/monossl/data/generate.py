"""Write patches of one image (or a few) to disk: `write_patches`, what `monossl generate` runs.

    meta = write_patches(["builtin:astronaut"], make_config("all", size=32), "out/p", count=1000,
                         preview="out/p.png")

Formats:

* `png` / `jpg`: the authors' layout `DIR/train/dummy/patch_0000000.png` (any ImageFolder
  tool reads it). Each file is written to a temporary name and renamed into place, so a
  file that exists is complete; a rerun of the same command skips existing files and
  makes only the missing ones (patch i is the same whatever run or batch makes it).
* `npy`: one uint8 array `DIR/patches.npy` of shape (N, S, S, 3). While running, the
  array lives in `DIR/.patches.npy.partial` and `DIR/.patches.npy.progress` records how
  many leading patches are done; a rerun continues from there; the array is renamed to
  `patches.npy` when complete.

`DIR/patches.json` records the full patch configuration, seed, source images (spec,
path, sha256), format, count and environment. A rerun into a DIR whose patches.json
describes different patches (configuration, seed, images or format) is refused: patches
of two configurations never mix. Only the count may change (more or fewer files).
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from monossl import runs
from monossl.data import sources
from monossl.data.patch_config import PatchConfig
from monossl.data.patches import Stream
from monossl.data.procedural_stream import ProceduralStream, open_stream
from monossl.device import resolve_device
from monossl.errors import UserError

FORMATS = ("png", "jpg", "npy")
FILE_DIR = Path("train") / "dummy"
NAME_DIGITS = 7
# Bumped whenever the same (config, seed, images) would give different pixels, so a rerun
# never mixes patches of two versions of the generator in one directory.
PIXEL_VERSION = 1
# What must match for a rerun to add patches to a directory (the count may change).
IDENTITY = ("pixel_version", "config", "seed", "images", "format", "quality")


def patch_name(index: int, fmt: str) -> str:
    return f"patch_{index:0{NAME_DIGITS}d}.{fmt}"


# ---------------------------------------------------------------------------- writing

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) float in [0, 1] -> (B, S, S, 3) uint8 (rounded)."""
    y = torch.round(x.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_and_write(stream: Stream, folder: Path, idx: np.ndarray, fmt: str, quality: int,
                      pool: ThreadPoolExecutor | None = None) -> int:
    arrs = to_uint8(stream.batch(idx))
    jobs = [(folder / patch_name(int(i), fmt), arr) for i, arr in zip(idx, arrs)]
    if pool is None:
        for path, arr in jobs:
            runs.write_bytes(path, encode(arr, fmt, quality))
    else:
        list(pool.map(lambda job: runs.write_bytes(job[0], encode(job[1], fmt, quality)), jobs))
    return len(jobs)


def remove_partial_files(folder: Path) -> set[str]:
    """Delete the temporary files of writes that never finished; returns the names of the files left."""
    left = set()
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            Path(entry.path).unlink(missing_ok=True)
        else:
            left.add(entry.name)
    return left


_WORKER: dict = {}


def _worker_init(stream: Stream, folder: Path, fmt: str, quality: int) -> None:
    torch.set_num_threads(1)  # one process per core, like the released generator
    _WORKER.update(stream=stream, folder=folder, fmt=fmt, quality=quality)


def _worker_task(idx: np.ndarray) -> int:
    w = _WORKER
    return _render_and_write(w["stream"], w["folder"], idx, w["fmt"], w["quality"])


def write_patch_files(stream: Stream, folder: Path, indices: npt.ArrayLike, fmt: str, quality: int = 95,
                      batch_size: int = 256, workers: int = 0,
                      progress: Callable[[int], None] | None = None) -> int:
    """Render patches `indices` and write them as files `folder/patch_<i>.<fmt>`, each
    atomically (temporary name, then rename). On CPU the work is split over `workers`
    processes (default: one per core), each rendering with one torch thread and encoding
    its own batches; on a GPU one process renders and a thread pool encodes. Returns the count."""
    import multiprocessing as mp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    indices = np.asarray(indices, dtype=np.int64)
    workers = workers or os.cpu_count() or 1
    batches = [indices[a:a + batch_size] for a in range(0, len(indices), batch_size)]
    done = 0
    if workers > 1 and stream.device.type == "cpu" and len(batches) > 1 and sys.platform.startswith("linux"):
        ctx = mp.get_context("fork")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(stream, folder, fmt, quality))
        try:
            for n in pool.imap_unordered(_worker_task, batches):
                done += n
                if progress is not None:
                    progress(n)
            pool.close()
        except BaseException:
            pool.terminate()  # files are complete or absent: the temporary files of killed workers go
            pool.join()
            remove_partial_files(folder)
            raise
        pool.join()
        return done
    with ThreadPoolExecutor(max_workers=workers) as tpool:
        for idx in batches:
            n = _render_and_write(stream, folder, idx, fmt, quality, tpool if workers > 1 else None)
            done += n
            if progress is not None:
                progress(n)
    return done


def preview_sheet(stream: Stream, count: int, columns: int = 8, min_tile: int = 64) -> torch.Tensor:
    """A contact sheet of patches 0..count-1: a (3, H, W) float tensor, tiles upscaled (nearest)
    to at least `min_tile` pixels, `columns` a row, 2 white pixels apart."""
    from torchvision.utils import make_grid

    x = stream.batch(range(max(1, count))).cpu()
    rep = max(1, math.ceil(min_tile / x.shape[-1]))
    big = x.repeat_interleave(rep, dim=2).repeat_interleave(rep, dim=3)
    return make_grid(big, nrow=columns, padding=2, pad_value=1.0)


def _write_png(path: Path, sheet: torch.Tensor) -> None:
    from torchvision.utils import save_image

    with runs.atomic_path(path) as tmp:
        save_image(sheet, tmp, format="PNG")


# ---------------------------------------------------------------------------- npy

def _write_npy(stream: Stream, out: Path, count: int, size: int, batch_size: int,
               progress: Callable[[int], None] | None) -> None:
    from numpy.lib.format import open_memmap

    final = out / "patches.npy"
    partial = out / ".patches.npy.partial"
    prog_path = out / ".patches.npy.progress"
    shape = (count, size, size, 3)
    if final.exists():
        try:
            existing = np.load(final, mmap_mode="r")
            if tuple(existing.shape) == shape and existing.dtype == np.uint8:
                if progress is not None:
                    progress(count)
                return  # already complete
        except (OSError, ValueError):
            pass
    done = 0
    arr = None
    if partial.exists() and prog_path.exists():
        try:
            rec = json.loads(prog_path.read_text())
            arr = open_memmap(partial, mode="r+")
            if tuple(arr.shape) != shape or arr.dtype != np.uint8:
                arr = None
            else:
                done = int(rec.get("done", 0))
        except (OSError, ValueError):
            arr = None
    if arr is None:
        done = 0
        with runs.writing(final, partial=partial):
            arr = open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            # reserve every block now: a memory-mapped write to a full disk is a SIGBUS, not an error
            with open(partial, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    if progress is not None:
        progress(done)
    for start in range(done, count, batch_size):
        stop = min(count, start + batch_size)
        arr[start:stop] = to_uint8(stream.batch(range(start, stop)))
        arr.flush()
        runs.write_json(prog_path, {"done": stop, "shape": list(shape)})
        if progress is not None:
            progress(stop - start)
    arr.flush()
    del arr
    os.replace(partial, final)
    prog_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the entry point

def write_patches(images: list[str], config: PatchConfig, out: str | Path, count: int, seed: int = 0,
                  fmt: str = "png", quality: int = 95, batch_size: int = 256, device: str = "cpu",
                  workers: int = 0, preview: str | Path | None = None, progress: Callable[[int], None] | None = None,
                  preset: str | None = None) -> dict:
    """Write patches 0..count-1 of (images, config, seed) into the directory `out`; return the
    metadata written to `out/patches.json`.

    images: specs for `load_images` (files or builtin:NAME), or one per-sample procedural source
    (`procedural:fractal`, ..., data/procedural_stream.py: rendered at the config's size).
    fmt: png, jpg (at `quality`) or npy.
    device: cpu (bit-reproducible files), cuda or auto. workers: processes rendering and encoding
    files on CPU (0: one per core; 1: all in this process). preview: a PNG path for a contact sheet
    of the first patches. progress(n) is called as n more patches are done. preset: recorded only.

    Everything is checked before anything is written (a bad argument is a one-line UserError and
    leaves no `out`); a rerun resumes an interrupted one, and is refused if `out` holds patches of
    another configuration, seed, image set or format."""
    t0 = time.time()
    # -- check everything before writing anything
    if count < 0:
        raise UserError(f"--count must be >= 0, not {count}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, not {seed}")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, not {quality}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, not {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, not {workers}")
    config = config.validate()
    resolved = resolve_device(device)
    stream = open_stream(list(images), config, seed=seed, device=resolved, names=list(images))
    described = [stream.describe() if isinstance(stream, ProceduralStream) else sources.describe_source(s)
                 for s in images]

    out = Path(out)
    meta: dict[str, Any] = {
        "pixel_version": PIXEL_VERSION,
        "config": config.to_dict(),
        "preset": preset,
        "seed": seed,
        "images": [{"spec": d["spec"], "sha256": d["sha256"]} for d in described],
        "format": fmt,
        "quality": quality if fmt == "jpg" else None,
        "count": count,
        "layout": str(FILE_DIR / f"patch_{'0' * NAME_DIGITS}.{fmt}")
        if fmt != "npy" else "patches.npy: uint8 (N, S, S, 3)",
    }
    meta_path = out / "patches.json"
    held = runs.check_settings(
        meta_path, {k: meta[k] for k in IDENTITY},
        f"{out} already holds patches of a different configuration (differs in: {{changed}}); "
        "use another --out or delete it", what="record of patches")
    if not held and out.is_file():
        raise UserError(f"--out {out} is a file, not a directory")
    preview = Path(preview) if preview else None
    if preview is not None and preview.is_dir():
        raise UserError(f"--preview {preview} is a directory; give a .png file name")
    runs.lock_run_dir(out)
    if preview is not None:
        runs.ensure_writable_dir(preview.parent if str(preview.parent) else Path("."))

    meta["environment"] = runs.environment()
    meta["environment"]["device"] = str(resolved)
    meta["complete"] = False
    runs.write_json(meta_path, meta)

    if fmt == "npy":
        _write_npy(stream, out, count, config.size, batch_size, progress)
    else:
        folder = out / FILE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        existing = remove_partial_files(folder)  # left by an interrupted run
        todo = [i for i in range(count) if patch_name(i, fmt) not in existing]
        if progress is not None:
            progress(count - len(todo))
        write_patch_files(stream, folder, todo, fmt, quality, batch_size, workers, progress)
    if preview is not None:
        n = min(64, count) if count > 0 else 64
        _write_png(preview, preview_sheet(stream, n))
    meta["complete"] = True
    meta["seconds"] = round(time.time() - t0, 2)
    runs.write_json(meta_path, meta)
    return meta
