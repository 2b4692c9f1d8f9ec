"""AlexNet RotNet training throughput on a GPU, with patches made on the CPU vs on the GPU.

Runs the real training loop (`monossl.train.train`) for a few steps on the patch stream at
S = 256 (RotNet's crop 224 + flip on top), once with the stream on the CPU and once on the
GPU, and prints images per second for each (bf16 autocast, channels-last, as in training).

    python benchmarks/bench_gpu_rotnet.py [--arch alexnet-big] [--batch-size 192] [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from monossl.data.batches import StreamSource
from monossl.data.patch_config import make_config
from monossl.data.patches import PatchStream
from monossl.data.sources import DEFAULT_IMAGE, load_images
from monossl.device import resolve_device
from monossl.methods.rotnet import RotNet
from monossl.models import build_trunk
from monossl.train import LoopConfig, train


def images_per_second(arch, batch_size, steps, device, stream_device, patch_size):
    torch.manual_seed(0)
    stream = PatchStream(load_images([f"builtin:{DEFAULT_IMAGE}"]), make_config("all", size=patch_size), seed=0,
                         device=stream_device)
    method = RotNet(build_trunk(arch), total_steps=steps)
    loop = LoopConfig(total_steps=steps, batch_size=batch_size, log_every=steps, checkpoint_every=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        warm = LoopConfig(total_steps=3, batch_size=batch_size, log_every=3, checkpoint_every=10**9)
        train(method, StreamSource(stream), warm, tmp + "/warm", device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train(method, StreamSource(stream), loop, tmp + "/run", device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size * steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="alexnet-big")
    p.add_argument("--batch-size", type=int, default=192, help="images per step (x4 rotated samples)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"{args.arch} RotNet, batch {args.batch_size} images, S={args.patch_size}, on {name}, "
          f"torch {torch.__version__}")
    results = {}
    for where in (["cpu", "cuda"] if device.type == "cuda" else ["cpu"]):
        results[where] = images_per_second(args.arch, args.batch_size, args.steps, device, torch.device(where),
                                           args.patch_size)
        print(f"  patches on {where}: {results[where]:.0f} images/s ({4 * results[where]:.0f} samples/s)", flush=True)
    if len(results) == 2:
        print(f"  GPU patches / CPU patches: {results['cuda'] / results['cpu']:.2f}x")


if __name__ == "__main__":
    main()
