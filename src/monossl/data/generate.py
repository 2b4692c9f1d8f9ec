"""`monossl generate`: write patches of one image (or a few) to disk.

    monossl generate --image builtin:astronaut --preset all --size 32 --count 1000 \\
        --out out/p --preview out/p.png

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

Overrides: `--set KEY=VALUE` (repeatable) sets any PatchConfig field, e.g.
`--set rotation_degrees=10 --set area_range=0.01,1 --set scale=false`.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from monossl.errors import UserError

FORMATS = ("png", "jpg", "npy")
FILE_DIR = Path("train") / "dummy"
NAME_DIGITS = 7
# Bumped whenever the same (config, seed, images) would give different pixels, so a rerun
# never mixes patches of two versions of the generator in one directory.
PIXEL_VERSION = 1


def patch_name(index: int, fmt: str) -> str:
    return f"patch_{index:0{NAME_DIGITS}d}.{fmt}"


# ---------------------------------------------------------------------------- options

def _parse_value(key: str, text: str, default):
    """A --set value typed like the field's default."""
    text = text.strip()
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return _number(text)
        if isinstance(default, tuple):
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != 2:
                raise ValueError
            return tuple(_number(p) for p in parts)
        return text
    except (ValueError, ZeroDivisionError):  # ZeroDivisionError: a fraction such as 1/0
        kind = type(default).__name__ if not isinstance(default, tuple) else "two numbers min,max"
        raise UserError(f"--set {key}={text}: expected {kind}") from None


def _number(text: str) -> float:
    text = text.strip()
    if "/" in text:  # allow fractions such as 1/500 or 3/4
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def parse_overrides(items) -> dict:
    """['rotation_degrees=10', 'area_range=0.01,1'] -> typed dict of PatchConfig fields."""
    import dataclasses

    from monossl.data.patches import PatchConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PatchConfig)}
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in defaults:
            raise UserError(f"--set: unknown patch parameter {key!r}; valid: {', '.join(defaults)}")
        out[key] = _parse_value(key, value, defaults[key])
    return out


def configure(parser) -> None:
    from monossl.cli import positive
    from monossl.data.patches import PRESETS

    parser.add_argument("--image", action="append", metavar="SPEC",
                        help="source image: a file or builtin:NAME (see `monossl images`); repeat it "
                             "or give a comma list for several images (each patch picks one). "
                             "Default: builtin:astronaut")
    parser.add_argument("--preset", default="all",
                        help=f"augmentation preset: {', '.join(PRESETS)} (default: all, the paper's)")
    parser.add_argument("--size", type=positive(), default=32, help="patch side S in pixels (default 32)")
    parser.add_argument("--count", type=int, default=1000, help="number of patches (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="patch i depends only on (seed, i)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--format", default="png", choices=FORMATS,
                        help="png/jpg files in DIR/train/dummy, or one npy array (default png)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--fill", choices=("black", "none"), default=None,
                        help="black: the released generator's black wedges (default); "
                             "none: never a fill pixel")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any patch parameter, e.g. rotation_degrees=10, "
                             "area_range=0.01,1, scale=false, jitter_prob=0.8 (repeatable)")
    parser.add_argument("--preview", metavar="PNG", help="also write a contact sheet of the first patches")
    parser.add_argument("--batch-size", type=positive(), default=256, help="patches rendered per batch")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default: bit-reproducible files), cuda or auto")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes rendering and encoding files on CPU (default: one per core; "
                             "1: all in this process)")


# ---------------------------------------------------------------------------- writing

def to_uint8(x) -> np.ndarray:
    """(B, 3, S, S) float in [0, 1] -> (B, S, S, 3) uint8 (rounded)."""
    import torch

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


def _render_and_write(stream, folder: Path, idx, fmt: str, quality: int, pool=None) -> int:
    from monossl.runs import write_bytes

    arrs = to_uint8(stream.batch(idx))
    jobs = [(folder / patch_name(int(i), fmt), arr) for i, arr in zip(idx, arrs)]
    if pool is None:
        for path, arr in jobs:
            write_bytes(path, encode(arr, fmt, quality))
    else:
        list(pool.map(lambda job: write_bytes(job[0], encode(job[1], fmt, quality)), jobs))
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


_WORKER = {}


def _worker_init(stream, folder, fmt, quality) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core, like the released generator
    _WORKER.update(stream=stream, folder=folder, fmt=fmt, quality=quality)


def _worker_task(idx) -> int:
    w = _WORKER
    return _render_and_write(w["stream"], w["folder"], idx, w["fmt"], w["quality"])


def write_patch_files(stream, folder: Path, indices, fmt: str, quality: int = 95,
                      batch_size: int = 256, workers: int = 0, progress=None) -> int:
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
                    progress.update(n)
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
                progress.update(n)
    return done


def preview_sheet(stream, count: int, columns: int = 8, min_tile: int = 64) -> np.ndarray:
    """A contact sheet (H, W, 3) uint8 of patches 0..count-1, tiles upscaled (nearest) to at
    least `min_tile` pixels, separated by 2 white pixels."""
    count = max(1, count)
    arrs = to_uint8(stream.batch(range(count)))
    s = arrs.shape[1]
    rep = max(1, math.ceil(min_tile / s))
    tile = s * rep
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    gap = 2
    sheet = np.full((rows * (tile + gap) + gap, cols * (tile + gap) + gap, 3), 255, np.uint8)
    for k, a in enumerate(arrs):
        r, c = divmod(k, cols)
        big = a.repeat(rep, axis=0).repeat(rep, axis=1)
        y, x = gap + r * (tile + gap), gap + c * (tile + gap)
        sheet[y:y + tile, x:x + tile] = big
    return sheet


