"""A plain ``requests`` script that stays signed in across runs: no asyncio anywhere.

What it shows:
- ``tokenjournal.sync.TokenManager``: the SDK's journal and single refresh behind blocking
  calls. The first run signs in; every later run resumes the session from the journal (no
  password needed, no new sign-in at the server) until the server ends it.
- ``RequestsAuth`` on a ``requests.Session``: the bearer on the auth server's origin only, a
  stale token refreshed before the request, a 401 refreshed and replayed once.
- No token is ever printed: fingerprints only.

Run it:
    python samples/cli_requests.py                  # self-started reference server, demo account
    python samples/cli_requests.py                  # again: "session resumed", no sign-in
    TJ_EMAIL=me@example.com TJ_PASSWORD=... python samples/cli_requests.py --auth-url https://auth.example
    python samples/cli_requests.py --smoke          # runs, expiry and a 401; exit 0 if it behaved
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from contextlib import redirect_stdout
from typing import Final

import requests
from _common import (
    SMOKE_RETRY,
    Backend,
    add_common_arguments,
    backend_in_thread,
    check,
    run_blocking,
    setup_logging,
)

import tokenjournal as tj
import tokenjournal.sync as tjs
from tokenjournal.adapters import RequestsAuth

log = logging.getLogger("cli_requests")

#: A person is waiting at a terminal: seconds before a blocking call gives up.
CALL_TIMEOUT: Final = 30.0
EXIT_SIGN_IN: Final = 3


def one_run(be: Backend, args: argparse.Namespace) -> int:
    """What one invocation of the script does: sign in if needed, then call the API."""
    with tjs.TokenManager(
        be.url,
        be.journal,
        account=args.account,
        clock=be.clock(),
        retry=SMOKE_RETRY if args.smoke else None,
        user_agent="tokenjournal-cli-requests-sample",
    ) as tm:
        if tm.state is tj.SessionState.VALID:
            print(f"session resumed from {be.journal.name} (token {fingerprint(tm)})")
        elif not sign_in(tm, be):
            return EXIT_SIGN_IN
        with requests.Session() as session:
            session.auth = RequestsAuth(tm, timeout=CALL_TIMEOUT)
            try:
                response = session.get(f"{be.url}/api/me", timeout=CALL_TIMEOUT)
            except tj.SessionEnded as exc:
                # The server ended the session (revoked, or unused for too long): the
                # journal says so to every later run too, until someone signs in again.
                print(f"the server ended the session ({exc.code})")
                if not sign_in(tm, be):
                    return EXIT_SIGN_IN
                response = session.get(f"{be.url}/api/me", timeout=CALL_TIMEOUT)
        if response.status_code != 200:
            print(f"GET /api/me: {response.status_code}")
            return 1
        print(f"GET /api/me: 200, you are {response.json()['email']} (token {fingerprint(tm)})")
        return 0


def sign_in(tm: tjs.TokenManager, be: Backend) -> bool:
    """Sign in with the configured credentials; whether it worked."""
    if not be.email or not be.password:
        print("not signed in: set TJ_EMAIL and TJ_PASSWORD", file=sys.stderr)
        return False
    try:
        tm.sign_in(email=be.email, password=be.password, timeout=CALL_TIMEOUT)
    except tj.SignInFailed as exc:
        print(f"sign-in refused ({exc.code})", file=sys.stderr)
        return False
    print(f"signed in as {be.email} (token {fingerprint(tm)})")
    return True


def fingerprint(tm: tjs.TokenManager) -> str:
    """The access token's fingerprint (8 hex digits of its SHA-256), never the token."""
    return tj.fingerprint(tm.tokens.access_token) if tm.tokens else "-"


def run_captured(be: Backend, args: argparse.Namespace) -> tuple[int, str]:
    """One run, its output echoed and returned."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = one_run(be, args)
    print(out.getvalue(), end="", flush=True)
    return code, out.getvalue()


def smoke(be: Backend, args: argparse.Namespace) -> int:
    """Runs on one journal: sign in, resume, refresh on expiry, session end, sign in again."""
    server = be.reference()
    code, out = run_captured(be, args)
    check(code == 0 and "signed in as" in out, "the first run signs in")
    code, out = run_captured(be, args)
    check(
        code == 0 and "session resumed" in out and server.stats()["signins"] == 1,
        "the second run resumes the session from the journal, no new sign-in",
    )
    server.state.clock.advance(server.config.access_ttl + 1)
    code, out = run_captured(be, args)
    stats = server.stats()
    check(
        code == 0 and "session resumed" in out and stats["rotations"] == 1,
        "after expiry the next run refreshes once and gets its 200",
    )
    check(stats["api_200"] == 3 and stats["api_401"] == 0, "every call carried a valid token")
    server.state.clock.advance(server.config.refresh_ttl + 1)
    code, out = run_captured(be, args)
    check(
        code == 0 and "the server ended the session (token_expired)" in out and "signed in" in out,
        "a session the server ended is signed into again, and the call made",
    )
    print(
        "SMOKE OK: sign-in, resumed run, refresh on expiry, session end, sign-in again", flush=True
    )
    return 0


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    with backend_in_thread(args, "cli_requests") as be:
        if args.smoke:
            return smoke(be, args)
        return one_run(be, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    add_common_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    run_blocking(lambda: main(arguments))
