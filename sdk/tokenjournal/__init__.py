"""tokenjournal: keep a device signed in.

Tokens live in a crash-safe SQLite journal; concurrent callers share one refresh; transient
failures are retried with backoff; a refresh interrupted by a crash is replayed into the
server's grace window on the next start. API calls made offline wait in a durable outbox
(``tm.outbox(name)``) and arrive once. Start with :class:`TokenManager`.
"""

from . import _discovery  # noqa: F401  (installs the I/O behind OAuth2Protocol.discover)
from ._clock import Clock, SystemClock
from ._errors import (
    JournalError,
    NetworkError,
    NotSignedIn,
    OutboxFull,
    ProtocolError,
    RateLimited,
    ServerError,
    SessionEnded,
    SignInFailed,
    TokenJournalError,
    TransientError,
)
from ._events import EventKind, SessionState, TokenEvent
from ._journal import Journal, MemoryJournal, SQLiteJournal
from ._manager import TokenManager
from ._middleware import TokenMiddleware
from ._outbox import DeadLetter, Outbox, OutboxStats
from ._protocols import (
    AuthProtocol,
    DeviceCode,
    DeviceInfo,
    HttpRequest,
    ManaProtocol,
    OAuth2Protocol,
    ServerMetadata,
)
from ._retry import RetryPolicy
from ._seal import Seal
from ._tokens import Failure, FailureKind, TokenSet, fingerprint

__version__ = "0.1.0"

__all__ = [
    "AuthProtocol",
    "Clock",
    "DeadLetter",
    "DeviceCode",
    "DeviceInfo",
    "EventKind",
    "Failure",
    "FailureKind",
    "HttpRequest",
    "Journal",
    "JournalError",
    "ManaProtocol",
    "MemoryJournal",
    "NetworkError",
    "NotSignedIn",
    "OAuth2Protocol",
    "Outbox",
    "OutboxFull",
    "OutboxStats",
    "ProtocolError",
    "RateLimited",
    "RetryPolicy",
    "SQLiteJournal",
    "Seal",
    "ServerError",
    "ServerMetadata",
    "SessionEnded",
    "SessionState",
    "SignInFailed",
    "SystemClock",
    "TokenEvent",
    "TokenJournalError",
    "TokenManager",
    "TokenMiddleware",
    "TokenSet",
    "TransientError",
    "__version__",
    "fingerprint",
]


def _public_home() -> None:
    # Tracebacks and reprs read `tokenjournal.SessionEnded`, not the private module it lives
    # in; pickling finds the same object under the public name.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) or callable(obj):
            obj.__module__ = __name__


_public_home()
