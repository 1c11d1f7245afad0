"""Desktop app for OAuth servers: a Tk window that signs in through the system browser.

What it shows:
- Start from an issuer URL only: ``OAuth2Protocol.discover`` reads the server's endpoints
  and keeps its document in the journal, so the app still starts when the network is down.
- The way desktop apps sign in on real servers: ``sign_in_browser`` opens the system
  browser at the server's login page (authorization code with PKCE) and catches the answer
  on a one-shot listener on 127.0.0.1. No password ever passes through the app.
- The session state shown live (valid / refreshing / offline / ended) with the access
  token's fingerprint, the user's email read from the ID token, and sign-out (the server is
  told through its revocation endpoint).
- A controller with no Tk in it and a thin Tk view over it, as in ``desktop_tk.py``.

Run it:
    python samples/desktop_oauth.py                 # self-started reference server
    python samples/desktop_oauth.py --auth-url https://sso.example.com/realms/acme \\
        --client-id desktop-app                     # any OpenID Connect server
    python samples/desktop_oauth.py --smoke --headless  # the scenario, controller only
    python samples/desktop_oauth.py --smoke         # the same, driving the real window

``--smoke`` plays the person at the browser with a scripted one (aiohttp reads the
reference server's login form and submits it), so it needs no browser and no display
(``--headless``) or only a display.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import html
import json
import logging
import re
import sys
import webbrowser
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from _common import (
    DEMO_EMAIL,
    SMOKE_RETRY,
    Backend,
    add_common_arguments,
    backend,
    check,
    run,
    setup_logging,
)

import tokenjournal as tj

if TYPE_CHECKING:  # imported lazily below: a Python without Tk can still run --headless
    import tkinter as tk

log = logging.getLogger("desktop_oauth")

UI_TICK: Final = 1 / 60
EXIT_NO_DISPLAY: Final = 2
#: A person is waiting: give up on an unreachable server after ~10 s, not the default minute.
INTERACTIVE_RETRY: Final = tj.RetryPolicy(max_attempts=3, max_elapsed=10.0, max_delay=4.0)
#: How long the person has to finish in the browser.
BROWSER_WAIT: Final = 300.0
SMOKE_WAIT: Final = 30.0
LIVE: Final = frozenset(
    {tj.SessionState.VALID, tj.SessionState.REFRESHING, tj.SessionState.OFFLINE}
)

OpenBrowser = Callable[[str], object]


def id_token_email(tokens: tj.TokenSet | None) -> str | None:
    """The ``email`` (else ``sub``) claim of the ID token, for display only: the SDK got the
    token from the server it trusts and does not verify it again."""
    token = tokens.id_token if tokens is not None else None
    if token is None or token.count(".") != 2:
        return None
    segment = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return None
    who = claims.get("email") or claims.get("sub") if isinstance(claims, dict) else None
    return who if isinstance(who, str) else None


# ---------------------------------------------------------------------------- controller


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the window shows."""

    state: tj.SessionState
    fingerprint: str = "-"
    who: str | None = None
    message: str = "Sign in with your browser to start."
    busy: bool = False

    @property
    def signed_in(self) -> bool:
        """Whether there is a session to use."""
        return self.state in LIVE

    @property
    def state_text(self) -> str:
        """The status bar: ``Session: valid · demo@example.com · token 0a620f0d``."""
        text = f"Session: {self.state.value.replace('_', ' ')}"
        if self.signed_in:
            if self.who:
                text += f" · {self.who}"
            text += f" · token {self.fingerprint}"
        return text


