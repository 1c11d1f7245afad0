"""`tokenjournal serve`: the reference server until Ctrl-C (its options belong to the server)."""

from __future__ import annotations

import argparse
import sys
from typing import Final

from .._terminal import printable
from ..server import add_serve_arguments, config_from_args, run
from ..server._serve import DatabaseUnusable
from ._args import EXIT_USAGE, PROG, Formatter, Subparsers

DESCRIPTION: Final = """\
Run the reference grace-window auth server until Ctrl-C. It speaks the Mana protocol
(/auth/signin, /auth/refresh, /auth/logout, /auth/validate) and OAuth 2.0 (/oauth/token),
and serves a protected GET /api/me. A rotated refresh token stays usable for the grace
window (default 300 s) and, replayed inside it, returns the same pair again.

--test-mode adds the demo account (demo@example.com / demo, OAuth client
tokenjournal-demo) and the /_test/* routes: POST /_test/clock {"advance": seconds},
POST /_test/faults, GET /_test/stats. Test mode binds to loopback addresses only."""

EPILOG: Final = """\
examples:
  tokenjournal serve --test-mode
  tokenjournal serve --test-mode --port 0 --access-ttl 60 --grace 30
  tokenjournal serve --db server.db --user alice@example.com:s3cret --client myapp:secret

then, in another terminal:
  tokenjournal conformance http://127.0.0.1:8787 --test-clock"""


def register(sub: Subparsers) -> None:
    """Add ``serve`` and its options to the command line."""
    parser = sub.add_parser(
        "serve",
        help="run the reference grace-window auth server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=command)


def command(ns: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM/SIGHUP: 0, 2 for a bad setting, 1 if it cannot open its
    database or listen. A failure is one line on stderr, as every command reports one."""
    try:
        config = config_from_args(ns)
        run(config, ns.host, ns.port)
    except (ValueError, TypeError) as exc:
        print(f"{PROG} serve: {printable(exc, limit=4096)}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseUnusable as exc:  # --db: a folder, not SQLite, a client journal, ...
        print(f"{PROG} serve: {printable(exc, limit=4096)}", file=sys.stderr)
        return 1
    except OSError as exc:  # the port is taken, the address is not ours, ...
        where = printable(f"{ns.host}:{ns.port}", limit=4096)
        print(f"{PROG} serve: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
