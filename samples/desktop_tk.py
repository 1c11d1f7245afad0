"""Desktop app: a Tkinter window that signs in, shows the session live, and calls an API.

What it shows:
- asyncio and Tk in one thread with no blocking call in the UI: asyncio owns the loop and a
  task pumps Tk's events (``root.update()``) every few milliseconds, so a slow network never
  freezes the window and button handlers can start coroutines.
- A controller with no Tk in it (sign in, call ``GET /api/me``, sign out, follow the session
  through ``tm.subscribe``) and a thin Tk view over it: the same controller runs headless.
- The session state shown live (valid / refreshing / offline / ended) with the access
  token's fingerprint, never the token.
- A clear message when the server ends the session, and the sign-in form back.

Run it:
    python samples/desktop_tk.py                   # self-started reference server, demo account
    python samples/desktop_tk.py --auth-url https://auth.example --email me@example.com
    python samples/desktop_tk.py --smoke           # drives the real window (needs a display)
    python samples/desktop_tk.py --smoke --headless  # the same scenario, controller only
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
from _common import (
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

log = logging.getLogger("desktop_tk")

#: How often Tk's events are pumped (about 60 frames a second).
UI_TICK: Final = 1 / 60
EXIT_NO_DISPLAY: Final = 2
#: A person is waiting: give up on an unreachable server after ~10 s, not the default minute.
INTERACTIVE_RETRY: Final = tj.RetryPolicy(max_attempts=3, max_elapsed=10.0, max_delay=4.0)
#: How long one smoke step may take before it counts as hung (not a performance bound).
SMOKE_WAIT: Final = 15.0
#: States with a session to use.
LIVE: Final = frozenset(
    {tj.SessionState.VALID, tj.SessionState.REFRESHING, tj.SessionState.OFFLINE}
)


# ---------------------------------------------------------------------------- controller


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the window shows."""

    state: tj.SessionState
    fingerprint: str = "-"
    ended_code: str | None = None
    message: str = "Sign in to start."
    busy: bool = False

    @property
    def signed_in(self) -> bool:
        """Whether there is a session to use (the sign-in form is hidden then)."""
        return self.state in LIVE

    @property
    def state_text(self) -> str:
        """The status bar: ``Session: valid · token 0a620f0d``."""
        text = f"Session: {self.state.value.replace('_', ' ')}"
        if self.ended_code:
            text += f" ({self.ended_code})"
        if self.signed_in:
            text += f" · token {self.fingerprint}"
        return text


class DesktopController:
    """Sign in, call the API, sign out; the session followed through ``tm.subscribe``.

    Knows nothing of Tk: views ``watch()`` it and call its coroutines.
    """

    def __init__(self, tm: tj.TokenManager, api_url: str) -> None:
        self.tm = tm
        self.api_url = api_url
        fp = tj.fingerprint(tm.tokens.access_token) if tm.tokens else "-"
        self.snapshot = Snapshot(tm.state, fp, tm.ended_code)
        if self.snapshot.signed_in:
            self.snapshot = replace(self.snapshot, message="Welcome back: session resumed.")
        elif tm.ended_code is not None:
            message = f"Your last session ended ({tm.ended_code}). Please sign in again."
            self.snapshot = replace(self.snapshot, message=message)
        self._watchers: list[Callable[[Snapshot], None]] = []
        self._http: aiohttp.ClientSession | None = None
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
        changes: dict[str, Any] = {"state": event.state, "fingerprint": event.fingerprint}
        if event.kind is tj.EventKind.ENDED:
            changes["ended_code"] = event.code
            changes["message"] = (
                f"Your session has ended ({event.code}): the server no longer accepts it. "
                "Please sign in again to continue."
            )
        elif event.kind is tj.EventKind.REFRESH_FAILED and event.state is tj.SessionState.OFFLINE:
            changes["message"] = "Offline: the server cannot be reached. Your session is kept."
        elif event.kind is tj.EventKind.SIGNED_IN:
            changes["ended_code"] = None
        self._set(**changes)

    async def sign_in(self, email: str, password: str) -> None:
        """Sign in; the outcome lands in ``snapshot.message``."""
        if not email or not password:
            self._set(message="Enter your email and password.")
            return
        self._set(busy=True, message="Signing in…")
        try:
            await self.tm.sign_in(email=email, password=password)
        except tj.SignInFailed as exc:
            self._set(message=f"Sign-in refused ({exc.code}): check your email and password.")
        except tj.TransientError:
            self._set(message="The server cannot be reached. Try again in a moment.")
        else:
            self._set(message=f"Signed in as {email}.")
        finally:
            self._set(busy=False)

    async def call_api(self) -> None:
        """``GET /api/me`` through the SDK's middleware (bearer, refresh, 401 replay)."""
        if self._http is None:
            self._http = self.tm.client_session()
        self._set(busy=True, message="Calling GET /api/me…")
        try:
            async with self._http.get(self.api_url) as response:
                if response.status == 200:
                    who = (await response.json()).get("email", "?")
                    self._set(message=f"GET /api/me: 200, you are {who}.")
                else:
                    self._set(message=f"GET /api/me: the server answered {response.status}.")
        except tj.SessionEnded:
            pass  # the ENDED event already put the message up
        except tj.NotSignedIn:
            self._set(message="Sign in first.")
        except (tj.TransientError, aiohttp.ClientError, TimeoutError):
            self._set(message="Offline: the server cannot be reached. Your session is kept.")
        finally:
            self._set(busy=False)

    async def sign_out(self) -> None:
        """Sign out (the server is told; locally it always works)."""
        self._set(busy=True)
        try:
            await self.tm.sign_out()
        finally:
            self._set(busy=False, message="Signed out.")

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()


