"""`monossl <command>`: the command-line face of the library.

Every command is one small module of this package (`monossl.cli.<command>`) with
`configure(parser)` (adds its options) and `run(args)` (parses what argparse cannot, calls
the library's typed entry point, prints). All argparse code lives in this package. This file
wires the commands together, turns `UserError` into a one-line message with exit code 2, and shows
the library's log (`logging`, logger "monossl") as plain lines: info on stdout, where the library
printed before, warnings and errors on stderr; `-q` keeps warnings and errors only, `-v` adds debug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import shlex
import sys

from monossl import __version__
from monossl.errors import UserError

# command name -> one-line help; the command's module is monossl.cli.<name>, imported lazily so
# that `monossl images` does not pay for importing every method.
COMMANDS = {
    "images": "list the built-in images",
    "generate": "write patches of one image to disk (PNG/JPEG/npy)",
    "pretrain": "pretrain a trunk with a self-supervised or supervised method",
    "probe": "train linear probes on every conv tap of a frozen trunk",
    "finetune": "fine-tune a trunk with some layers frozen (PAPER.md section 4), then probe",
    "distill": "distil a teacher classifier into a fresh student through patches of one image",
    "compare": "the main job: random, statistics controls, one image, full data, supervised, layer by layer",
    "reproduce": "the paper's tables in one command (cifar10-augmentations, imagenet-finetune)",
    "filters": "draw the conv1 filters of runs side by side (BatchNorm folded in)",
    "stylize": "Gatys style transfer with a trunk, or several side by side (--compare)",
    "report": "one Markdown + self-contained HTML page of results tables and figures",
    "export": "write a ResNet-18 run's weights for torchvision or timm, with a model card",
    "tables": "redraw the README's tables from the committed results they name (--check: compare only)",
}


def positive(kind: type[int] | type[float] = int):
    """The argparse type of every count, size and rate option: a number > 0 (finite), else a
    one-line error. Zero is refused, never read as "the default"."""
    noun = "integer" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


class _TerminalHandler(logging.Handler):
    """Log records as plain lines: below WARNING on stdout, WARNING and above on stderr ("WARNING: ..."),
    through tqdm.write so that a progress bar on the terminal is not torn. The stream is looked up at
    each record, so a redirected sys.stdout (pytest's capsys) gets the lines."""

    def __init__(self):
        super().__init__()
        self.plain = logging.Formatter("%(message)s")
        self.labelled = logging.Formatter("%(levelname)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            warning = record.levelno >= logging.WARNING
            stream = sys.stderr if warning else sys.stdout
            tqdm.write((self.labelled if warning else self.plain).format(record), file=stream)
            stream.flush()
        except Exception:  # logging's rule: a broken stream must not break the program
            self.handleError(record)


def _show_log(level: int):
    """Show the library's log at `level` until the returned function is called (main() may run many times
    in one Python process: each call leaves the logger as it found it)."""
    logger = logging.getLogger("monossl")
    handler, before = _TerminalHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def restore():
        logger.removeHandler(handler)
        logger.setLevel(before)

    return restore


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are user errors too: one line, exit 2
        raise UserError(message)


def build_parser(commands: dict[str, str] = COMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(prog="monossl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"monossl {__version__}")
    # dest names of their own: several commands have a --quiet of their own (no progress bars)
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="log_quiet", action="store_true",
                          help="show warnings and errors only (given before the command)")
    loudness.add_argument("-v", "--verbose", dest="log_verbose", action="store_true",
                          help="show debug messages too (given before the command)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in commands.items():
        module = importlib.import_module(f"monossl.cli.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command asked for (fast start, and a broken
    # optional dependency of one command does not break the others).
    commands = COMMANDS
    named = next((a for a in argv if not a.startswith("-")), None)  # the global flags take no values
    if named in COMMANDS:
        commands = {named: COMMANDS[named]}
    args, restore_log = None, None
    try:
        args = build_parser(commands).parse_args(argv)
        restore_log = _show_log(logging.WARNING if args.log_quiet else logging.DEBUG if args.log_verbose
                                else logging.INFO)
        result = args._run(args)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            # every rank has finished (rank 0 writes last) before any tears the group down: a rank
            # leaving while its peer still holds the connection made gloo abort under load
            dist.barrier()
        return int(result or 0)
    except UserError as exc:
        # raised in a DataLoader worker, it comes back with the worker's traceback as its message
        # (torch's ExceptionWrapper): the user's line is the last one
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        print(f"monossl: error: {message.removeprefix(f'{UserError.__module__}.UserError: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        command = ["monossl", *argv]
        if getattr(args, "resume", None) is False:  # this command refuses to continue a run without --resume
            command.append("--resume")
        print(f"monossl: interrupted; to resume, run: {shlex.join(command)}", file=sys.stderr)
        return 130
    finally:
        if restore_log is not None:
            restore_log()
        runs = sys.modules.get("monossl.runs")  # not imported: no run directory was claimed
        if runs is not None:
            runs.unlock_run_dirs()  # a Python session that ran a command must not keep its runs locked
        dist = sys.modules.get("torch.distributed")  # not imported: nothing to leave (and no torch start-up)
        if dist is not None and dist.is_available() and dist.is_initialized():  # under torchrun
            dist.destroy_process_group()


