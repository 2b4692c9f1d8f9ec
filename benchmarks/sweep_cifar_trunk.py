"""Which CIFAR-trunk design lets one-image RotNet learn conv1? A sweep, meant for a GPU.

For each trunk variant (conv1 kernel, widths) and RotNet budget, it probes the random
trunk and the one-image RotNet trunk with the `cifar` protocol and prints one table of
top-1 per tap (and the gap RotNet - random). Numbers are for choosing defaults; the
README's table comes from `monossl compare`.

    python benchmarks/sweep_cifar_trunk.py --data cifar10:PATH --device cuda --out runs/sweep
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from monossl.cli import main as cli
from monossl.data.datasets import load_pair
from monossl.eval.probe import probe as run_probe
from monossl.eval.protocols import get_protocol
from monossl.models import build_trunk, load_trunk
from monossl.runs import environment, markdown_table, write_json

# name -> (trunk config, extra pretrain options)
VARIANTS = {
    "k3 w32 (default)": ({"conv1_kernel": 3, "widths": [32, 64, 128, 256]}, []),
    "k5 w64": ({"conv1_kernel": 5, "widths": [64, 128, 256, 512]}, []),
    "k3 w64": ({"conv1_kernel": 3, "widths": [64, 128, 256, 512]}, []),
    "k7 w64": ({"conv1_kernel": 7, "widths": [64, 128, 256, 512]}, []),
    "k9 w64": ({"conv1_kernel": 9, "widths": [64, 128, 256, 512]}, []),
    "k5 w32": ({"conv1_kernel": 5, "widths": [32, 64, 128, 256]}, []),
    "k7 w32": ({"conv1_kernel": 7, "widths": [32, 64, 128, 256]}, []),
    "k5 w64 lr0.1": ({"conv1_kernel": 5, "widths": [64, 128, 256, 512]}, ["--lr", "0.1"]),
    "k5 w64 crop0.08": ({"conv1_kernel": 5, "widths": [64, 128, 256, 512]}, ["--crop-scale", "0.08,1"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--steps", default="500,2000", help="RotNet step budgets to try (comma list)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probe-epochs", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    out = Path(args.out)
    train, test = load_pair(args.data)
    protocol = get_protocol("cifar").with_overrides(epochs=args.probe_epochs)
    rows, records = [], []

    def probe(trunk, meta):
        r = run_probe(trunk, train, test, protocol, device=args.device, seed=args.seed, progress=False,
                      verbose=False, meta=meta, dataset=args.data)
        return [r["taps"][t]["top1"] for t in ("conv1", "conv2", "conv3", "conv4")]

    for name in [v.strip() for v in args.variants.split(",")]:
        try:
            sweep_variant(name, args, out, probe, rows, records)
        except Exception:  # report and go on: one broken variant should not cost the others
            import traceback

            traceback.print_exc()

    header = ["variant", "steps"] + [f"random {t}" for t in "1234"] + [f"rotnet {t}" for t in "1234"] + \
             [f"gap {t}" for t in "1234"] + ["train s"]
    table = markdown_table(header, rows)
    print(table)
    write_json(out / "sweep.json", {"records": records, "protocol": protocol.to_dict(), "data": args.data,
                                    "environment": environment()})
    (out / "sweep.md").write_text(table)


def sweep_variant(name, args, out, probe, rows, records):
    config, extra = VARIANTS[name]
    torch.manual_seed(args.seed)
    random_acc = probe(build_trunk("cifar", **config), {"method": "random"})
    for steps in [int(s) for s in args.steps.split(",")]:
        run_dir = out / f"{name.replace(' ', '_')}_{steps}"
        t0 = time.perf_counter()
        if not (run_dir / "trunk.pt").exists():
            argv = ["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", str(steps),
                    "--batch-size", str(args.batch_size), "--conv1-kernel", str(config["conv1_kernel"]),
                    "--widths", ",".join(map(str, config["widths"])), "--device", args.device,
                    "--seed", str(args.seed), "--out", str(run_dir), "--quiet", *extra]
            if (run_dir / "last.pt").exists():
                argv.append("--resume")
            assert cli(argv) == 0
        train_s = time.perf_counter() - t0
        rot_acc = probe(load_trunk(run_dir)[0], {"method": "rotnet"})
        gap = [a - b for a, b in zip(rot_acc, random_acc)]
        rows.append([name, steps, *random_acc, *rot_acc, *gap, round(train_s)])
        records.append({"variant": name, "config": config, "extra": extra, "steps": steps,
                        "random": random_acc, "rotnet": rot_acc, "train_s": train_s})
        print(f"{name} steps {steps}: random {random_acc} rotnet {rot_acc} ({train_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
