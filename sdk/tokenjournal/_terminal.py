"""Text that reaches a terminal: no control sequence, bounded length, no token.

Anything a server or a journal file supplies (an error code, a device id, an account name)
may hold ESC, CR, BEL or a bidirectional override that rewrites what a person sees: change
the window title, clear the screen, or overwrite a line with a fake verdict. Every such
piece passes through :func:`printable` before a command prints it as text (JSON output is
escaped by the encoder already).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import Final

from ._tokens import fingerprint

#: The longest piece of foreign text one cell of a table shows.
DEFAULT_LIMIT: Final = 120
#: Shorter secrets are redacted only where a whole cell equals them: a 3-character token
#: found inside every word would make the output unreadable and protect nothing.
MIN_SECRET_INSIDE: Final = 6
_ELLIPSIS: Final = "..."


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    # C*: controls (C0, DEL, C1), format characters (bidi overrides, zero-width joiners),
    # surrogates, private use, unassigned; Zl/Zp: Unicode line and paragraph separators.
    return unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret (a token the tool sent or received, a password) replaced
    by ``<token FINGERPRINT>``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        if text == secret:
            return f"<token {fingerprint(secret)}>"
        if len(secret) >= MIN_SECRET_INSIDE and secret in text:
            text = text.replace(secret, f"<token {fingerprint(secret)}>")
    return text


def printable(text: object, *, limit: int = DEFAULT_LIMIT, secrets: Iterable[str] = ()) -> str:
    """``text`` made safe to print on one line of a terminal.

    Secrets are redacted first, then every control, format or separator character is shown
    as a Python-style escape (``\\x1b``, ``\\u202e``), and the result is cut to ``limit``
    characters (ending in ``...``). Never raises.
    """
    secrets = tuple(secrets)
    raw = str(text)
    longest = max((len(s) for s in secrets), default=0)
    cut = len(raw) > limit + longest
    raw = redact(raw[: limit + longest], secrets)
    safe = "".join(_escape(ch) if _unsafe(ch) else ch for ch in raw)
    if cut or len(safe) > limit:
        safe = safe[: max(0, limit - len(_ELLIPSIS))] + _ELLIPSIS
    return safe


def is_clean(text: str) -> bool:
    """Whether ``text`` holds no control byte but newline (what tests assert of output)."""
    return not any(_unsafe(ch) and ch != "\n" for ch in text)
