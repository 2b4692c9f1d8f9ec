"""Patches per second: the batched stream against the released generator's per-sample
torchvision/PIL chain, in the same run, at several patch sizes, in memory and writing JPEGs.

    python benchmarks/bench_patches.py                # default: about 2-3 minutes
    python benchmarks/bench_patches.py --scale 5      # 5x the patch counts (steadier numbers)
    python benchmarks/bench_patches.py --sizes 32 256 --no-files

The reference is what the authors' generator does per sample: RandomCrop(half the short
side) -> RandomResizedCrop(int(sqrt(2) S), scale=(1/500, 1), bicubic) -> RandomAffine(30,
shear=30, bilinear) -> CenterCrop(S) -> RandomApply(ColorJitter(.4, .4, .4, .1), p=.5), on a
PIL image, in a multiprocessing Pool with one worker process per core (as the released
generator runs one per thread). The stream is measured twice: one process using all torch
threads, and one process per core with one thread each (like the reference); the ratio uses
the faster. "Writing" means encoding JPEG (quality 95) and writing one file per patch; the
stream side uses exactly `monossl generate`'s writer (atomic writes, encoder threads).

Peak memory is how far the resident set size rose above its level at the start of the
phase (VmHWM reset via /proc/self/clear_refs), summed over the worker processes for pools:
the memory the work itself needed, not counting the loaded libraries.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

IMAGE = "builtin:astronaut"
QUALITY = 95


# ---------------------------------------------------------------- memory

_BASE = {"rss": 0.0}


def _status_mb(key: str):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    """Start a phase: reset the peak RSS (Linux >= 4.0) and remember the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    _BASE["rss"] = _status_mb("VmRSS") or 0.0


def _peak_mb() -> float:
    """Peak RSS growth since `_reset_peak` (MB): the memory the phase itself needed."""
    hwm = _status_mb("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(0.0, hwm - _BASE["rss"])


# ---------------------------------------------------------------- reference (per sample)

_REF = {}


def _ref_init(size: int) -> None:
    import torch
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode as IM

    from monossl.data.sources import load_image

    torch.set_num_threads(1)
    img = load_image(IMAGE)
    import torchvision.transforms.functional as TF

    pil = TF.to_pil_image(img)
    short = min(pil.size)
    _REF["pil"] = pil
    _REF["chain"] = T.Compose([
        T.RandomCrop(short // 2),
        T.RandomResizedCrop(int(math.sqrt(2) * size), scale=(1 / 500, 1), interpolation=IM.BICUBIC),
        T.RandomAffine(30, shear=30, interpolation=IM.BILINEAR),
        T.CenterCrop(size),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.5),
    ])


def _ref_task(job):
    start, stop, folder = job
    _reset_peak()
    chain, pil = _REF["chain"], _REF["pil"]
    for i in range(start, stop):
        patch = chain(pil)
        if folder:
            patch.save(os.path.join(folder, f"patch_{i:07d}.jpg"), quality=QUALITY)
    return _peak_mb()


def _split(n: int, parts: int, folder):
    step = max(1, math.ceil(n / (parts * 4)))
    return [(a, min(n, a + step), folder) for a in range(0, n, step)]


def bench_reference(size: int, n: int, workers: int, folder) -> tuple[float, float]:
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_ref_init, initargs=(size,)) as pool:
        pool.map(_ref_task, [(0, 2, None)] * workers)  # warm up every worker
        t = time.perf_counter()
        peaks = pool.map(_ref_task, _split(n, workers, folder))
        dt = time.perf_counter() - t
    return n / dt, sum(sorted(peaks)[-workers:])


# ---------------------------------------------------------------- stream

_STREAM = {}


def _stream_init(size: int) -> None:
    import torch

    from monossl.data.patch_config import make_config
    from monossl.data.patches import PatchStream
    from monossl.data.sources import load_image

    torch.set_num_threads(1)
    _STREAM["s"] = PatchStream([load_image(IMAGE)], make_config("all", size=size), seed=0)


def _stream_task(job):
    start, stop, batch = job
    _reset_peak()
    st = _STREAM["s"]
    for a in range(start, stop, batch):
        st.batch(range(a, min(stop, a + batch)))
    return _peak_mb()


