"""`export(run, fmt)`: a run's ResNet-18 trunk as weights for torchvision or timm, with a model card.

Writes OUT (default RUN/export-<fmt>/):

    weights.pth     a plain state dict of tensors (torch.load(..., weights_only=True)) that loads
                    strictly into the library's resnet18, adapted as MODEL_CARD.md says
    MODEL_CARD.md   what made the trunk (method, images or dataset, preset, steps, seed), the probe
                    results found in RUN/probe-*/results.json, and the lines that load the weights
    export.json     the same facts, machine-readable

Every check runs before anything is written; the three files are written into a temporary folder
beside OUT and then renamed into it, so a failed export leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from monossl import __version__, runs
from monossl.errors import UserError
from monossl.eval.results import ProbeResult
from monossl.models import load_trunk
from monossl.models.export import check_exportable, check_format, export_state_dict, library_version, loading_snippet
from monossl.models.trunks import MEAN, STD

EXPORT_FORMAT = "monossl.export/1"
FILES = ("weights.pth", "export.json", "MODEL_CARD.md")
STEMS = {"resnet18-cifar": "CIFAR stem: 3x3 stride-1 conv1, no max-pool; 32-px input",
         "resnet18": "torchvision's ImageNet stem: 7x7 stride-2 conv1 and max-pool; 224-px input"}


@dataclass
class Exported:
    out: Path
    weights: Path
    facts: dict  # what export.json holds


def export(run: str | Path, fmt: str, out: str | Path | None = None) -> Exported:
    """Export RUN's trunk.pt for `fmt` (torchvision or timm) into `out` (default RUN/export-<fmt>)."""
    run = Path(run)
    check_format(fmt)
    if not run.is_dir():
        raise UserError(f"no run directory at {run}" if not run.exists() else f"{run} is not a run directory")
    if not (run / "trunk.pt").exists():
        raise UserError(f"{run} holds no trunk.pt (did the pretraining finish?)")
    trunk, meta = load_trunk(run / "trunk.pt")
    check_exportable(trunk, str(run / "trunk.pt"))
    weights = export_state_dict(trunk, fmt)  # needs timm for timm: checked before anything is written
    config = runs.read_json(run / "config.json", "run configuration") if (run / "config.json").exists() else {}
    facts = _facts(run, fmt, trunk.arch, meta, config, _probes(run))
    out = Path(out) if out is not None else run / f"export-{fmt}"
    _write(out, weights, facts)
    return Exported(out=out, weights=out / "weights.pth", facts=facts)


def _probes(run: Path) -> list[dict]:
    """The probe results in RUN/probe-*/results.json: protocol, data, linear top-1 and k-NN per tap."""
    found = []
    for path in sorted(run.glob("probe-*/results.json")):
        result: ProbeResult = runs.read_json(path, "probe result")
        try:
            found.append({
                "path": str(path.relative_to(run)), "protocol": result["protocol"]["name"],
                "dataset": result.get("dataset"), "n_train": result.get("n_train"), "n_test": result.get("n_test"),
                "seed": result.get("seed"),
                "linear_top1": {tap: float(v["top1"]) for tap, v in result["taps"].items()},
                "knn_top1": {tap: {k: float(a) for k, a in ks.items()} for tap, ks in result.get("knn", {}).items()},
            })
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{path} is not a probe result (no protocol name or per-tap top1)") from None
    return found


def _facts(run: Path, fmt: str, arch: str, meta: dict, config: dict, probes: list[dict]) -> dict:
    def fact(key: str, *alternatives: str):
        for source, name in [(config, key), (meta, key), *((config, a) for a in alternatives),
                             *((meta, a) for a in alternatives)]:
            if source.get(name) is not None:
                return source[name]
        return None

    patch = config.get("patch_config") or {}
    images = fact("image")
    images = [images] if isinstance(images, str) else images
    return {
        "format": EXPORT_FORMAT, "library": fmt, "library_version": library_version(fmt), "model": "resnet18",
        "arch": arch, "stem": STEMS[arch], "weights": "weights.pth",
        "input": {"size": 32 if arch == "resnet18-cifar" else 224, "range": "RGB in [0, 1], then normalised",
                  "mean": list(MEAN), "std": list(STD)},
        "run": str(run), "method": fact("method"), "images": images, "dataset": fact("data"),
        "labelled": (config.get("source") or {}).get("labelled"), "preset": fact("preset"),
        "patch_size": patch.get("size"), "steps": fact("total_steps", "steps"), "batch_size": fact("batch_size"),
        "seed": fact("seed"), "method_config": config.get("method_config"), "whiten_conv1": config.get("whiten_conv1"),
        "probes": probes, "loading": loading_snippet(arch, fmt), "monossl": __version__,
    }


