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
docs/architecture.md section 4.
"""

from __future__ import annotations


class TokenJournalError(Exception):
    """The root of every error tokenjournal raises on purpose."""

    code: str = "tokenjournal_error"


class SessionEnded(TokenJournalError):
    """The server ended the session with a permanent code; the account is now signed out.

    ``code`` holds the server's code (``token_expired``, ``invalid_token``, ...). The journal
    records it with the time, so a restarted process knows why it must sign in again.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        self.code = code
        super().__init__(message or f"session ended by the server: {code}; sign in again")


class NotSignedIn(TokenJournalError):
    """There are no tokens for this account: call ``sign_in`` or ``set_tokens`` first."""

    code: str = "not_signed_in"


class TransientError(TokenJournalError):
    """A failure that may pass; raised only after the retry budget is spent. Tokens are kept."""

    code: str = "transient"


class NetworkError(TransientError):
    """The server could not be reached, or the connection broke, or it timed out."""

    code: str = "network_error"


class ServerError(TransientError):
    """The server answered 5xx, or kept saying a rotation is in progress."""

    code: str = "server_error"


class RateLimited(TransientError):
    """The server answered 429; ``retry_after`` is its hint in seconds, if it gave one."""

    code: str = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SignInFailed(TokenJournalError):
    """The server refused a sign-in: wrong credentials, a denied or expired device code.

    ``code`` holds the server's code. Nothing was stored; the account's state is unchanged.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        self.code = code
        super().__init__(message or f"sign-in refused by the server: {code}")


class ProtocolError(TokenJournalError):
    """The server said something the protocol does not allow (a 4xx for our request, a bad body)."""

    code: str = "protocol_error"


class JournalError(TokenJournalError):
    """The journal cannot be used: locked beyond the busy timeout, disk full, read-only,
    corrupt, or written by a newer version of tokenjournal."""

    code: str = "journal_error"


class OutboxFull(TokenJournalError):
    """An outbox with ``when_full="reject"`` is at its ``max_items`` or ``max_bytes``: the
    item was not stored. Nothing already in the outbox changed."""

    code: str = "outbox_full"