def batch_size_for(size: int) -> int:
    return max(8, 262144 // (size * size))


def bench_stream_threads(size: int, n: int) -> tuple[float, float]:
    import torch  # noqa: F401

    from monossl.data.patch_config import make_config
    from monossl.data.patches import PatchStream
    from monossl.data.sources import load_image

    st = PatchStream([load_image(IMAGE)], make_config("all", size=size), seed=0)
    b = batch_size_for(size)
    st.batch(range(b))  # warm up
    _reset_peak()
    t = time.perf_counter()
    for a in range(0, n, b):
        st.batch(range(a, min(n, a + b)))
    dt = time.perf_counter() - t
    return n / dt, _peak_mb()


def bench_stream_procs(size: int, n: int, workers: int) -> tuple[float, float]:
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    b = batch_size_for(size)
    step = max(b, math.ceil(n / workers / b) * b)
    with ctx.Pool(workers, initializer=_stream_init, initargs=(size,)) as pool:
        pool.map(_stream_task, [(0, b, b)] * workers)
        t = time.perf_counter()
        peaks = pool.map(_stream_task, [(a, min(n, a + step), b) for a in range(0, n, step)])
        dt = time.perf_counter() - t
    return n / dt, sum(sorted(peaks)[-workers:])


def bench_stream_files(size: int, n: int, folder: Path) -> tuple[float, float]:
    from monossl.data.generate import write_patch_files
    from monossl.data.patch_config import make_config
    from monossl.data.patches import PatchStream
    from monossl.data.sources import load_image

    st = PatchStream([load_image(IMAGE)], make_config("all", size=size), seed=0)
    b = batch_size_for(size)
    st.batch(range(b))
    _reset_peak()
    t = time.perf_counter()
    write_patch_files(st, folder, range(n), "jpg", QUALITY, batch_size=b)
    dt = time.perf_counter() - t
    return n / dt, _peak_mb()


# ---------------------------------------------------------------- main

DEFAULT_COUNTS = {  # (reference, stream) patches per measurement at --scale 1
    32: (1000, 10000),
    64: (500, 3000),
    256: (60, 400),
}


def counts(size: int, scale: float):
    ref, st = DEFAULT_COUNTS.get(size, (max(50, 1000 * 32 // size), max(200, 10000 * 32 // size)))
    return max(20, int(ref * scale)), max(50, int(st * scale))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every patch count")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="reference pool size (default: one per core)")
    ap.add_argument("--no-files", action="store_true", help="skip the JPEG-writing comparison")
    ap.add_argument("--no-memory", action="store_true", help="skip the in-memory comparison")
    args = ap.parse_args(argv)

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")
    print(f"image {IMAGE}, preset all; reference: per-sample torchvision/PIL chain in a Pool of "
          f"{args.workers} processes")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_patches_"))
    try:
        for size in args.sizes:
            n_ref, n_st = counts(size, args.scale)
            if not args.no_memory:
                ref, ref_mem = bench_reference(size, n_ref, args.workers, None)
                thr, thr_mem = bench_stream_threads(size, n_st)
                prc, prc_mem = bench_stream_procs(size, n_st, args.workers)
                best = max(thr, prc)
                rows.append((size, "memory", ref, ref_mem, thr, thr_mem, prc, prc_mem, best / ref))
                print(f"S={size:<4d} in memory : reference {ref:9.0f}/s ({ref_mem:6.0f} MB) | stream "
                      f"1 proc {thr:9.0f}/s ({thr_mem:6.0f} MB), {args.workers} procs {prc:9.0f}/s "
                      f"({prc_mem:6.0f} MB) | ratio {best / ref:5.1f}x", flush=True)
            if not args.no_files:
                n_ref_f, n_st_f = max(20, n_ref // 2), max(50, n_st // 4)
                d_ref, d_st = tmp / f"ref{size}", tmp / f"st{size}"
                d_ref.mkdir()
                ref, ref_mem = bench_reference(size, n_ref_f, args.workers, str(d_ref))
                stf, stf_mem = bench_stream_files(size, n_st_f, d_st)
                assert len(os.listdir(d_st)) == n_st_f and len(os.listdir(d_ref)) == n_ref_f
                rows.append((size, "jpeg files", ref, ref_mem, stf, stf_mem, None, None, stf / ref))
                print(f"S={size:<4d} JPEG files: reference {ref:9.0f}/s ({ref_mem:6.0f} MB) | stream "
                      f"{stf:9.0f}/s ({stf_mem:6.0f} MB) | ratio {stf / ref:5.1f}x", flush=True)
                shutil.rmtree(d_ref)
                shutil.rmtree(d_st)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| S | mode | reference patches/s | stream patches/s | ratio | peak MB (ref / stream) |")
    print("|---|---|---|---|---|---|")
    for size, mode, ref, ref_mem, a, a_mem, b, b_mem, ratio in rows:
        st = a if b is None else max(a, b)
        st_mem = a_mem if b is None or a >= b else b_mem
        print(f"| {size} | {mode} | {ref:.0f} | {st:.0f} | {ratio:.1f}x | {ref_mem:.0f} / {st_mem:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
