"""Servers on their own threads, for tests of blocking clients (the sync manager, requests).

A blocking call made on the test's own event loop would stop the reference server living on
that loop; these run elsewhere, on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, TypeVar

from tokenjournal.server import ReferenceServer, ServerConfig

T = TypeVar("T")


class ThreadedReferenceServer:
    """The reference server (test mode) on a private event loop in a daemon thread."""

    def __init__(self, **config: Any) -> None:
        self.server = ReferenceServer(ServerConfig(**{"test_mode": True, **config}))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(30)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (its state is that loop's) and return its result."""

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(30)

    def stats(self) -> dict[str, int]:
        return self.run(self.server.stats)

    def advance(self, seconds: float) -> None:
        self.run(lambda: self.server.state.clock.advance(seconds))

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        self.run(lambda: self.server.set_faults(faults))


class Recorder:
    """A plain HTTP server on 127.0.0.1 that records each request's path and Authorization.

    ``/redirect?to=URL`` answers 302 to URL; ``/401`` always answers 401; ``/scripted``
    answers the next ``(status, Location or None)`` of :attr:`script`; anything else 200.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, bytes]] = []
        self.script: list[tuple[int, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = _read_chunked(self.rfile)
                recorder.seen.append((self.path, self.headers.get("Authorization"), body))
                if self.path == "/scripted":
                    status, location = recorder.script.pop(0)
                    self.send_response(status)
                    if location is not None:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/redirect?to="))
                    self.send_header("Content-Length", "0")
                elif self.path == "/401":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                self.end_headers()
                if self.path not in ("/401", "/scripted") and not self.path.startswith("/redirect"):
                    self.wfile.write(b"ok")

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(30)


def _read_chunked(stream: Any) -> bytes:
    body = b""
    while True:
        size = int(stream.readline().strip(), 16)
        if size == 0:
            stream.readline()
            return body
        body += stream.read(size)
        stream.readline()
