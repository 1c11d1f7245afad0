"""The `tokenjournal` command (also `python -m tokenjournal`).

One module per subcommand, each adding itself and its options with ``register(sub)`` and
naming its ``handler``: ``demo`` (start here), ``serve`` (the reference server), ``status``
(read a journal), ``reseal`` (seal a journal under one key), ``conformance`` (probe any auth
server), ``bench`` (when built in). Each one has its own ``--help`` with examples. Nothing
any of them prints contains a token.

Nothing here is imported by the library: ``import tokenjournal`` never loads the command.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import Final

from .. import __version__
from ._args import EXIT_USAGE, PROG, Formatter, Handler, Subparsers
from ._signals import stop_signals_interrupt

MAIN_DESCRIPTION: Final = """\
Keep a device signed in: tokens in a crash-safe SQLite journal, one shared refresh per
account, and recovery through the server's grace window after a crash.

New here? Run `tokenjournal demo`: it starts a local test server and shows, in about ten
seconds, what the SDK does when tokens expire, clients crash and the network flakes."""

MAIN_EPILOG: Final = """\
examples:
  tokenjournal demo                                   see it work (about 10 s, local only)
  tokenjournal serve --test-mode                      a local auth server to code against
  tokenjournal conformance http://127.0.0.1:8787 --test-clock
                                                      check a server's rotation rules
  tokenjournal status --journal ~/.local/state/myapp/tokens.db
                                                      what a journal holds, read-only
  tokenjournal reseal --journal tokens.db --key-file new.key --previous-key-file old.key
                                                      seal every row under the new key

Run `tokenjournal COMMAND --help` for the options of one command."""

#: Ctrl-C's exit status (128 + SIGINT), what every command returns when interrupted.
EXIT_INTERRUPTED: Final = 128 + signal.SIGINT

#: In the order ``--help`` lists them. Imported when the parser is built, not with this
#: package, so that ``python -m tokenjournal.cli._demo_client`` starts without them.
COMMANDS: Final = ("demo", "serve", "status", "reseal", "conformance", "bench")


def _not_built_in(sub: Subparsers, name: str) -> None:
    """A slot for a subcommand this build ships without: any arguments, one line, status 2."""

    def handler(ns: argparse.Namespace) -> int:
        print(f"{name} is not available in this build", file=sys.stderr)
        return EXIT_USAGE

    parser = sub.add_parser(name, help="(not in this build)", add_help=False)
    parser.set_defaults(handler=handler, any_arguments=True)


def _parse(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Import every subcommand (the server and the demo take a while) and parse."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=MAIN_DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:  # each subcommand registers itself and its options
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # a build without it (the bench is the optional one)
            _not_built_in(sub, name)
        else:
            module.register(sub)
    ns, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if rest and not getattr(ns, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return parser, ns


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (130 when Ctrl-C stops it)."""
    try:
        parser, ns = _parse(argv)
        handler: Handler | None = getattr(ns, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        # SIGTERM (timeout, CI, systemd) and SIGHUP clean up exactly like Ctrl-C.
        with stop_signals_interrupt() as received:
            try:
                return handler(ns)
            except KeyboardInterrupt:
                return received.exit_status
    except KeyboardInterrupt:  # while the commands load (the slow part of a start): quiet
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
