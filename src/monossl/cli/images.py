"""`monossl images`: list the built-in images (`data.sources.builtin_table`) as a text table."""

from __future__ import annotations

import argparse

from monossl.data.sources import builtin_table


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", action="store_true",
        help="also load every image (verifies the bundled files are present and readable)",
    )


def run(args: argparse.Namespace) -> int:
    rows = [[row["name"] + ("*" if row["default"] else ""), f"{row['width']}x{row['height']}",
             row["licence"], row["description"]] for row in builtin_table(check=args.check)]
    header = ["name", "size", "licence", "description"]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    print("  ".join(header[i].ljust(widths[i]) for i in range(3)) + "  " + header[3])
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    print("* default image (busy, colourful, public domain); use any other file with --image PATH")
    return 0