# ---------------------------------------------------------------------------- Tk view


class TkView:
    """The window: sign-in form, status bar, API button, message. Every handler only starts
    a coroutine (``spawn``), so the UI never waits on the network."""

    def __init__(
        self, root: tk.Tk, controller: DesktopController, email: str, password: str
    ) -> None:
        import tkinter as tk
        from tkinter import ttk

        self.root = root
        self.controller = controller
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        root.title("tokenjournal desktop sample")
        root.protocol("WM_DELETE_WINDOW", self.closed.set)
        frame = ttk.Frame(root, padding=12)
        frame.grid(sticky="nsew")
        self.email = tk.StringVar(value=email)
        self.password = tk.StringVar(value=password)
        self.state_text = tk.StringVar()
        self.message = tk.StringVar()
        ttk.Label(frame, text="Email").grid(row=0, column=0, sticky="w", padx=(0, 8))
        self.email_entry = ttk.Entry(frame, textvariable=self.email, width=32)
        self.email_entry.grid(row=0, column=1, sticky="ew")
        ttk.Label(frame, text="Password").grid(row=1, column=0, sticky="w", padx=(0, 8))
        self.password_entry = ttk.Entry(frame, textvariable=self.password, show="•", width=32)
        self.password_entry.grid(row=1, column=1, sticky="ew")
        buttons = ttk.Frame(frame)
        buttons.grid(row=2, column=0, columnspan=2, pady=8, sticky="w")
        self.sign_in_button = ttk.Button(buttons, text="Sign in", command=self.on_sign_in)
        self.sign_in_button.grid(row=0, column=0)
        self.call_button = ttk.Button(buttons, text="Call GET /api/me", command=self.on_call)
        self.call_button.grid(row=0, column=1, padx=6)
        self.sign_out_button = ttk.Button(buttons, text="Sign out", command=self.on_sign_out)
        self.sign_out_button.grid(row=0, column=2)
        ttk.Label(frame, textvariable=self.state_text, font=("TkDefaultFont", 10, "bold")).grid(
            row=3, column=0, columnspan=2, sticky="w"
        )
        ttk.Label(frame, textvariable=self.message, wraplength=380).grid(
            row=4, column=0, columnspan=2, sticky="w", pady=(4, 0)
        )
        self.password_entry.bind("<Return>", lambda _: self.on_sign_in())
        controller.watch(self.render)

    def render(self, snap: Snapshot) -> None:
        """Show a snapshot: texts, and which buttons make sense now."""
        self.state_text.set(snap.state_text)
        self.message.set(snap.message)
        form = "disabled" if snap.busy or snap.signed_in else "normal"
        for widget in (self.email_entry, self.password_entry, self.sign_in_button):
            widget.configure(state=form)
        live = "disabled" if snap.busy or not snap.signed_in else "normal"
        for widget in (self.call_button, self.sign_out_button):
            widget.configure(state=live)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the asyncio loop; keep a reference so it is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        self.last_task = task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a UI action failed", exc_info=task.exception())

    def on_sign_in(self) -> None:
        """The Sign in button."""
        email, password = self.email.get().strip(), self.password.get()
        self.password.set("")  # do not keep the password in the widget
        self.spawn(self.controller.sign_in(email, password))

    def on_call(self) -> None:
        """The API button."""
        self.spawn(self.controller.call_api())

    def on_sign_out(self) -> None:
        """The Sign out button."""
        self.spawn(self.controller.sign_out())

    async def pump(self) -> None:
        """Tk's event loop, driven from asyncio: handle what is pending, then yield."""
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