def _write_png(path: Path, sheet: np.ndarray) -> None:
    from PIL import Image

    from monossl.runs import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")


# ---------------------------------------------------------------------------- npy

def _write_npy(stream, out: Path, count: int, size: int, batch_size: int, progress) -> None:
    from numpy.lib.format import open_memmap

    from monossl.runs import write_json, writing

    final = out / "patches.npy"
    partial = out / ".patches.npy.partial"
    prog_path = out / ".patches.npy.progress"
    shape = (count, size, size, 3)
    if final.exists():
        try:
            existing = np.load(final, mmap_mode="r")
            if tuple(existing.shape) == shape and existing.dtype == np.uint8:
                if progress is not None:
                    progress.update(count)
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
        with writing(final, partial=partial):
            arr = open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            # reserve every block now: a memory-mapped write to a full disk is a SIGBUS, not an error
            with open(partial, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    if progress is not None:
        progress.update(done)
    for start in range(done, count, batch_size):
        stop = min(count, start + batch_size)
        arr[start:stop] = to_uint8(stream.batch(range(start, stop)))
        arr.flush()
        write_json(prog_path, {"done": stop, "shape": list(shape)})
        if progress is not None:
            progress.update(stop - start)
    arr.flush()
    del arr
    os.replace(partial, final)
    prog_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- run

def _identity(meta: dict) -> dict:
    keys = ("pixel_version", "config", "seed", "images", "format", "quality")
    return {k: meta.get(k) for k in keys}


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for k in a:
        if k == "config" and isinstance(a[k], dict) and isinstance(b.get(k), dict):
            out += [f"{kk}" for kk in a[k] if a[k][kk] != b[k].get(kk)]
        elif a[k] != b.get(k):
            out.append(k)
    return out


def run(args) -> int:
    from monossl.data import sources
    from monossl.data.patches import PatchStream, make_config
    from monossl.runs import ensure_writable_dir, environment, lock_run_dir, write_json

    t0 = time.time()
    # -- check everything before writing anything
    if args.count < 0:
        raise UserError(f"--count must be >= 0, not {args.count}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, not {args.seed}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, not {args.quality}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, not {args.workers}")
    overrides = parse_overrides(args.set)
    if "size" in overrides:
        raise UserError("give the patch size with --size, not --set size=...")
    if args.fill is not None:
        overrides["fill"] = args.fill
    config = make_config(args.preset, size=args.size, **overrides)
    specs = sources.split_specs(args.image) or [sources.BUILTIN_PREFIX + sources.DEFAULT_IMAGE]
    images = sources.load_images(specs)
    described = [sources.describe_source(s) for s in specs]
    from monossl.device import resolve_device

    device = resolve_device(args.device)
    stream = PatchStream(images, config, seed=args.seed, device=device, names=specs)

    out = Path(args.out)
    meta = {
        "pixel_version": PIXEL_VERSION,
        "config": config.to_dict(),
        "preset": args.preset,
        "seed": args.seed,
        "images": [{"spec": d["spec"], "sha256": d["sha256"]} for d in described],
        "format": args.format,
        "quality": args.quality if args.format == "jpg" else None,
        "count": args.count,
        "layout": str(FILE_DIR / f"patch_{'0' * NAME_DIGITS}.{args.format}")
        if args.format != "npy" else "patches.npy: uint8 (N, S, S, 3)",
    }
    meta_path = out / "patches.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{meta_path} exists but is not readable JSON; use another --out") from None
        diff = _differences(_identity(meta), _identity(old))
        if diff:
            raise UserError(
                f"{out} already holds patches of a different configuration (differs in: "
                f"{', '.join(diff)}); use another --out or delete it"
            )
    elif out.is_file():
        raise UserError(f"--out {out} is a file, not a directory")
    preview = Path(args.preview) if args.preview else None
    if preview is not None and preview.is_dir():
        raise UserError(f"--preview {preview} is a directory; give a .png file name")
    lock_run_dir(out)
    if preview is not None:
        ensure_writable_dir(preview.parent if str(preview.parent) else Path("."))

    meta["environment"] = environment()
    meta["environment"]["device"] = str(device)
    meta["complete"] = False
    write_json(meta_path, meta)

    from tqdm import tqdm

    bar = tqdm(total=args.count, unit="patch", desc="generate", disable=not sys.stderr.isatty())
    try:
        if args.format == "npy":
            _write_npy(stream, out, args.count, args.size, args.batch_size, bar)
        else:
            folder = out / FILE_DIR
            folder.mkdir(parents=True, exist_ok=True)
            existing = remove_partial_files(folder)  # left by an interrupted run
            todo = [i for i in range(args.count) if patch_name(i, args.format) not in existing]
            bar.update(args.count - len(todo))
            write_patch_files(stream, folder, todo, args.format, args.quality,
                              args.batch_size, args.workers, bar)
    finally:
        bar.close()
    if preview is not None:
        n = min(64, args.count) if args.count > 0 else 64
        _write_png(preview, preview_sheet(stream, n))
    meta["complete"] = True
    meta["seconds"] = round(time.time() - t0, 2)
    write_json(meta_path, meta)
    where = out / (FILE_DIR if args.format != "npy" else "patches.npy")
    print(f"wrote {args.count} patches of {args.size}x{args.size} ({args.format}) to {where}"
          + (f", preview {preview}" if preview else "") + f" in {meta['seconds']:.1f} s")
    return 0
