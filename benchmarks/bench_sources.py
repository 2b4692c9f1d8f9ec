"""Samples per second of every procedural source against the photograph patch stream, in the same run.

    python benchmarks/bench_sources.py                   # 32 and 64 px, one thread, about a minute
    python benchmarks/bench_sources.py --sizes 32 --rounds 9 --threads 2

The baseline is what a one-image run draws from: `PatchStream` of builtin:astronaut with preset `all`
(the paper's augmentations). Each source renders batches of 256 at the same size through the stream
`pretrain` would build for it (`open_stream`). The sources take turns within each round, so a busy
machine slows all of them alike; a source's time is its median over rounds. Dead leaves and noise
are one image each, cropped by the patch stream (so about 1.0x), and are rendered once first: that
one-off cost is printed beside them. The target: every ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from monossl.data.patch_config import make_config
from monossl.data.procedural_stream import open_stream

BASELINE = "builtin:astronaut"
SOURCES = ["procedural:fractal", "procedural:fractal:one", "procedural:fractal:100", "procedural:spectral",
           "procedural:dead-leaves", "procedural:noise"]
TARGET = 0.5


def measure(sizes, rounds: int, batches: int, batch: int) -> dict:
    """{(spec, size): (samples per second, seconds to open the stream)}."""
    results = {}
    for size in sizes:
        config = make_config("all", size=size)
        streams, opened = {}, {}
        for spec in [BASELINE] + SOURCES:
            t0 = time.perf_counter()
            streams[spec] = open_stream([spec], config, seed=0)
            opened[spec] = time.perf_counter() - t0
            streams[spec].batch(range(batch))  # warm-up
        times = {spec: [] for spec in streams}
        start = batch
        for _ in range(rounds):
            for spec, stream in streams.items():
                t0 = time.perf_counter()
                for k in range(batches):
                    stream.batch(range(start + k * batch, start + (k + 1) * batch))
                times[spec].append((time.perf_counter() - t0) / (batches * batch))
            start += batches * batch  # new samples every round: nothing is cached anywhere
        for spec in streams:
            results[spec, size] = (1.0 / statistics.median(times[spec]), opened[spec])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="batches per source per round")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}")
    print(f"batches of {args.batch}, {args.batches} per source per round, median of {args.rounds} rounds\n")
    results = measure(args.sizes, args.rounds, args.batches, args.batch)
    ok = True
    for size in args.sizes:
        base = results[BASELINE, size][0]
        print(f"{size} px: photograph patch stream ({BASELINE}, preset all) {base:,.0f} samples/s")
        print(f"  {'source':28s} {'samples/s':>10s} {'ratio':>6s}  opened in")
        for spec in SOURCES:
            rate, opened = results[spec, size]
            ratio = rate / base
            ok &= ratio >= TARGET
            print(f"  {spec:28s} {rate:10,.0f} {ratio:5.2f}x  {opened:.2f} s")
        print()
    print(f"every ratio >= {TARGET}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
