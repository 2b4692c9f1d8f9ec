"""`monossl report RUN_OR_TABLE ... --out DIR`: one Markdown + self-contained HTML page of results
tables and figures (monossl.viz.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from monossl.cli import positive
from monossl.errors import UserError
from monossl.viz.report import build_report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_TABLE",
                        help="results.json files, run directories, compare/probe output directories")
    parser.add_argument("--out", required=True, help="output directory (report.md, report.html, PNGs)")
    parser.add_argument("--title", default="monossl report", help="page title")
    parser.add_argument("--patches", type=int, default=64, help="patches in the contact sheet (default 64; 0: none)")
    parser.add_argument("--scale", type=positive(), default=4, help="enlargement of conv1 filter pixels (default 4)")


def run(args: argparse.Namespace) -> int:
    if args.patches < 0:
        raise UserError(f"--patches must be >= 0, got {args.patches}")
    result = build_report(args.inputs, args.out, args.title, args.patches, args.scale)
    print(f"wrote {Path(args.out) / 'report.md'} and report.html ({len(result['tables'])} table(s), "
          f"figures: {', '.join(result['figures']) or 'none'})")
    return 0
