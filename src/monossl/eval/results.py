"""What a probe run returns and writes: the `ProbeResult` dict (results.json), results.md, and the
folder it goes in (`probe_dir_name`), which a rerun with other settings may not write over
(`check_probe_dir`).

`ProbeResult` is a `TypedDict`: the result stays a plain dict, exactly what results.json holds,
so every reader (reports, tables, resumed runs) keeps working; the types document its fields.
(No `from __future__ import annotations` here: `NotRequired` must be seen at runtime.)
"""

import re
from pathlib import Path
from typing import NotRequired, TypedDict

from monossl.data.datasets import parse_spec
from monossl.runs import check_settings, ensure_writable_dir, markdown_table, write_json, write_text

# The data each protocol is made for (a --data spec's kind). Its results keep the plain
# probe-<protocol> folder, so runs, tables and committed results made before the folder named its
# data still read the same. The 224-px protocols are for ImageNet, which is always given as an
# ImageFolder tree; two trees are then told apart by check_probe_dir, not by the folder name.
PROTOCOL_DATA = {"cifar": "cifar10", "resnet-cifar": "cifar10", "asano-max": "folder", "zhang-avg": "folder",
                 "rotnet-adaptive": "folder", "resnet-avg": "folder"}


class TapResult(TypedDict):
    """One tap's probe: its map, what the probe saw, and its accuracy (%)."""

    shape: list[int]  # (C, H, W) of the tap's map
    pooled_shape: list[int]  # (C, h, w) after the protocol's pooling
    pooled_size: int  # values per image fed to the probe
    top1: float  # final epoch
    top5: float  # final epoch
    best_top1: float  # best over the evaluated epochs (optimistic; reported as extra)
    best_epoch: int  # the first epoch reaching best_top1


class EpochRecord(TypedDict):
    """One epoch of probe training."""

    epoch: int
    lr: float
    loss: dict[str, float]  # tap -> mean training cross-entropy
    top1: NotRequired[dict[str, float]]  # tap -> test top-1 (%), on evaluated epochs only
    top5: NotRequired[dict[str, float]]


class TrunkInfo(TypedDict):
    arch: str
    config: dict  # the trunk's build_trunk options
    meta: dict  # where it came from (method, seed, source run, ...)


class Timings(TypedDict):
    extract_s: float  # features (cached path), or the BatchNorm statistics pass (streamed path)
    train_s: float  # probe training, evaluation included
    eval_s: float
    total_s: float


class ProbeResult(TypedDict):
    """results.json of a probe run."""

    protocol: dict  # ProbeProtocol.to_dict()
    seed: int
    dataset: str | None
    n_train: int
    n_test: int
    num_classes: int
    trunk: TrunkInfo
    taps: dict[str, TapResult]
    cached_features: bool
    matmul_dtype: str  # "float32" or "bfloat16"
    device: str
    timings: Timings
    history: list[EpochRecord]
    environment: dict  # runs.environment()
    # with probe(..., knn=(20, 200)): {tap: {"k20": top-1 %, "k200": ...}} (eval/knn.py), its seconds
    knn: NotRequired[dict[str, dict[str, float]]]
    knn_dims: NotRequired[dict[str, int]]  # the feature size k-NN saw per tap (smaller with knn_values)
    knn_s: NotRequired[float]
    # added by the table runners to a row's results.json
    row_seconds: NotRequired[float]
    row_seconds_note: NotRequired[str]
    seen: NotRequired[dict | None]  # table.samples_seen: how much data the row's trunk saw


def results_markdown(result: ProbeResult) -> str:
    """results.md: one line naming the protocol, trunk, data and seed, then a table of the taps."""
    p = result["protocol"]
    tr = result["trunk"]
    source = tr["meta"].get("method") or tr["meta"].get("source") or ""
    header = ["tap", "pooled size", "top-1 (final)", "top-5 (final)", "best top-1 (extra)", "best epoch"]
    rows = [[k, v["pooled_size"], float(v["top1"]), float(v["top5"]), float(v["best_top1"]), v["best_epoch"]]
            for k, v in result["taps"].items()]
    ms = ",".join(map(str, p["milestones"])) or "none"
    lines = [
        f"Linear probes, protocol `{p['name']}` ({p['epochs']} epochs, lr {p['lr']:g} x{p['gamma']:g} after {ms}, "
        f"wd {p['weight_decay']:g}, batch {p['batch_size']}, train aug {p['train_aug']}, "
        f"test crops {p['test_crops']}); "
        f"trunk {tr['arch']}{' (' + source + ')' if source else ''}; data {result['dataset']} "
        f"({result['n_train']} train / {result['n_test']} test); seed {result['seed']}. "
        f"Top-1/top-5 at the final epoch; best top-1 over epochs is extra (optimistic).",
        "",
    ]
    text = "\n".join(lines) + markdown_table(header, rows)
    if result.get("knn"):
        ks = list(next(iter(result["knn"].values())))
        dims = result.get("knn_dims", {})
        text += ("\nWeighted k-NN on the pooled features (cosine, T = 0.07), top-1 (%):\n\n"
                 + markdown_table(["tap", "size", *ks], [[tap, dims.get(tap, ""), *map(float, v.values())]
                                                        for tap, v in result["knn"].items()]))
    return text


def write_results(out_dir: str | Path, result: ProbeResult) -> None:
    """OUT_DIR/results.json and results.md, each written atomically."""
    out = ensure_writable_dir(out_dir)
    write_json(out / "results.json", result)
    write_text(out / "results.md", results_markdown(result))




def data_name(data: str) -> str:
    """A short, filesystem-safe name of a --data spec: its kind (cifar100, stl10, ...), or for
    folder:PATH the folder's own name."""
    kind, path = parse_spec(data)
    # resolved: folder:. is named too (a folder always has its path)
    name = path.resolve().name if kind == "folder" and path is not None else kind
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or kind


def probe_dir_name(protocol: str, data: str) -> str:
    """The folder of a probe in a run directory: probe-<protocol> on the protocol's own data,
    probe-<protocol>-<data name> on any other, so probes of one run on two datasets both stay."""
    if parse_spec(data)[0] == PROTOCOL_DATA.get(protocol):
        return f"probe-{protocol}"
    return f"probe-{protocol}-{data_name(data)}"


def probe_settings(protocol: dict, dataset: str, seed: int, n_train: int, n_test: int, arch: str,
                   trunk_config: dict) -> dict:
    """What defines a probe result, under results.json's own keys (so an existing results.json is
    compared as it is): the protocol (epochs, lr, ... included), the data, its subset sizes, the seed,
    and the trunk's architecture and build options (not its meta: a source path spelled another
    way is the same trunk)."""
    return {"protocol": protocol, "dataset": dataset, "seed": seed, "n_train": n_train, "n_test": n_test,
            "trunk": {"arch": arch, "config": trunk_config}}


def check_probe_dir(out_dir: str | Path, settings: dict, overwrite: bool = False) -> None:
    """Refuse (one-line UserError naming the folder and the differing settings) to write a probe
    result over one made with other settings, unless `overwrite`; the same settings pass (a rerun
    replaces its own result, as it always has)."""
    if overwrite:
        return
    check_settings(Path(out_dir) / "results.json", settings,
                   f"{out_dir} holds a probe result made with other settings ({{changed}}); "
                   "give --overwrite to replace it, or another --out", what="probe result")
