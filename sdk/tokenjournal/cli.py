"""The `tokenjournal` command (also `python -m tokenjournal`).

Subcommands: ``demo`` (start here), ``serve`` (the reference server), ``status`` (read a
journal), ``conformance`` (probe any auth server), ``bench`` (when built in). Each one has
its own ``--help`` with examples. Nothing any of them prints contains a token.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final

from . import __version__
from ._signals import stop_signals_interrupt

PROG: Final = "tokenjournal"
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace], int]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps our hand-wrapped descriptions and examples; room for the longest command name."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


_FORMATTER: Final = _Formatter

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

Run `tokenjournal COMMAND --help` for the options of one command."""

DEMO_DESCRIPTION: Final = """\
Start the reference server in test mode on a free 127.0.0.1 port and show, as a timeline
with timings, four things the SDK promises:

  a. 1,000 concurrent requests cross an access-token expiry: exactly one refresh serves them
  b. a client process SIGKILLed after the server rotated its token (before the answer came)
     restarts on the same journal and recovers through the grace window, no new sign-in
  c. the same crash, restarted after the grace window closed: a clear SessionEnded
     ("token_expired"), the one case no client can save
  d. a flaky network (two 503s, then an answer lost after the server committed) costs no
     session

It ends with a table of the server's counters and a verdict per step. Journals live in a
temporary folder that is removed at the end. Exit status 0 only if every step behaved."""

DEMO_EPILOG: Final = """\
examples:
  tokenjournal demo                 the timeline and the summary
  tokenjournal demo --quiet         the summary only
  tokenjournal demo --json | jq .steps[].ok
                                    a machine-readable report (progress goes to stderr)"""

SERVE_DESCRIPTION: Final = """\
Run the reference grace-window auth server until Ctrl-C. It speaks the Mana protocol
(/auth/signin, /auth/refresh, /auth/logout, /auth/validate) and OAuth 2.0 (/oauth/token),
and serves a protected GET /api/me. A rotated refresh token stays usable for the grace
window (default 300 s) and, replayed inside it, returns the same pair again.

--test-mode adds the demo account (demo@example.com / demo, OAuth client
tokenjournal-demo) and the /_test/* routes: POST /_test/clock {"advance": seconds},
POST /_test/faults, GET /_test/stats. Test mode binds to loopback addresses only."""

SERVE_EPILOG: Final = """\
examples:
  tokenjournal serve --test-mode
  tokenjournal serve --test-mode --port 0 --access-ttl 60 --grace 30
  tokenjournal serve --db server.db --user alice@example.com:s3cret --client myapp:secret

then, in another terminal:
  tokenjournal conformance http://127.0.0.1:8787 --test-clock"""

STATUS_DESCRIPTION: Final = """\
Show what a journal holds, per account: signed in / ended by the server (with the code and
the time) / signed out, the access token's expiry, a pending refresh intent (its kind, start,
age and the refresh token's fingerprint), the refresh lease holder, the generation and the
device id. Tokens are never shown, only 8-character fingerprints.

The journal is opened read-only and never modified. A missing, locked, corrupt or
newer-schema journal prints one line to stderr and exits with status 1."""

STATUS_EPILOG: Final = """\
examples:
  tokenjournal status --journal ~/.local/state/myapp/tokens.db
  tokenjournal status --journal tokens.db --json"""

CONFORMANCE_DESCRIPTION: Final = """\
Probe an auth server for the behaviours the SDK relies on and print a pass/fail table:

  required     sign-in works; a refresh rotates the refresh token; the old token
               replayed inside the grace window returns a usable pair; N concurrent
               refreshes of one token all succeed or answer rotation_in_progress and
               never end the session; a token two generations old is rejected; with
               --test-clock, reuse after the window is rejected with token_expired
               (Mana) or invalid_grant (OAuth 2.0)
  informative  the grace-replay style (same pair / new pair / none); whether a reuse
               revokes the whole token family

Each probe signs in afresh. The defaults fit the reference server's demo account. With
--test-clock the server's clock is moved forward (POST /_test/clock), so use it only on a
test server. Exit status 0 only if every required check passes."""

CONFORMANCE_EPILOG: Final = """\
examples:
  tokenjournal conformance http://127.0.0.1:8787 --test-clock
  tokenjournal conformance http://127.0.0.1:8787 --protocol oauth2 --test-clock
  tokenjournal conformance https://auth.example.com --email me@example.com \\
      --password-env MY_PASSWORD
  tokenjournal conformance https://idp.example.com --protocol oauth2 \\
      --token-url https://idp.example.com/realms/x/protocol/openid-connect/token \\
      --client-id myapp --client-secret-env MY_SECRET --username me --password-env MY_PASSWORD"""


# --------------------------------------------------------------------------- handlers


