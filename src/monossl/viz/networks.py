"""The networks the figures draw: trunks named by run directories, trunk.pt files or `random[:SEED]`.

A spec is a run directory or a trunk.pt file (its label comes from the trunk's meta or the run's
config.json: `method, image, preset`), or `random` / `random:SEED`: a freshly initialised trunk
of `arch`, the same as `torch.manual_seed(SEED); build_trunk(arch)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monossl.errors import UserError
from monossl.models import load_trunk, random_trunk
from monossl.viz.figures import image_name


@dataclass
class Network:
    """A trunk with what identifies it: label for figures, meta, run directory (if any)."""

    label: str
    trunk: torch.nn.Module
    meta: dict = field(default_factory=dict)
    run_dir: Path | None = None
    config: dict = field(default_factory=dict)


def run_label(meta: dict, config: dict | None = None) -> str:
    """'method, image, preset' (or 'method, data' for dataset runs; 'random (seed K)')."""
    config = config or {}
    method = meta.get("method") or config.get("method") or "?"
    if method == "random":
        seed = meta.get("seed", config.get("seed"))
        return "random" if seed is None else f"random (seed {seed})"
    image = meta.get("image") or config.get("image")
    if image:
        preset = meta.get("preset") or config.get("preset") or "all"
        return f"{method}, {image_name(image)}, {preset}"
    data = meta.get("data") or config.get("data")
    return f"{method}, {data}" if data else str(method)


def random_network(arch: str = "cifar", seed: int = 0, **config) -> Network:
    trunk = random_trunk(arch, seed, **config)
    meta = {"method": "random", "seed": seed, "arch": arch}
    return Network(run_label(meta), trunk.eval(), meta)


def load_network(spec, arch: str = "cifar") -> Network:
    """A run directory / trunk.pt, or `random` / `random:SEED` (a fresh `arch` trunk)."""
    text = str(spec)
    path = Path(text)
    if not path.exists() and (text == "random" or text.startswith("random:")):
        try:
            seed = int(text.split(":", 1)[1]) if ":" in text else 0
        except ValueError:
            raise UserError(f"{text!r}: want random or random:SEED with an integer seed") from None
        return random_network(arch, seed)
    if not path.exists():
        raise UserError(f"no such run: {text} (give a run directory, a trunk.pt, or random[:SEED])")
    trunk, meta = load_trunk(path)
    run_dir = path if path.is_dir() else path.parent
    config = {}
    if (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except json.JSONDecodeError:
            config = {}
    return Network(run_label(meta, config), trunk.eval(), dict(meta), run_dir, config)


def networks(specs=(), random: bool = False, arch: str = "cifar", seed: int = 0) -> list[Network]:
    """A random `arch` trunk from `seed` first (if `random`), then one network per spec."""
    nets = [random_network(arch, seed)] if random else []
    return nets + [load_network(spec, arch) for spec in specs]
