"""The networks the figures draw: trunks named by run directories, trunk.pt files or `random[:SEED]`.

A spec is a run directory or a trunk.pt file (its label comes from the trunk's meta or the run's
config.json: `method, image, preset`), or `random` / `random:SEED`: a freshly initialised trunk
of `arch`, the same as `torch.manual_seed(SEED); build_trunk(arch)`.

A network may carry images of the data it was trained on (`pattern_images`), for the activation
patterns of its conv1 filters (viz/filters.py): `training_images(run_dir)` rebuilds them from a
run's config.json, `data_images(spec)` makes them from a dataset or an image for networks that have
no training data of their own (random trunks).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from monossl.errors import UserError
from monossl.models import Trunk, load_trunk, random_trunk
from monossl.pretrain import WHITENING_SAMPLES, first_samples
from monossl.runs import read_json
from monossl.viz.figures import image_name

if TYPE_CHECKING:
    from monossl.data.batches import Source


@dataclass
class Network:
    """A trunk with what identifies it: label for figures, meta, run directory (if any)."""

    label: str
    trunk: Trunk
    meta: dict = field(default_factory=dict)
    run_dir: Path | None = None
    config: dict = field(default_factory=dict)
    # images (B, 3, H, W) in [0, 1] of the data whose patch covariance gives the filters' activation
    # patterns (None: drawn without patterns), and what they are, for titles ("training data", "cifar10")
    pattern_images: torch.Tensor | None = None
    pattern_data: str | None = None


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


def load_network(spec: str | Path, arch: str = "cifar") -> Network:
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


def networks(specs: Iterable[str | Path] = (), random: bool = False, arch: str = "cifar",
             seed: int = 0) -> list[Network]:
    """A random `arch` trunk from `seed` first (if `random`), then one network per spec."""
    nets = [random_network(arch, seed)] if random else []
    return nets + [load_network(spec, arch) for spec in specs]


# ---------------------------------------------------------------------------- data for patterns


def records_training_data(config: dict) -> bool:
    """Whether a run's config.json says what it trained on (the patch stream of images, or a dataset)."""
    return bool(config.get("image") and config.get("patch_config")) or bool(config.get("data"))


def training_images(run_dir: str | Path, n: int = WHITENING_SAMPLES) -> torch.Tensor:
    """The first n training samples (N, 3, S, S) in [0, 1] of a `monossl pretrain` run (a run directory,
    or a file in one), rebuilt from its config.json as `pretrain.build_source` built them: the same
    images its conv1 whitening used (for n = WHITENING_SAMPLES). No labels."""
    from monossl.data.batches import StreamSource, dataset_source

    path = Path(run_dir)
    run_dir = path.parent if path.is_file() else path
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{path}: no config.json beside it to say what it was trained on")
    config = read_json(run_dir / "config.json", "run configuration")
    if not records_training_data(config):
        raise UserError(f"{run_dir}/config.json does not record the training data (no image/patch_config or data)")
    seed = int(config.get("seed", 0))
    recorded = config.get("source") or {}
    source: Source
    if config.get("image") and config.get("patch_config"):
        from monossl.data.patch_config import PatchConfig
        from monossl.data.procedural_stream import open_stream

        images = [config["image"]] if isinstance(config["image"], str) else list(config["image"])
        stream = open_stream(images, PatchConfig.from_dict(config["patch_config"]), seed=seed, names=images)
        source = StreamSource(stream, length=recorded.get("length"), seed=seed)
    else:
        from monossl.data.datasets import load_dataset

        # an image folder is read at the side the run recorded; in-memory sets as they are
        source = dataset_source(load_dataset(config["data"], "train"), False, recorded.get("size", 32), seed=seed)
    return first_samples(source, n)


def sample_side(trunk: Trunk) -> int:
    """The side S of the samples a run of `trunk` trains on by default: 32 px for the CIFAR trunk,
    256 for AlexNet (`pretrain.build_source`)."""
    return 32 if trunk.input_size <= 64 else 256


def data_images(spec: str, n: int = WHITENING_SAMPLES, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n images (N, 3, H, W) in [0, 1] of `spec`, the first samples a `monossl pretrain` run with `--seed
    seed` would take from it: a dataset spec (`cifar10`, `folder:PATH`, ...: its training split's first
    n in the epoch-0 shuffle; folders read at `size` x `size`) or image specs as `--image` takes
    (`builtin:NAME`, a path, several separated by commas: the first n patches of their patch stream,
    preset all, `size` x `size`)."""
    from monossl.data.batches import StreamSource, dataset_source
    from monossl.data.datasets import NAMED, load_dataset

    source: Source
    if spec.partition(":")[0] in (*NAMED, "folder"):
        source = dataset_source(load_dataset(spec, "train"), False, size, seed=seed)
    else:
        from monossl.data.patch_config import make_config
        from monossl.data.procedural_stream import open_stream
        from monossl.data.sources import split_specs

        images = split_specs([spec])
        stream = open_stream(images, make_config("all", size=size), seed=seed, names=images)
        source = StreamSource(stream, seed=seed)
    return first_samples(source, n)
