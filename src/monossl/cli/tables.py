"""`monossl tables`: redraw the generated tables of Markdown files from their committed results
(monossl.experiments.readme_tables)."""

from __future__ import annotations

import argparse

from monossl.experiments.readme_tables import update_file


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", default=["README.md"], metavar="FILE",
                   help="Markdown files whose generated tables to redraw (default README.md)")
    p.add_argument("--root", default=None,
                   help="folder the results paths are relative to (default: the current folder)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table differs from its results")


def run(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        changed, total = update_file(name, args.root, check=args.check)
        for block in changed:
            print(f"{name}: {'differs from' if args.check else 'redrawn from'} {block}")
        if args.check and changed:
            status = 1
        print(f"{name}: {total} generated table(s), {len(changed)} {'differ' if args.check else 'redrawn'}")
    return status