def _serve(ns: argparse.Namespace) -> int:
    from .server import config_from_args, run

    try:
        config = config_from_args(ns)
        run(config, ns.host, ns.port)
    except (ValueError, TypeError) as exc:
        print(f"{PROG} serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print(
            f"{PROG} serve: cannot listen on {ns.host}:{ns.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _status(ns: argparse.Namespace) -> int:
    from ._status import run_status

    return run_status(ns.journal, json_output=ns.json, wait=ns.wait)


def _secret(value: str | None, env_name: str | None, flag: str) -> str | None:
    if env_name is None:
        return value
    if env_name not in os.environ:
        raise ValueError(f"{flag}: the environment variable {env_name} is not set")
    return os.environ[env_name]


def _conformance(ns: argparse.Namespace) -> int:
    from ._conformance import ConformanceOptions
    from ._conformance import main as conformance_main

    if ns.protocol == "mana" and (
        ns.client_id or ns.client_secret or ns.client_secret_env or ns.token_url
    ):
        print(
            f"{PROG} conformance: --client-id, --client-secret and --token-url need "
            f"--protocol oauth2",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        password = _secret(ns.password, ns.password_env, "--password-env")
        secret = _secret(ns.client_secret, ns.client_secret_env, "--client-secret-env")
        options = ConformanceOptions(
            url=ns.url,
            protocol=ns.protocol,
            username=ns.username,
            password=password if password is not None else "demo",
            client_id=ns.client_id or "tokenjournal-demo",
            client_secret=secret,
            token_url=ns.token_url,
            test_clock=ns.test_clock,
            grace=ns.grace,
            concurrency=ns.concurrency,
            timeout=ns.timeout,
        )
    except ValueError as exc:
        print(f"{PROG} conformance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return conformance_main(options, json_output=ns.json)


def _demo(ns: argparse.Namespace) -> int:
    from ._demo import main as demo_main

    return demo_main(json_output=ns.json, quiet=ns.quiet, requests=ns.requests, keep=ns.keep)


def _bench(ns: argparse.Namespace, rest: Sequence[str]) -> int:
    # Imported here, and guarded: the CLI works in builds that ship without the benchmark.
    try:
        bench = importlib.import_module(f"{__package__}._bench")
    except ImportError:
        print("bench is not available in this build", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog=f"{PROG} bench",
        description="Measure refresh and journal costs.",
        formatter_class=_FORMATTER,
    )
    bench.add_bench_arguments(parser)
    return int(bench.run_bench(parser.parse_args(list(rest))))


# --------------------------------------------------------------------------- parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (the `bench` options come from its own module, lazily)."""
    from .server import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=MAIN_DESCRIPTION,
        epilog=MAIN_EPILOG,
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    demo = sub.add_parser(
        "demo",
        help="watch the SDK survive expiry storms, crashes and a flaky network (start here)",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=_FORMATTER,
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable report on stdout (progress on stderr)",
    )
    demo.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no timeline, only the summary (or only the JSON report)",
    )
    demo.add_argument(
        "--requests",
        type=_at_least(200),
        default=1000,
        metavar="N",
        help="concurrent requests in step a (default 1000, at least 200)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary journal folder (its path is printed)",
    )
    demo.set_defaults(handler=_demo)

    serve = sub.add_parser(
        "serve",
        help="run the reference grace-window auth server",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=_FORMATTER,
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)

    status = sub.add_parser(
        "status",
        help="show what a journal holds (read-only; fingerprints, never tokens)",
        description=STATUS_DESCRIPTION,
        epilog=STATUS_EPILOG,
        formatter_class=_FORMATTER,
    )
    status.add_argument(
        "--journal", required=True, metavar="PATH", help="the journal file (~ is expanded)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--wait",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="how long to wait for a journal another process has locked (default 2)",
    )
    status.set_defaults(handler=_status)

    conf = sub.add_parser(
        "conformance",
        help="check that an auth server keeps the promises the SDK relies on",
        description=CONFORMANCE_DESCRIPTION,
        epilog=CONFORMANCE_EPILOG,
        formatter_class=_FORMATTER,
    )
    conf.add_argument(
        "url", metavar="URL", help="the server's base URL, e.g. http://127.0.0.1:8787"
    )
    conf.add_argument(
        "--protocol",
        choices=("mana", "oauth2"),
        default="mana",
        help="wire protocol (default mana)",
    )
    who = conf.add_argument_group("credentials (defaults: the reference server's demo account)")
    who.add_argument(
        "--email",
        "--username",
        dest="username",
        default="demo@example.com",
        metavar="NAME",
        help="Mana email or OAuth username (default demo@example.com)",
    )
    who.add_argument(
        "--password", default=None, help="password (default demo; prefer --password-env)"
    )
    who.add_argument(
        "--password-env", metavar="VAR", help="read the password from this environment variable"
    )
    who.add_argument(
        "--client-id",
        metavar="ID",
        help="OAuth client id (default tokenjournal-demo, a public client)",
    )
    who.add_argument(
        "--client-secret",
        metavar="S",
        help="OAuth client secret, sent with HTTP Basic (prefer --client-secret-env)",
    )
    who.add_argument(
        "--client-secret-env",
        metavar="VAR",
        help="read the client secret from this environment variable",
    )
    conf.add_argument(
        "--token-url", metavar="URL", help="OAuth token endpoint (default URL/oauth/token)"
    )
    conf.add_argument(
        "--test-clock",
        action="store_true",
        help="the server has POST /_test/clock: also check reuse after the "
        "window (moves the server's clock!)",
    )
    conf.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="the server's grace window, for --test-clock (default: from "
        "grace_expires_at, else 300)",
    )
    conf.add_argument(
        "--concurrency",
        type=_at_least(2),
        default=10,
        metavar="N",
        help="refreshes sent at once in the concurrency check (default 10)",
    )
    conf.add_argument(
        "--timeout",
        type=_positive,
        default=15.0,
        metavar="SECONDS",
        help="per request (default 15)",
    )
    conf.add_argument("--json", action="store_true", help="machine-readable output")
    conf.set_defaults(handler=_conformance)

    # Its options belong to its own module, parsed in _bench from what is left over.
    bench = sub.add_parser("bench", help="measure refresh and journal costs", add_help=False)
    bench.set_defaults(handler=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if ns.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler: Handler | None = getattr(ns, "handler", None)
    if handler is None and ns.command != "bench":
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # SIGTERM (timeout, CI, systemd) and SIGHUP clean up exactly like Ctrl-C.
    with stop_signals_interrupt() as received:
        try:
            if ns.command == "bench":
                return _bench(ns, rest)
            assert handler is not None
            return handler(ns)
        except KeyboardInterrupt:
            return received.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
