"""What a probe run returns and writes: the `ProbeResult` dict (results.json) and results.md.

`ProbeResult` is a `TypedDict`: the result stays a plain dict, exactly what results.json holds,
so every reader (reports, tables, resumed runs) keeps working; the types document its fields.
(No `from __future__ import annotations` here: `NotRequired` must be seen at runtime.)
"""

from pathlib import Path
from typing import NotRequired, TypedDict

from monossl.runs import ensure_writable_dir, markdown_table, write_json, write_text


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


