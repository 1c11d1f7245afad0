"""Desktop app: a Tkinter window that signs in, shows the session live, and calls an API.

What it shows:
- No asyncio in the app: ``tokenjournal.sync.TokenManager`` keeps the session on its own
  thread, Tk's ``mainloop()`` owns the main thread and sleeps until something happens (no
  polling loop: the window costs next to no CPU while idle), and each button runs its
  blocking work (sign in, ``GET /api/me`` through ``requests`` and ``RequestsAuth``, sign out)
  on a worker thread, so a slow network never freezes the window.
- Session events reach the window on Tk's own thread: ``tm.subscribe(..., call=root.after_idle)``.
- A controller with no Tk in it and a thin Tk view over it: the same controller runs headless.
- The session state shown live (valid / refreshing / offline / ended) with the access
  token's fingerprint, never the token.
- A clear message when the server ends the session, and the sign-in form back.

Run it:
    python samples/desktop_tk.py                   # self-started reference server, demo account
    python samples/desktop_tk.py --auth-url https://auth.example --email me@example.com
    python samples/desktop_tk.py --smoke           # drives the real window (needs a display)
    python samples/desktop_tk.py --smoke --headless  # the same scenario, controller only
    python samples/desktop_tk.py --smoke --idle-cpu 5  # then measure the idle window's CPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import requests
from _common import (
    SMOKE_RETRY,
    Backend,
    SmokeFailed,
    add_common_arguments,
    backend_in_thread,
    check,
    run_blocking,
    setup_logging,
)

import tokenjournal as tj
import tokenjournal.sync as tjs
from tokenjournal.adapters import RequestsAuth

if TYPE_CHECKING:  # imported lazily below: a Python without Tk can still run --headless
    import tkinter as tk

log = logging.getLogger("desktop_tk")
T = TypeVar("T")

EXIT_NO_DISPLAY: Final = 2
#: A person is waiting: give up on an unreachable server after ~10 s, not the default minute.
INTERACTIVE_RETRY: Final = tj.RetryPolicy(max_attempts=3, max_elapsed=10.0, max_delay=4.0)
#: The longest a button's blocking work may wait on the SDK or the network.
CALL_TIMEOUT: Final = 30.0
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

    Knows nothing of Tk: views ``watch()`` it and run its blocking methods off their UI
    thread. ``call`` hands session events to the UI's thread (``root.after_idle``); without
    it they arrive on the manager's thread. The snapshot is replaced whole under a lock, so
    any thread may read it.
    """

    def __init__(self, tm: tjs.TokenManager, api_url: str, call: tjs.Deliver | None = None) -> None:
        self.tm = tm
        self.api_url = api_url
        fp = tj.fingerprint(tm.tokens.access_token) if tm.tokens else "-"
        snapshot = Snapshot(tm.state, fp, tm.ended_code)
        if snapshot.signed_in:
            snapshot = replace(snapshot, message="Welcome back: session resumed.")
        elif tm.ended_code is not None:
            message = f"Your last session ended ({tm.ended_code}). Please sign in again."
            snapshot = replace(snapshot, message=message)
        self.snapshot = snapshot
        self._lock = threading.Lock()
        self._watchers: list[Callable[[Snapshot], None]] = []
        self._http = requests.Session()
        self._http.auth = RequestsAuth(tm, timeout=CALL_TIMEOUT)
        self._unsubscribe = tm.subscribe(self._on_event, call=call)

    def watch(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` now and on every change (from the changing thread)."""
        self._watchers.append(callback)
        callback(self.snapshot)

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self.snapshot = replace(self.snapshot, **changes)
            snapshot = self.snapshot
        for callback in self._watchers:
            callback(snapshot)

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

    def sign_in(self, email: str, password: str) -> None:
        """Sign in (blocking); the outcome lands in ``snapshot.message``."""
        if not email or not password:
            self._set(message="Enter your email and password.")
            return
        self._set(busy=True, message="Signing in…")
        try:
            self.tm.sign_in(email=email, password=password, timeout=CALL_TIMEOUT)
        except tj.SignInFailed as exc:
            self._set(message=f"Sign-in refused ({exc.code}): check your email and password.")
        except (tj.TransientError, TimeoutError):
            self._set(message="The server cannot be reached. Try again in a moment.")
        else:
            self._set(message=f"Signed in as {email}.")
        finally:
            self._set(busy=False)

    def call_api(self) -> None:
        """``GET /api/me`` with ``requests`` and ``RequestsAuth`` (blocking): the bearer, a
        refresh when the token is stale, one replay after a 401."""
        self._set(busy=True, message="Calling GET /api/me…")
        try:
            response = self._http.get(self.api_url, timeout=CALL_TIMEOUT)
            if response.status_code == 200:
                who = response.json().get("email", "?")
                self._set(message=f"GET /api/me: 200, you are {who}.")
            else:
                self._set(message=f"GET /api/me: the server answered {response.status_code}.")
        except tj.SessionEnded:
            pass  # the ENDED event already put the message up
        except tj.NotSignedIn:
            self._set(message="Sign in first.")
        except (tj.TransientError, requests.RequestException, TimeoutError):
            self._set(message="Offline: the server cannot be reached. Your session is kept.")
        finally:
            self._set(busy=False)

    def sign_out(self) -> None:
        """Sign out (the server is told; locally it always works)."""
        self._set(busy=True)
        try:
            self.tm.sign_out(timeout=CALL_TIMEOUT)
        finally:
            self._set(busy=False, message="Signed out.")

    def close(self) -> None:
        """Stop following the session (before Tk's loop ends) and close the HTTP session."""
        self._unsubscribe()
        self._http.close()


# ---------------------------------------------------------------------------- Tk view


class TkView:
    """The window: sign-in form, status bar, API button, message. A handler only hands its
    work to a worker thread, so the UI never waits on the network; Tk's ``mainloop()``
    sleeps until an event, a click or a hand-over from another thread wakes it."""

    def __init__(
        self, root: tk.Tk, controller: DesktopController, email: str, password: str
    ) -> None:
        import tkinter as tk
        from tkinter import ttk

        self.root = root
        self.controller = controller
        # One worker: actions run in the order they were clicked.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ui-action")
        self.last_action: Future[None] | None = None
        self._ui_thread = threading.current_thread()
        root.title("tokenjournal desktop sample")
        root.protocol("WM_DELETE_WINDOW", root.quit)
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
        controller.watch(self.changed)

    def changed(self, _: Snapshot) -> None:
        """The controller changed: draw now on Tk's thread, else hand it over to it."""
        if threading.current_thread() is self._ui_thread:
            self.render()
            return
        try:
            self.root.after_idle(self.render)
        except RuntimeError:  # "main thread is not in main loop": the window is closing
            log.debug("a change after the window closed was not drawn")

    def render(self) -> None:
        """Show the latest snapshot (not the one that announced it: hand-overs from two
        threads may arrive in either order): texts, and which buttons make sense now."""
        snap = self.controller.snapshot
        self.state_text.set(snap.state_text)
        self.message.set(snap.message)
        form = "disabled" if snap.busy or snap.signed_in else "normal"
        for widget in (self.email_entry, self.password_entry, self.sign_in_button):
            widget.configure(state=form)
        live = "disabled" if snap.busy or not snap.signed_in else "normal"
        for widget in (self.call_button, self.sign_out_button):
            widget.configure(state=live)

    def spawn(self, work: Callable[..., None], *args: Any) -> None:
        """Run ``work(*args)`` on the worker thread."""
        action = self.worker.submit(work, *args)
        action.add_done_callback(_log_failure)
        self.last_action = action

    def on_sign_in(self) -> None:
        """The Sign in button."""
        email, password = self.email.get().strip(), self.password.get()
        self.password.set("")  # do not keep the password in the widget
        self.spawn(self.controller.sign_in, email, password)

    def on_call(self) -> None:
        """The API button."""
        self.spawn(self.controller.call_api)

    def on_sign_out(self) -> None:
        """The Sign out button."""
        self.spawn(self.controller.sign_out)

    def close(self) -> None:
        """Let the running action finish (its own timeouts bound it); no new ones."""
        self.worker.shutdown(wait=True, cancel_futures=True)


def _log_failure(action: Future[None]) -> None:
    if not action.cancelled() and action.exception() is not None:
        log.error("a UI action failed", exc_info=action.exception())


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

    def sign_in(self, email: str, password: str) -> None: ...
    def call_api(self) -> None: ...
    def state_text(self) -> str: ...
    def message(self) -> str: ...
    def form_enabled(self) -> bool: ...


class HeadlessDriver:
    """Calls the controller directly."""

    def __init__(self, controller: DesktopController) -> None:
        self.c = controller

    def sign_in(self, email: str, password: str) -> None:
        self.c.sign_in(email, password)

    def call_api(self) -> None:
        self.c.call_api()

    def state_text(self) -> str:
        return self.c.snapshot.state_text

    def message(self) -> str:
        return self.c.snapshot.message

    def form_enabled(self) -> bool:
        return not self.c.snapshot.signed_in and not self.c.snapshot.busy


class TkDriver:
    """Types into the entries, clicks the buttons, reads the labels of the real window,
    from a thread of its own while Tk's ``mainloop()`` runs the window."""

    def __init__(self, view: TkView) -> None:
        self.view = view

    def on_ui(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on Tk's thread, after whatever was handed to it before, and wait."""
        done = threading.Event()
        box: list[T] = []

        def run() -> None:
            box.append(fn())
            done.set()

        self.view.root.after_idle(run)
        if not done.wait(SMOKE_WAIT):
            raise SmokeFailed("the window did not answer")
        return box[0]

    def _click(self, button: Callable[[], object]) -> None:
        self.on_ui(button)
        action = self.view.last_action
        if action is not None:
            action.result(SMOKE_WAIT)
        self.on_ui(lambda: None)  # what the action handed to Tk is drawn by now

    def sign_in(self, email: str, password: str) -> None:
        def type_in() -> None:
            self.view.email.set(email)
            self.view.password.set(password)

        self.on_ui(type_in)
        self._click(self.view.sign_in_button.invoke)

    def call_api(self) -> None:
        self._click(self.view.call_button.invoke)

    def state_text(self) -> str:
        return self.on_ui(self.view.state_text.get)

    def message(self) -> str:
        return self.on_ui(self.view.message.get)

    def form_enabled(self) -> bool:
        return self.on_ui(lambda: str(self.view.sign_in_button.cget("state")) == "normal")


def smoke(driver: Driver, be: Backend, tm: tjs.TokenManager) -> int:
    """Sign-in refused, sign in, API call, refresh on expiry, session ended, sign in again."""
    server = be.reference()
    check("signed out" in driver.state_text(), f"starts signed out ({driver.state_text()!r})")
    driver.sign_in(be.email, "wrong password")
    check("refused" in driver.message(), f"a wrong password is refused ({driver.message()!r})")
    driver.sign_in(be.email, be.password)
    first = driver.state_text()
    check("valid" in first and not driver.form_enabled(), f"signed in ({first!r})")
    driver.call_api()
    check(f"200, you are {be.email}" in driver.message(), f"API call ({driver.message()!r})")

    server.state.clock.advance(server.config.access_ttl + 1)
    driver.call_api()
    second = driver.state_text()
    check(
        "200" in driver.message()
        and "valid" in second
        and second != first
        and tm.manager.refresh_requests == 1,
        f"the expired token was refreshed once, the new one is shown ({second!r})",
    )

    server.state.clock.advance(server.config.refresh_ttl + 1)
    driver.call_api()
    check(
        "Your session has ended (token_expired)" in driver.message()
        and "sign in again" in driver.message(),
        f"session end explained ({driver.message()!r})",
    )
    check(
        "ended" in driver.state_text() and driver.form_enabled(),
        f"the sign-in form is back ({driver.state_text()!r})",
    )
    driver.sign_in(be.email, be.password)
    check("valid" in driver.state_text(), "signed in again")
    print("SMOKE OK: sign-in, API call, refresh, session end, sign-in again", flush=True)
    return 0


# ---------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    with (
        backend_in_thread(args, "desktop_tk") as be,
        tjs.TokenManager(
            be.url,
            be.journal,
            account=args.account,
            clock=be.clock(),
            retry=SMOKE_RETRY if args.smoke else INTERACTIVE_RETRY,
            device_type="desktop",
            user_agent="tokenjournal-desktop-sample",
        ) as tm,
    ):
        api_url = f"{be.url}/api/me"
        if args.headless:
            print("smoke: headless (controller only)", flush=True)
            controller = DesktopController(tm, api_url)
            try:
                return smoke(HeadlessDriver(controller), be, tm)
            finally:
                controller.close()
        return run_window(be, tm, api_url, args)


def run_window(be: Backend, tm: tjs.TokenManager, api_url: str, args: argparse.Namespace) -> int:
    """Open the window and run Tk's loop until it is closed (or the smoke scenario ends)."""
    root = open_window()
    if root is None:
        return EXIT_NO_DISPLAY
    # Session events are handed to Tk's thread: the controller never touches Tk from another.
    controller = DesktopController(tm, api_url, call=root.after_idle)
    # A self-started reference server has a demo account: fill the form in for a first try.
    view = TkView(root, controller, be.email, be.password if be.server is not None else "")
    outcome: list[BaseException | int] = []
    if args.smoke:

        def scenario() -> None:
            try:
                outcome.append(smoke(TkDriver(view), be, tm))
                if args.idle_cpu:
                    outcome.append(measure_idle(view, args.idle_cpu))
            except BaseException as exc:  # handed to the main thread, raised there
                outcome.append(exc)
            finally:
                root.after_idle(root.quit)

        print("smoke: driving the Tk window", flush=True)
        root.after_idle(threading.Thread(target=scenario, name="smoke", daemon=True).start)
    try:
        root.mainloop()
    finally:
        controller.close()  # no more hand-overs to a loop that has stopped
        view.close()
        root.destroy()
    for result in outcome:
        if isinstance(result, BaseException):
            raise result
    return 0


def measure_idle(view: TkView, seconds: float) -> int:
    """The whole process's CPU time while the signed-in window sits idle for ``seconds``."""
    used, started = time.process_time(), time.monotonic()
    time.sleep(seconds)  # this thread sleeps too: only the window and the SDK are measured
    share = (time.process_time() - used) / (time.monotonic() - started)
    print(f"idle CPU: {share * 100:.2f}% of a core over {seconds:g} s", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    add_common_arguments(parser)
    parser.add_argument(
        "--headless",
        action="store_true",
        help="with --smoke: run the scenario on the controller, without a window",
    )
    parser.add_argument(
        "--idle-cpu",
        type=float,
        metavar="SECONDS",
        default=0.0,
        help="with --smoke, in the window: then leave it idle this long and print the "
        "process's CPU use meanwhile",
    )
    args = parser.parse_args(argv)
    if args.headless and not args.smoke:
        parser.error("--headless only goes with --smoke")
    if args.idle_cpu and (args.headless or not args.smoke):
        parser.error("--idle-cpu goes with --smoke, in the window")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    run_blocking(lambda: main(arguments))
