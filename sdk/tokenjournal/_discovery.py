"""The I/O half of :meth:`OAuth2Protocol.discover`: fetch an issuer's metadata, keep it.

Reading and checking a document is pure (``_protocols.parse_metadata``); this module sends
the requests through ``_transport`` and keeps the document in the journal, so that a device
that boots without a network still knows its server. It installs itself into
``_protocols`` when ``tokenjournal`` is imported (the protocols import nothing that sends).
Discovery runs once at start-up, never on the token path (docs/architecture.md 3.4).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

import aiohttp
from yarl import URL

from ._clock import Clock, SystemClock
from ._errors import NetworkError, ProtocolError
from ._journal import Journal, SQLiteJournal
from ._protocols import (
    HttpRequest,
    ServerMetadata,
    install_metadata_source,
    metadata_urls,
    parse_metadata,
)
from ._tokens import Failure, FailureKind
from ._transport import NetworkFailure, send
from ._urls import is_loopback

log = logging.getLogger("tokenjournal")

_GET_JSON: Final = (("Accept", "application/json"),)
#: A kept document "read" further than this in the future was written under a clock that
#: has since been set back: it is treated as stale, not as fresh for years.
_CLOCK_SLACK: Final = 300.0


def _check_issuer(issuer: str, allow_insecure_http: bool) -> None:
    url = URL(issuer) if isinstance(issuer, str) else None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"issuer must be an http(s) URL, got {issuer!r}")
    if url.raw_query_string or url.raw_fragment or "?" in issuer or "#" in issuer:
        # RFC 8414 2: an issuer has neither; the well-known URLs would be built inside one.
        raise ValueError(f"issuer must have no query or fragment, got {issuer!r}")
    if url.scheme == "http" and not is_loopback(url.host) and not allow_insecure_http:
        raise ValueError(
            f"refusing discovery over plain HTTP from {url.host}: whoever is on the network "
            "could choose where your tokens go; use https or pass allow_insecure_http=True"
        )


async def _fetch(issuer: str, request_timeout: float) -> ServerMetadata | Failure | None:
    """The first usable document among the well-known URLs; ``None`` when none answered at
    all, else the last failure. An issuer mismatch stops at once: it is not "unreachable"."""
    last: Failure | None = None
    async with aiohttp.ClientSession() as http:
        for url in metadata_urls(issuer):
            try:
                status, headers, body = await send(
                    http, HttpRequest("GET", url, _GET_JSON, b""), request_timeout
                )
            except NetworkFailure as exc:
                log.info("discovery: %s did not answer (%s)", url, exc)
                continue
            answer = parse_metadata(status, headers, body, issuer)
            if isinstance(answer, ServerMetadata) or answer.code == "issuer_mismatch":
                return answer
            log.info("discovery: %s answered %d (%s)", url, status, answer.code)
            last = answer
    return last


def _unreachable(answer: Failure | None) -> bool:
    """Whether the kept document may stand in: no answer, "later" (5xx, 429), and also a 404
    or an HTML page, since a captive portal or a proxy answers so for a server it keeps the
    device from. Only a document that names another issuer is never papered over."""
    return answer is None or answer.code != "issuer_mismatch"


async def read_metadata(
    issuer: str,
    *,
    journal: str | os.PathLike[str] | Journal | None = None,
    max_age: float,
    request_timeout: float,
    allow_insecure_http: bool = False,
    clock: Clock | None = None,
) -> ServerMetadata:
    """``issuer``'s metadata: the journal's copy while younger than ``max_age``, else the
    server's (kept in the journal), else, when the server cannot be reached, the journal's
    copy whatever its age. See :meth:`OAuth2Protocol.discover`."""
    _check_issuer(issuer, allow_insecure_http)
    clock = clock or SystemClock()
    if journal is None:
        return _verdict(issuer, await _fetch(issuer, request_timeout), None)
    own = isinstance(journal, str | os.PathLike)
    store: Journal = SQLiteJournal(journal) if isinstance(journal, str | os.PathLike) else journal
    # Close only what this call opened: a journal a running manager uses stays open.
    opened = own or not getattr(store, "is_open", True)
    await store.open()
    try:
        return await _read_through(issuer, store, max_age, request_timeout, clock)
    finally:
        if opened:
            await store.close()


async def _read_through(
    issuer: str, store: Journal, max_age: float, request_timeout: float, clock: Clock
) -> ServerMetadata:
    kept = await store.load_metadata(issuer)
    recalled: ServerMetadata | None = None
    if kept is not None:
        document, fetched_at = kept
        parsed = parse_metadata(200, {}, document.encode("utf-8"), issuer)
        if isinstance(parsed, ServerMetadata):
            recalled = parsed
            age = clock.time() - fetched_at
            if -_CLOCK_SLACK <= age < max_age:
                return recalled
    answer = await _fetch(issuer, request_timeout)
    if isinstance(answer, ServerMetadata):
        await store.save_metadata(issuer, answer.document, clock.time())
        return answer
    return _verdict(issuer, answer, recalled)


def _verdict(
    issuer: str, answer: ServerMetadata | Failure | None, recalled: ServerMetadata | None
) -> ServerMetadata:
    if isinstance(answer, ServerMetadata):
        return answer
    if recalled is not None and _unreachable(answer):
        log.warning("discovery: %s cannot be reached; using the kept document", issuer)
        return recalled
    if answer is None:
        raise NetworkError(f"discovery: {issuer} could not be reached")
    if answer.kind in (FailureKind.SERVER, FailureKind.RATE_LIMITED):
        raise NetworkError(f"discovery: {issuer} answered {answer.status}")
    raise ProtocolError(
        f"discovery: {issuer} has no usable metadata ({answer.code}, {answer.status}): "
        f"{answer.message}"
    )


async def _source(issuer: str, **options: Any) -> ServerMetadata:
    return await read_metadata(issuer, **options)


install_metadata_source(_source)
