"""`monossl export RUN --format torchvision|timm`: a run's ResNet-18 trunk as weights for the library's
resnet18, with MODEL_CARD.md and export.json (monossl.eval.model_card)."""

from __future__ import annotations

import argparse

from monossl.eval.model_card import export
from monossl.models.export import FORMATS, loading_snippet


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory holding trunk.pt (resnet18 or resnet18-cifar)")
    parser.add_argument("--format", required=True, metavar="FORMAT",
                        help=f"the library to load into: {' or '.join(FORMATS)}")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/export-FORMAT)")


def run(args: argparse.Namespace) -> int:
    result = export(args.run, args.format, args.out)
    print(f"exported {result.facts['arch']} ({result.facts['method'] or 'unrecorded method'}) for "
          f"{args.format} -> {result.out}: weights.pth, MODEL_CARD.md, export.json")
    print("load it with:\n")
    print(loading_snippet(result.facts["arch"], args.format, str(result.weights)), end="")
    return 0
