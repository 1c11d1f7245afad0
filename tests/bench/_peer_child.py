"""One side of the SIGKILL experiment of `tests/bench/peers.py`, run as a subprocess.

    python tests/bench/_peer_child.py CLIENT PHASE URL STATE_DIR

CLIENT is `tokenjournal`, `authlib` (tokens in memory, as Authlib keeps them) or
`authlib-file` (Authlib plus an `update_token` callback that saves the token as JSON, what a
careful user adds). PHASE `a` signs in, prints `signed-in`, then refreshes: the parent kills
it with SIGKILL once the server has rotated the token and before the answer arrives. PHASE
`b` is the next start of the app: it prints one JSON line saying whether it got a working
session back without the password.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

CLIENT_ID = "tokenjournal-demo"
USER = {"username": "demo@example.com", "password": "demo"}


def say(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------- tokenjournal


async def tokenjournal_side(phase: str, url: str, state: Path) -> dict[str, Any]:
    import tokenjournal as tj

    protocol = tj.OAuth2Protocol(url + "/oauth/token", client_id=CLIENT_ID, client_auth="none")
    async with tj.TokenManager(url, journal=state / "tokens.db", protocol=protocol) as tm:
        if phase == "a":
            await tm.sign_in(**USER)
            say("signed-in")
            await tm.refresh()  # the server rotates, then holds the answer: we die here
            return {"error": "not killed"}
        # Phase b: open() found the journaled intent and replays it; join that refresh.
        try:
            await tm.refresh()
            async with tm.client_session() as http, http.get(url + "/api/me") as resp:
                status = resp.status
            await tm.refresh()  # the chain goes on: the next rotation works too
        except tj.TokenJournalError as exc:
            return {"resumed": False, "needs_password": True, "error": exc.code}
        return {"resumed": status == 200, "needs_password": False, "api_status": status}


# ------------------------------------------------------------------------- Authlib


def _authlib() -> Any:
    with warnings.catch_warnings():
        # Authlib 1.6+ prefers httpx2 and warns when it falls back to httpx.
        import authlib.deprecate  # noqa: F401  (it installs an "always" filter on import)

        warnings.simplefilter("ignore")
        from authlib.integrations.httpx_client import AsyncOAuth2Client

    return AsyncOAuth2Client


async def authlib_side(phase: str, url: str, state: Path, *, saves: bool) -> dict[str, Any]:
    from authlib.integrations.base_client import MissingTokenError

    token_url = url + "/oauth/token"
    path = state / "token.json"

    async def save(token: dict[str, Any], **_: Any) -> None:
        path.write_text(json.dumps(dict(token)))

    token = json.loads(path.read_text()) if saves and path.exists() else None
    client = _authlib()(
        client_id=CLIENT_ID,
        token_endpoint_auth_method="none",
        token_endpoint=token_url,
        token=token,
        update_token=save if saves else None,
        timeout=30.0,
    )
    async with client:
        if phase == "a":
            await client.fetch_token(token_url, **USER)
            # The token has aged to its expiry (on disk too, when the app saves it).
            client.token["expires_at"] = int(time.time()) - 1
            if saves:
                await save(client.token)
            say("signed-in")
            await client.get(url + "/api/me")  # auto-refresh; we die inside it
            return {"error": "not killed"}
        try:
            resp = await client.get(url + "/api/me")  # refreshes first if expired
            await client.refresh_token(token_url)  # the chain goes on
        except MissingTokenError:
            return {"resumed": False, "needs_password": True, "error": "no token (nothing kept)"}
        except Exception as exc:  # an OAuthError from the server, as Authlib raises it
            return {"resumed": False, "needs_password": True, "error": type(exc).__name__}
        return {
            "resumed": resp.status_code == 200,
            "needs_password": False,
            "api_status": resp.status_code,
        }


def main(argv: list[str]) -> int:
    client, phase, url, state = argv
    folder = Path(state)
    if client == "tokenjournal":
        outcome = asyncio.run(tokenjournal_side(phase, url, folder))
    else:
        outcome = asyncio.run(authlib_side(phase, url, folder, saves=client == "authlib-file"))
    say(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