class OAuthController:
    """Browser sign-in, sign-out and the session, with no Tk in it."""

    def __init__(self, tm: tj.TokenManager, open_browser: OpenBrowser) -> None:
        self.tm = tm
        self.open_browser = open_browser
        fp = tj.fingerprint(tm.tokens.access_token) if tm.tokens else "-"
        self.snapshot = Snapshot(tm.state, fp, id_token_email(tm.tokens))
        if self.snapshot.signed_in:
            self.snapshot = replace(self.snapshot, message="Welcome back: session resumed.")
        self._watchers: list[Callable[[Snapshot], None]] = []
        tm.subscribe(self._on_event)

    def watch(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` now and on every change."""
        self._watchers.append(callback)
        callback(self.snapshot)

    def _set(self, **changes: Any) -> None:
        self.snapshot = replace(self.snapshot, **changes)
        for callback in self._watchers:
            callback(self.snapshot)

    def _on_event(self, event: tj.TokenEvent) -> None:
        changes: dict[str, Any] = {
            "state": event.state,
            "fingerprint": event.fingerprint,
            "who": id_token_email(self.tm.tokens),
        }
        if event.kind is tj.EventKind.ENDED:
            changes["message"] = f"Your session has ended ({event.code}). Please sign in again."
        self._set(**changes)

    async def sign_in(self) -> None:
        """Open the browser at the server's login page and wait for it to come back."""
        self._set(busy=True, message="Continue in your browser…")
        try:
            await self.tm.sign_in_browser(open_browser=self.open_browser, timeout=BROWSER_WAIT)
        except tj.SignInFailed as exc:
            reason = exc.description or exc.code
            self._set(message=f"Sign-in did not complete ({exc.code}): {reason}.")
        except tj.TransientError:
            self._set(message="The server cannot be reached. Try again in a moment.")
        else:
            self._set(message=f"Signed in as {id_token_email(self.tm.tokens) or 'you'}.")
        finally:
            self._set(busy=False)

    async def sign_out(self) -> None:
        """Sign out: the server revokes the session; locally it always works."""
        self._set(busy=True)
        try:
            await self.tm.sign_out()
        finally:
            self._set(busy=False, message="Signed out.")


# ---------------------------------------------------------------------------- Tk view


class TkView:
    """The window: a sign-in button, a sign-out button, the session and a message."""

    def __init__(self, root: tk.Tk, controller: OAuthController) -> None:
        import tkinter as tk
        from tkinter import ttk

        self.root = root
        self.controller = controller
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        root.title("tokenjournal OAuth desktop sample")
        root.protocol("WM_DELETE_WINDOW", self.closed.set)
        frame = ttk.Frame(root, padding=12)
        frame.grid(sticky="nsew")
        self.state_text = tk.StringVar()
        self.message = tk.StringVar()
        self.sign_in_button = ttk.Button(
            frame, text="Sign in with your browser", command=self.on_sign_in
        )
        self.sign_in_button.grid(row=0, column=0, sticky="w")
        self.sign_out_button = ttk.Button(frame, text="Sign out", command=self.on_sign_out)
        self.sign_out_button.grid(row=0, column=1, padx=6, sticky="w")
        ttk.Label(frame, textvariable=self.state_text, font=("TkDefaultFont", 10, "bold")).grid(
            row=1, column=0, columnspan=2, sticky="w", pady=(8, 0)
        )
        ttk.Label(frame, textvariable=self.message, wraplength=380).grid(
            row=2, column=0, columnspan=2, sticky="w", pady=(4, 0)
        )
        controller.watch(self.render)

    def render(self, snap: Snapshot) -> None:
        """Show a snapshot: texts, and which button makes sense now."""
        self.state_text.set(snap.state_text)
        self.message.set(snap.message)
        self.sign_in_button.configure(state="disabled" if snap.busy or snap.signed_in else "normal")
        self.sign_out_button.configure(
            state="disabled" if snap.busy or not snap.signed_in else "normal"
        )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the asyncio loop; keep a reference so it is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.last_task = task

    def on_sign_in(self) -> None:
        """The sign-in button."""
        self.spawn(self.controller.sign_in())

    def on_sign_out(self) -> None:
        """The sign-out button."""
        self.spawn(self.controller.sign_out())

    async def pump(self) -> None:
        """Tk's event loop, driven from asyncio."""
        while not self.closed.is_set():
            self.root.update()
            await asyncio.sleep(UI_TICK)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def open_window() -> tk.Tk | None:
    """A Tk root window, or ``None`` (with the reason on stderr) when there is no display."""
    try:
        import tkinter as tk
    except ImportError as exc:
        print(f"this Python has no Tk ({exc}); try `--smoke --headless`", file=sys.stderr)
        return None
    try:
        return tk.Tk()
    except tk.TclError as exc:
        print(
            f"cannot open a window ({exc}): run it on a desktop or under `xvfb-run`, "
            "or try `--smoke --headless`",
            file=sys.stderr,
        )
        return None


# ---------------------------------------------------------------------------- smoke

_HIDDEN: Final = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


class ScriptedPerson:
    """Plays the person at the browser for ``--smoke``: opens the login page with aiohttp,
    types the password, clicks Allow (or Deny), and follows the redirect back to the app."""

    def __init__(self, email: str, password: str) -> None:
        self.email = email
        self.password = password
        self.allow = True
        self.pages = 0

    async def __call__(self, url: str) -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as page:
                text = await page.text()
            self.pages += 1
            form = {name: html.unescape(value) for name, value in _HIDDEN.findall(text)}
            form.update(
                email=self.email, password=self.password, action="allow" if self.allow else "deny"
            )
            action = urlunsplit(urlsplit(url)._replace(query=""))
            async with http.post(action, data=form) as done:  # follows to 127.0.0.1
                await done.read()
        return True


class HeadlessDriver:
    """Calls the controller directly."""

    def __init__(self, controller: OAuthController) -> None:
        self.c = controller

    async def sign_in(self) -> None:
        await self.c.sign_in()

    async def sign_out(self) -> None:
        await self.c.sign_out()

    def state_text(self) -> str:
        return self.c.snapshot.state_text

    def message(self) -> str:
        return self.c.snapshot.message


class TkDriver:
    """Clicks the buttons and reads the labels of the real window."""

    def __init__(self, view: TkView) -> None:
        self.view = view

    async def _after(self, click: Callable[[], object]) -> None:
        click()
        task = self.view.last_task
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), SMOKE_WAIT)
        await asyncio.sleep(UI_TICK * 2)  # let the pump draw it

    async def sign_in(self) -> None:
        await self._after(self.view.sign_in_button.invoke)

    async def sign_out(self) -> None:
        await self._after(self.view.sign_out_button.invoke)

    def state_text(self) -> str:
        return self.view.state_text.get()

    def message(self) -> str:
        return self.view.message.get()


async def smoke(
    driver: HeadlessDriver | TkDriver, person: ScriptedPerson, be: Backend, tm: tj.TokenManager
) -> int:
    """Denied, signed in through the browser, refreshed on expiry, signed out."""
    server = be.reference()
    check("signed out" in driver.state_text(), f"starts signed out ({driver.state_text()!r})")
    person.allow = False
    await driver.sign_in()
    check(
        "access_denied" in driver.message() and "signed out" in driver.state_text(),
        f"a denial in the browser is explained ({driver.message()!r})",
    )
    person.allow = True
    await driver.sign_in()
    first = driver.state_text()
    check(
        "valid" in first and be.email in first and person.pages == 2,
        f"signed in through the browser, the email read from the ID token ({first!r})",
    )
    await server.advance(server.config.access_ttl + 1)
    await tm.access_token()
    second = driver.state_text()
    check(
        "valid" in second and second != first and tm.refresh_requests == 1,
        f"the expired token was refreshed once ({second!r})",
    )
    await driver.sign_out()
    check(
        "signed out" in driver.state_text() and server.stats()["logouts"] == 1,
        "signed out, and the server revoked the session",
    )
    print("SMOKE OK: discovery, browser sign-in (denied, allowed), refresh, sign-out", flush=True)
    return 0


# ---------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    async with backend(args, "desktop_oauth") as be:
        # The issuer is all the app is told; the journal keeps the document for offline starts.
        protocol = await tj.OAuth2Protocol.discover(
            be.url, client_id=args.client_id, scope=args.scope, journal=be.journal
        )
        person = ScriptedPerson(be.email or DEMO_EMAIL, be.password)
        opener: OpenBrowser = person if args.smoke else webbrowser.open
        async with tj.TokenManager(
            protocol.token_url,
            be.journal,
            account=args.account,
            protocol=protocol,
            clock=be.clock(),
            retry=SMOKE_RETRY if args.smoke else INTERACTIVE_RETRY,
        ) as tm:
            controller = OAuthController(tm, opener)
            if args.headless:
                print("smoke: headless (controller only)", flush=True)
                return await smoke(HeadlessDriver(controller), person, be, tm)
            root = open_window()
            if root is None:
                return EXIT_NO_DISPLAY
            view = TkView(root, controller)
            pump = asyncio.ensure_future(view.pump())
            try:
                if args.smoke:
                    print("smoke: driving the Tk window", flush=True)
                    return await smoke(TkDriver(view), person, be, tm)
                await pump
                return 0
            finally:
                view.closed.set()
                await pump
                root.destroy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument(
        "--client-id", default="tokenjournal-demo", help="the app's OAuth client id"
    )
    parser.add_argument(
        "--scope", default="openid email offline_access", help="the scope to ask for"
    )
    parser.add_argument(
        "--headless",
        action="store_true",
        help="with --smoke: run the scenario on the controller, without a window",
    )
    args = parser.parse_args(argv)
    if args.headless and not args.smoke:
        parser.error("--headless only goes with --smoke")
    return args


if __name__ == "__main__":
    run(main(parse_args()))
