"""The error tree. Every error the SDK raises on purpose derives from TokenJournalError::

    TokenJournalError
    ├── SessionEnded         permanent: the server ended the session (.code says why)
    ├── NotSignedIn          no tokens for this account
    ├── TransientError       the retry budget ran out; tokens are kept
    │   ├── NetworkError     connect/read errors, timeouts
    │   ├── ServerError      5xx, rotation/refresh in progress
    │   └── RateLimited      429 (.retry_after)
    ├── SignInFailed         the server refused a sign-in (.code says why)
    ├── ProtocolError        the server said something the protocol does not allow
    ├── JournalError         storage: locked, full, read-only, corrupt, newer schema
    └── OutboxFull           an outbox at max_items/max_bytes refused one more item

Messages never contain a token; at most a fingerprint. Each class's ``code`` is listed in
docs/architecture.md section 4. ``SessionEnded``, ``SignInFailed`` and ``ProtocolError`` also
carry ``description``: the server's own words (OAuth's ``error_description``, Mana's
``message``), made printable and cut to ``DESCRIPTION_LIMIT`` characters, or ``None``.
"""

from __future__ import annotations

from typing import Final

from ._terminal import printable

#: The longest server description an error keeps: a sentence, not a page of HTML.
DESCRIPTION_LIMIT: Final = 200
#: A server's error code longer than this is cut: codes are identifiers, not essays.
CODE_LIMIT: Final = 64


def clean_description(description: object) -> str | None:
    """A server's ``error_description`` fit for a message, a log line or a terminal: control
    characters escaped, cut to :data:`DESCRIPTION_LIMIT`; ``None`` or empty stays ``None``.

    The manager has already stripped the exchange's secrets from it; this is the last line
    for text that reaches an error by another road (the device flow, the browser's redirect).
    """
    if description is None:
        return None
    text = printable(description, limit=DESCRIPTION_LIMIT).strip()
    return text or None


def clean_code(code: object) -> str:
    """A server's error code fit for a message or a log line: printable, at most
    :data:`CODE_LIMIT` characters. The manager has cleaned the codes of its exchanges; a
    browser redirect's ``error`` reaches an error by no exchange at all."""
    return printable(code, limit=CODE_LIMIT)


def _with_description(message: str, description: str | None) -> str:
    return f"{message} ({description})" if description else message


class TokenJournalError(Exception):
    """The root of every error tokenjournal raises on purpose."""

    code: str = "tokenjournal_error"
    #: The server's description of the failure, when it gave one (see the module doc).
    description: str | None = None


class SessionEnded(TokenJournalError):
    """The server ended the session with a permanent code; the account is now signed out.

    ``code`` holds the server's code (``token_expired``, ``invalid_token``, ...). The journal
    records it with the time, so a restarted process knows why it must sign in again.
    """

    def __init__(
        self, code: str, message: str | None = None, *, description: str | None = None
    ) -> None:
        self.code = clean_code(code)
        self.description = clean_description(description)
        text = message or f"session ended by the server: {self.code}; sign in again"
        super().__init__(_with_description(text, self.description))


class NotSignedIn(TokenJournalError):
    """There are no tokens for this account: call ``sign_in`` or ``set_tokens`` first."""

    code: str = "not_signed_in"


class TransientError(TokenJournalError):
    """A failure that may pass; raised only after the retry budget is spent. Tokens are kept.

    ``retry_after`` is the server's ``Retry-After`` on its last answer, in seconds, if it
    gave one (a 429, a 503, a rotation in progress): the next try waits at least that long.
    """

    code: str = "transient"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NetworkError(TransientError):
    """The server could not be reached, or the connection broke, or it timed out."""

    code: str = "network_error"


class ServerError(TransientError):
    """The server answered 5xx, or kept saying a rotation is in progress."""

    code: str = "server_error"


class RateLimited(TransientError):
    """The server answered 429; ``retry_after`` is its hint in seconds, if it gave one."""

    code: str = "rate_limited"


class SignInFailed(TokenJournalError):
    """The server refused a sign-in: wrong credentials, a denied or expired device code.

    ``code`` holds the server's code. Nothing was stored; the account's state is unchanged.
    """

    def __init__(
        self, code: str, message: str | None = None, *, description: str | None = None
    ) -> None:
        self.code = clean_code(code)
        self.description = clean_description(description)
        text = message or f"sign-in refused by the server: {self.code}"
        super().__init__(_with_description(text, self.description))


class ProtocolError(TokenJournalError):
    """The server said something the protocol does not allow (a 4xx for our request, a bad body).

    ``description`` is the server's ``error_description`` when it gave one.
    """

    code: str = "protocol_error"

    def __init__(self, message: str = "", *, description: str | None = None) -> None:
        self.description = clean_description(description)
        super().__init__(_with_description(message, self.description))


class JournalError(TokenJournalError):
    """The journal cannot be used: locked beyond the busy timeout, disk full, read-only,
    corrupt, or written by a newer version of tokenjournal."""

    code: str = "journal_error"


class OutboxFull(TokenJournalError):
    """An outbox with ``when_full="reject"`` is at its ``max_items`` or ``max_bytes``: the
    item was not stored. Nothing already in the outbox changed."""

    code: str = "outbox_full"
