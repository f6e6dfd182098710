"""The ``dpokit`` command line: ``dpokit train | sft | online | eval | score | generate | demo | frontier | winrate
| judge-check | label | serve | experiment``.

Each subcommand is one :class:`~dpokit.commands.common.Subcommand` in :data:`SUBCOMMANDS`, defined
in its own module (:mod:`~dpokit.commands.train`, :mod:`~dpokit.commands.eval`, ...) with its help
text, a function that adds its arguments and a function that runs it. Command modules only parse:
they turn arguments into the library's typed jobs (``EvalJob``, ``ScoreJob``, ``GenerateJob``,
``FrontierJob``, ...), whose fields hold every default, and print what the library returns. Heavy
imports (torch, transformers) happen inside those functions, which keeps ``dpokit --help`` instant.

Errors a user can fix (:class:`dpokit.errors.DpokitError`) are printed as ``error: <message>`` with
exit code 2 and no traceback; any other exception is printed the same way, as one line with its type,
message and the file and line it was raised at. Set ``DPOKIT_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence

from dpokit import __version__
from dpokit.commands.common import Subcommand
from dpokit.commands.eval import COMMAND as EVAL
from dpokit.commands.experiment import DEMO, EXPERIMENT
from dpokit.commands.frontier import COMMAND as FRONTIER
from dpokit.commands.generate import COMMAND as GENERATE
from dpokit.commands.label import COMMAND as LABEL
from dpokit.commands.online import COMMAND as ONLINE
from dpokit.commands.score import COMMAND as SCORE
from dpokit.commands.serve import COMMAND as SERVE
from dpokit.commands.train import SFT, TRAIN
from dpokit.commands.winrate import JUDGE_CHECK, WINRATE
from dpokit.errors import DpokitError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


SUBCOMMANDS: list[Subcommand] = [
    TRAIN,
    SFT,
    ONLINE,
    EVAL,
    SCORE,
    GENERATE,
    DEMO,
    FRONTIER,
    WINRATE,
    JUDGE_CHECK,
    LABEL,
    SERVE,
    EXPERIMENT,
]

_MAIN_EPILOG = """\
quick start:
  dpokit demo                                    # DPO on a tiny self-built model: reward and KL before/after
  dpokit train examples/full.yaml                # DPO on your data (edit the paths first)
  dpokit eval --model outputs/full --reference MODEL --data test.jsonl
  dpokit score --model outputs/full --reference MODEL --prompt "..." --response "..." --response "..."

Run `dpokit <command> --help` for a command's arguments and examples."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``dpokit`` argument parser: one sub-parser per :data:`SUBCOMMANDS` entry.

    ``only``: add the arguments of that command alone (the others keep their one-line help for
    ``dpokit --help``), so running one command never imports what another needs. None adds all.
    """
    parser = argparse.ArgumentParser(
        prog="dpokit",
        description="Direct Preference Optimization (and relatives) for causal language models.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in SUBCOMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=textwrap.fill(command.description, width=100),
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if only is None or only == command.name:
            command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dpokit`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {command.name for command in SUBCOMMANDS}
    parser = build_parser(only=next((token for token in argv if token in names), ""))
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        status: int = args._run(args)
        return status
    except DpokitError as error:
        if os.environ.get("DPOKIT_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # The trainer saves its own interrupt checkpoint; here we only avoid a traceback.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug or an unforeseen input: still one line, with where it was raised
        if os.environ.get("DPOKIT_DEBUG"):
            raise
        print(f"error: {unexpected_error_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR


def unexpected_error_line(error: BaseException) -> str:
    """One line for an exception that is not a :class:`DpokitError`: the path of an ``OSError`` (or the
    exception's type and message), the file and line (of dpokit's innermost frame, else the innermost
    one) where it was raised, and what to do next -- check the path or inputs, rerun with
    ``DPOKIT_DEBUG=1`` for the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if f"{os.sep}dpokit{os.sep}" in frame.filename]
    frame = (ours or frames)[-1] if frames else None
    where = f" at {frame.filename}:{frame.lineno}, in {frame.name}" if frame is not None else ""
    if isinstance(error, OSError) and error.filename is not None:  # a path dpokit could not read or write
        return (
            f"{error.filename}: {error.strerror or type(error).__name__} ({type(error).__name__}{where}); check that path "
            "(or the option or config key that gives it), or rerun with DPOKIT_DEBUG=1 to see the traceback"
        )
    message = " ".join(str(error).split()) or "no message"
    if len(message) > 300:
        message = message[:300] + "..."
    raised = f" (raised{where})" if where else ""
    return (
        f"{type(error).__name__}: {message}{raised}. This is not an error dpokit knows how to explain: check the files "
        "and settings named above, rerun with DPOKIT_DEBUG=1 to see the traceback, and report it if the inputs look right"
    )


if __name__ == "__main__":
    raise SystemExit(main())
