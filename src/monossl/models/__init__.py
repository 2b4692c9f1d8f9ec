"""Trunks with named taps, and their plain checkpoint format.

Checkpoint format (`trunk.pt`, a `torch.save`d dict, loadable with plain torch):

    {"format": "monossl.trunk/1",
     "arch": "cifar" | "alexnet-big" | "alexnet-small",
     "arch_config": {...},        # keyword arguments that rebuild the architecture
     "state_dict": {...},         # trunk.state_dict(): stages.convK.*, head.*, mean/std (+ sobel.*)
     "meta": {...}}               # method, image, preset, seed, steps: what made it

Rebuild with `build_trunk(ckpt["arch"], **ckpt["arch_config"])` then `load_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

from monossl.errors import UserError, first_line
from monossl.models.trunks import AlexNet, CifarTrunk, Sobel, Trunk, _init_weights, fuse_batchnorm

ARCHS = ("cifar", "alexnet-big", "alexnet-small", "resnet18-cifar", "resnet18")
CHECKPOINT_FORMAT = "monossl.trunk/1"

__all__ = ["ARCHS", "Trunk", "CifarTrunk", "AlexNet", "Sobel", "build_trunk", "random_trunk", "save_trunk",
           "load_trunk", "trunk_config_from", "fuse_batchnorm"]


def build_trunk(arch: str = "cifar", **config) -> Trunk:
    """A freshly initialised trunk (uses the global torch RNG: seed it first)."""
    trunk: Trunk
    if arch == "cifar":
        trunk = CifarTrunk(**config)
    elif arch in ("alexnet-big", "alexnet-small"):
        # the arch names the size; a checkpoint's arch_config repeats it ("size"), so that one wins only if equal
        size = arch.split("-")[1]
        if config.pop("size", size) != size:
            raise UserError(f"arch {arch} does not match its config's size")
        trunk = AlexNet(size=size, **config)
    elif arch in ("resnet18-cifar", "resnet18"):
        from monossl.models.resnet import ResNet18

        stem = "cifar" if arch == "resnet18-cifar" else "imagenet"
        if config.pop("stem", stem) != stem:
            raise UserError(f"arch {arch} does not match its config's stem")
        trunk = ResNet18(stem=stem, **config)
    else:
        raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    _init_weights(trunk)
    return trunk


def random_trunk(arch: str = "cifar", seed: int = 0, **config) -> Trunk:
    """The trunk of `torch.manual_seed(seed); build_trunk(arch, **config)`, without touching the global RNG:
    the random baseline of every table and figure."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_trunk(arch, **config)


def trunk_config_from(widths: str | None, conv1_kernel: int | None) -> dict:
    """CIFAR-trunk options from the command line (`--widths 64,128,256,512`, `--conv1-kernel 5`)."""
    config: dict[str, int | list[int]] = {}
    if conv1_kernel is not None:
        if conv1_kernel < 1:
            raise UserError(f"--conv1-kernel must be a positive size, got {conv1_kernel}")
        config["conv1_kernel"] = conv1_kernel
    if widths is not None:
        try:
            channels = [int(w) for w in widths.split(",")]
        except ValueError:
            channels = []
        if len(channels) != 4 or min(channels) <= 0:
            raise UserError(f"--widths wants four positive channel counts like 64,128,256,512, got {widths!r}")
        config["widths"] = channels
    return config


def trunk_checkpoint(trunk: Trunk, meta: dict | None = None) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": trunk.arch,
        "arch_config": dict(trunk.config),
        "state_dict": {k: v.detach().cpu() for k, v in trunk.state_dict().items()},
        "meta": dict(meta or {}),
    }


def save_trunk(path: str | Path, trunk: Trunk, meta: dict | None = None) -> None:
    from monossl.runs import save_torch

    save_torch(path, trunk_checkpoint(trunk, meta))


def load_trunk(path: str | Path, expect_arch: str | None = None) -> tuple[Trunk, dict]:
    """Load a trunk checkpoint (a file, or a run directory holding trunk.pt); returns (trunk, meta)."""
    from monossl.runs import load_torch

    path = Path(path)
    if path.is_dir():
        path = path / "trunk.pt"
    if not path.exists():
        raise UserError(f"no trunk checkpoint at {path} (did the pretraining finish?)")
    ckpt = load_torch(path, "trunk checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a monossl trunk checkpoint (format {CHECKPOINT_FORMAT})")
    arch, config = ckpt.get("arch"), ckpt.get("arch_config")
    if arch not in ARCHS or not isinstance(config, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path} is not a valid trunk checkpoint: it needs arch (one of {', '.join(ARCHS)}), "
                        f"an arch_config dict and a state_dict")
    if expect_arch is not None and arch != expect_arch:
        raise UserError(f"{path} holds a {arch} trunk, but --arch {expect_arch} was asked for")
    try:
        trunk = build_trunk(arch, **config)
    except (TypeError, ValueError, RuntimeError) as exc:  # a key or value the architecture does not take
        raise UserError(f"{path}: its arch_config does not build a {arch} trunk ({first_line(exc)})") from None
    try:
        trunk.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit a {arch} trunk: {first_line(exc)}") from None
    return trunk, ckpt.get("meta", {})
