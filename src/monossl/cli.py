"""`monossl <command>`: the command-line face of the library.

Each command lives in the module that does its job; that module exposes
`configure(parser)` (adds its options) and `run(args)` (does the work). This file
only wires them together and turns `UserError` into a one-line message with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from monossl import __version__
from monossl.errors import UserError

# command name -> (module, one-line help). Modules are imported lazily so that
# `monossl images` does not pay for importing every method.
COMMANDS = {
    "images": ("monossl.data.sources", "list the built-in images"),
    "generate": ("monossl.data.generate", "write patches of one image to disk (PNG/JPEG/npy)"),
    "pretrain": ("monossl.pretrain", "pretrain a trunk with a self-supervised or supervised method"),
    "probe": ("monossl.eval.probes", "train linear probes on every conv tap of a frozen trunk"),
    "finetune": ("monossl.eval.finetune", "fine-tune a trunk with some layers frozen (PAPER.md section 4), then probe"),
    "compare": ("monossl.experiments.compare", "the main job: random vs one-image RotNet vs supervised"),
    "reproduce": ("monossl.experiments.reproduce",
                  "the paper's tables in one command (cifar10-augmentations, imagenet-finetune)"),
    "filters": ("monossl.viz.filters", "draw the conv1 filters of runs side by side (BatchNorm folded in)"),
    "stylize": ("monossl.viz.style", "Gatys style transfer with a trunk, or several side by side (--compare)"),
    "report": ("monossl.viz.report", "one Markdown + self-contained HTML page of results tables and figures"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors are user errors too: one line, exit 2
        raise UserError(message)


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(prog="monossl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"monossl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in commands.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command asked for (fast start, and a broken
    # optional dependency of one command does not break the others).
    commands = COMMANDS
    if argv and argv[0] in COMMANDS:
        commands = {argv[0]: COMMANDS[argv[0]]}
    try:
        args = build_parser(commands).parse_args(argv)
        result = args._run(args)
        return int(result or 0)
    except UserError as exc:
        print(f"monossl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monossl: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")  # not imported: nothing to leave (and no torch start-up)
        if dist is not None and dist.is_available() and dist.is_initialized():  # under torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
