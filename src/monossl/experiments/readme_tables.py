"""Tables of Markdown files (the README's) generated from committed results files (`monossl tables`).

A generated table sits between two comments: the first names its results file (relative to the
repository root) and which part of it to draw, the second ends it:

    <!-- table: results/compare/results.json splits -->
    | split | conv1 | ... |
    <!-- end table -->

`update(text, root)` redraws every such block from its file; `monossl tables README.md` writes the
result, `--check` only lists the blocks that differ (exit 1). A test runs the check on the README, so a
number typed by hand into a generated table, or a results file changed without its table, fails it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from monossl import runs
from monossl.errors import UserError
from monossl.experiments.compare_output import (
    curves_markdown,
    seed_table_markdown,
    splits_markdown,
    splits_per_seed_markdown,
    table_markdown,
)
from monossl.experiments.sources_output import markdown as sources_markdown
from monossl.experiments.sources_output import winners_markdown

BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) (?P<part>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)

#: (results "kind", part) -> the function that draws it from the results file's dict
RENDERERS: dict[tuple[str, str], Callable[[dict], str]] = {
    ("compare-seeds", "table"): lambda r: seed_table_markdown(r, caption=False),
    ("compare-seeds", "splits"): splits_markdown,
    ("compare-seeds", "per-seed"): splits_per_seed_markdown,
    ("compare", "table"): table_markdown,
    ("compare", "curves"): curves_markdown,
    ("sources", "table"): sources_markdown,
    ("sources", "winners"): winners_markdown,
    ("sources", "student-winners"): lambda r: winners_markdown(r, "student"),
}


def render(results: dict, part: str, where: str = "results") -> str:
    kind = results.get("kind") if isinstance(results, dict) else None
    draw = RENDERERS.get((kind, part)) if isinstance(kind, str) else None
    if draw is None:
        parts = ", ".join(f"{k}/{p}" for k, p in RENDERERS)
        raise UserError(f"{where}: no table {part!r} for results of kind {kind!r} (known: {parts})")
    return draw(results)


def update(text: str, root: Path) -> tuple[str, list[str]]:
    """`text` with every generated block redrawn from its results file under `root`; and the blocks
    ("path part") whose text changed."""
    changed = []

    def redraw(match: re.Match) -> str:
        path, part = match["path"], match["part"]
        results = runs.read_json(root / path, "results file")
        body = render(results, part, path)
        if body != match["body"]:
            changed.append(f"{path} {part}")
        return match.group(1) + body + match.group(5)

    return BLOCK.sub(redraw, text), changed


def update_file(path: Path, root: Path | None = None, check: bool = False) -> tuple[list[str], int]:
    """Redraw the generated tables of one Markdown file (root: the folder results paths are relative
    to; default: the current folder, i.e. run from the repository root). Returns (blocks that
    differed, blocks in all); writes unless `check`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such Markdown file")
    text = path.read_text()
    new, changed = update(text, Path(root) if root else Path.cwd())
    if changed and not check:
        runs.write_text(path, new)
    return changed, len(BLOCK.findall(text))
