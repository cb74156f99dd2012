"""The ``skr`` command line: ``serve · local · release · report · policy · keys · audit · doctor · token ·
wrap · keyprovider · image-key · encfs``.

Every command answers bad input with one clear line on stderr and a non-zero exit code, never a
traceback. Exit codes: 0 success, 1 a negative verdict (invalid, denied, tampered), 2 unusable input or
an error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from skr import __version__
from skr.errors import SkrError

# Each module registers one command group; see skr/commands/.
COMMAND_MODULES: tuple[str, ...] = (
    "serve",
    "local",
    "release",
    "doctor",
    "report",
    "policy",
    "keys",
    "audit",
    "token",
    "wrap",
    "keyprovider",
    "image-key",
    "encfs",
)

# Commands that hold keys or tokens in memory: no core dumps, not dumpable (skr.process.harden).
HARDENED_COMMANDS: frozenset[str] = frozenset(
    {"serve", "local", "release", "keys", "doctor", "keyprovider", "image-key", "token", "encfs"}
)

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line and exits 2 on bad usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command`` (each command module is imported to
    register itself, and some import heavy libraries: ``skr serve`` need not pay for ``skr keys``)."""
    parser = _Parser(prog="skr", description="Secure Key Release sidecar for Azure confidential containers.")
    parser.add_argument("--version", action="version", version=f"skr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for name in COMMAND_MODULES:
        if command is None or name == command:
            importlib.import_module(f"skr.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(argv) if argv is not None else sys.argv[1:]
    # only the named command's parser; without a known command first, the whole parser
    parser = build_parser(arguments[0] if arguments and arguments[0] in COMMAND_MODULES else None)
    args = parser.parse_args(arguments)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.command in HARDENED_COMMANDS:
        from skr.process import harden

        harden()
    try:
        return func(args)
    except SkrError as exc:
        print(f"skr: {exc.diagnostics()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("skr: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"skr: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