def _training_lines(f: dict) -> list[str]:
    if f["images"]:
        images = ", ".join(f["images"])
        size = f" ({f['patch_size']}-px patches)" if f["patch_size"] else ""
        data = f"patches of {images}, augmentation preset `{f['preset'] or 'not recorded'}`{size}"
    elif f["dataset"]:
        data = f"{f['dataset']} images" + {True: " with their labels", False: " without labels"}.get(f["labelled"], "")
    else:
        data = "not recorded"
    settings = ", ".join(f"{k} {v}" for k, v in (f["method_config"] or {}).items() if v is not None)
    batch = f" of batch {f['batch_size']}" if f["batch_size"] else ""
    lines = [f"- method: {f['method'] or 'not recorded'}" + (f" ({settings})" if settings else ""),
             f"- data: {data}",
             f"- steps: {f['steps'] if f['steps'] is not None else 'not recorded'}{batch}, seed "
             f"{f['seed'] if f['seed'] is not None else 'not recorded'}",
             f"- trunk: `{f['arch']}` ({f['stem']})"]
    if f["whiten_conv1"]:
        lines.append("- conv1 trained in whitened coordinates, folded into a plain conv before saving")
    return lines + [f"- run: `{f['run']}`"]


def _probe_lines(probes: list[dict]) -> list[str]:
    if not probes:
        return ["No probe results in the run (`monossl probe RUN` writes them)."]
    lines = []
    for p in probes:
        ks = list(dict.fromkeys(k for v in p["knn_top1"].values() for k in v))  # "k20", "k200", as probed
        header = ["tap", "linear top-1"] + [f"k-NN {k} top-1" for k in ks]
        rows = [[tap, top1, *(p["knn_top1"].get(tap, {}).get(k) for k in ks)] for tap, top1 in p["linear_top1"].items()]
        lines += [f"Protocol `{p['protocol']}` on {p['dataset'] or 'an unrecorded dataset'} ({p['n_train']} train / "
                  f"{p['n_test']} test images, seed {p['seed']}; `{p['path']}`), top-1 (%) at the final epoch"
                  + ("; k-NN: cosine, temperature-weighted votes" if ks else "") + ":", "",
                  runs.markdown_table(header, rows).rstrip("\n"), ""]
    return lines[:-1]


def model_card(f: dict) -> str:
    """MODEL_CARD.md from the facts of export.json."""
    library = "timm.create_model('resnet18')" if f["library"] == "timm" else "torchvision.models.resnet18"
    title = f["method"] or "monossl"
    what = (f"one image ({f['images'][0]})" if f["images"] and len(f["images"]) == 1
            else f"{len(f['images'])} images" if f["images"] else f["dataset"] or "unrecorded data")
    return "\n".join([
        f"# ResNet-18 ({f['arch']}): {title} on {what}",
        "",
        f"A `{f['arch']}` trunk pretrained by monossl {f['monossl']}, exported for `{library}` "
        f"({f['library']} {f['library_version']}) as `weights.pth` (a plain state dict). No classifier: the model "
        "gives the 512-d global average of layer4.",
        "",
        "## How it was trained",
        "",
        *_training_lines(f),
        "",
        "## Probe results",
        "",
        *_probe_lines(f["probes"]),
        "",
        "## Loading",
        "",
        "```python",
        f["loading"].rstrip("\n"),
        "```",
        "",
    ])


def _write(out: Path, weights: dict, facts: dict) -> None:
    """The three files into a temporary folder beside `out`, then renamed into `out`."""
    runs.ensure_writable_dir(out.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        runs.save_torch(stage / "weights.pth", weights)
        facts["sha256"] = hashlib.sha256((stage / "weights.pth").read_bytes()).hexdigest()
        runs.write_json(stage / "export.json", facts)
        runs.write_text(stage / "MODEL_CARD.md", model_card(facts))
        runs.ensure_writable_dir(out)
        for name in FILES:
            os.replace(stage / name, out / name)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(stage)