class Driver(Protocol):
    """How the smoke scenario works the app: through the window or the controller."""

    async def sign_in(self, email: str, password: str) -> None: ...
    async def call_api(self) -> None: ...
    def state_text(self) -> str: ...
    def message(self) -> str: ...
    def form_enabled(self) -> bool: ...


class HeadlessDriver:
    """Calls the controller directly."""

    def __init__(self, controller: DesktopController) -> None:
        self.c = controller

    async def sign_in(self, email: str, password: str) -> None:
        await self.c.sign_in(email, password)

    async def call_api(self) -> None:
        await self.c.call_api()

    def state_text(self) -> str:
        return self.c.snapshot.state_text

    def message(self) -> str:
        return self.c.snapshot.message

    def form_enabled(self) -> bool:
        return not self.c.snapshot.signed_in and not self.c.snapshot.busy


class TkDriver:
    """Types into the entries, clicks the buttons, reads the labels of the real window."""

    def __init__(self, view: TkView) -> None:
        self.view = view

    async def _after(self, click: Callable[[], object]) -> None:
        click()
        task = self.view.last_task
        if task is None:
            return
        await asyncio.wait_for(asyncio.shield(task), SMOKE_WAIT)
        await asyncio.sleep(UI_TICK * 2)  # let the pump draw it

    async def sign_in(self, email: str, password: str) -> None:
        self.view.email.set(email)
        self.view.password.set(password)
        await self._after(self.view.sign_in_button.invoke)

    async def call_api(self) -> None:
        await self._after(self.view.call_button.invoke)

    def state_text(self) -> str:
        return self.view.state_text.get()

    def message(self) -> str:
        return self.view.message.get()

    def form_enabled(self) -> bool:
        return str(self.view.sign_in_button.cget("state")) == "normal"


async def smoke(driver: Driver, be: Backend, tm: tj.TokenManager) -> int:
    """Sign-in refused, sign in, API call, refresh on expiry, session ended, sign in again."""
    server = be.reference()
    check("signed out" in driver.state_text(), f"starts signed out ({driver.state_text()!r})")
    await driver.sign_in(be.email, "wrong password")
    check("refused" in driver.message(), f"a wrong password is refused ({driver.message()!r})")
    await driver.sign_in(be.email, be.password)
    first = driver.state_text()
    check("valid" in first and not driver.form_enabled(), f"signed in ({first!r})")
    await driver.call_api()
    check(f"200, you are {be.email}" in driver.message(), f"API call ({driver.message()!r})")

    await server.advance(server.config.access_ttl + 1)
    await driver.call_api()
    second = driver.state_text()
    check(
        "200" in driver.message()
        and "valid" in second
        and second != first
        and tm.refresh_requests == 1,
        f"the expired token was refreshed once, the new one is shown ({second!r})",
    )

    await server.advance(server.config.refresh_ttl + 1)
    await driver.call_api()
    check(
        "Your session has ended (token_expired)" in driver.message()
        and "sign in again" in driver.message(),
        f"session end explained ({driver.message()!r})",
    )
    check(
        "ended" in driver.state_text() and driver.form_enabled(),
        f"the sign-in form is back ({driver.state_text()!r})",
    )
    await driver.sign_in(be.email, be.password)
    check("valid" in driver.state_text(), "signed in again")
    print("SMOKE OK: sign-in, API call, refresh, session end, sign-in again", flush=True)
    return 0


# ---------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    async with (
        backend(args, "desktop_tk") as be,
        tj.TokenManager(
            be.url,
            be.journal,
            account=args.account,
            clock=be.clock(),
            retry=SMOKE_RETRY if args.smoke else INTERACTIVE_RETRY,
            device_type="desktop",
            user_agent="tokenjournal-desktop-sample",
        ) as tm,
    ):
        controller = DesktopController(tm, f"{be.url}/api/me")
        try:
            if args.headless:
                print("smoke: headless (controller only)", flush=True)
                return await smoke(HeadlessDriver(controller), be, tm)
            return await run_window(controller, be, tm, args.smoke)
        finally:
            await controller.aclose()


async def run_window(
    controller: DesktopController, be: Backend, tm: tj.TokenManager, smoke_run: bool
) -> int:
    """Open the window and pump it until it is closed (or the smoke scenario ends)."""
    root = open_window()
    if root is None:
        return EXIT_NO_DISPLAY
    # A self-started reference server has a demo account: fill the form in for a first try.
    view = TkView(root, controller, be.email, be.password if be.server is not None else "")
    pump = asyncio.ensure_future(view.pump())
    try:
        if smoke_run:
            print("smoke: driving the Tk window", flush=True)
            return await smoke(TkDriver(view), be, tm)
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
