"""Sealing: the journal's secret columns encrypted at rest (docs/architecture.md section 7).

A :class:`Seal` holds one 256-bit key (and, for a rotation, the keys it replaces). The
journal calls :meth:`Seal.seal` when it writes a secret column and :meth:`Seal.open` when it
reads one; which columns are secret is listed once, in ``_journal.SECRET_TABLES``.

* AES-256-GCM (``cryptography``), a fresh random 96-bit nonce per write.
* The associated data binds a value to its column, its row's account and its row's
  generation: a sealed value copied to another account, column or generation does not open.
* Every sealed value names the key that sealed it by its *key id*: 8 hex digits of a key
  derived from the key (HKDF), never the key. A journal says which key it needs without
  revealing anything about it.
* Fingerprints (what ``status`` and the events show) of sealed values are keyed hashes, so a
  fingerprint stored next to a sealed value says nothing a guess could confirm.

``cryptography`` and ``keyring`` are the optional ``tokenjournal[seal]`` extra: they are
imported when a seal is made, never by ``import tokenjournal``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
#: Every sealed value starts with this (then the key id, a colon, the nonce and ciphertext).
PREFIX: Final = "tjs1:"
#: The keyring entry (user name) under the service name that holds the key.
KEYRING_USER: Final = "journal-key"
_ALTERNATIVES: Final = (
    "Seal.from_key_file(path) (a 0600 file of 32 random bytes), "
    "Seal.from_env(NAME) (base64, e.g. from a secrets manager) or "
    "Seal.from_systemd_credential(NAME) (systemd-creds, TPM-backed where available)"
)


class Unopenable(ValueError):
    """A sealed value that this seal cannot open: another key, another row, or tampered."""


def _derive(key: bytes, label: bytes) -> bytes:
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    return HKDFExpand(SHA256(), 32, b"tokenjournal seal v1 " + label).derive(key)


def _associated(column: str, account: str, generation: int) -> bytes:
    # JSON keeps the fields apart whatever an account name contains.
    return json.dumps(["tokenjournal/seal/1", column, account, generation]).encode()


class _Key:
    """One key's derived material: the cipher, the key id, the fingerprint key."""

    __slots__ = ("aead", "fingerprint_key", "id")

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead: AESGCM = AESGCM(_derive(key, b"encrypt"))
        self.id: str = _derive(key, b"key id").hex()[:8]
        self.fingerprint_key: bytes = _derive(key, b"fingerprint")


class Seal:
    """A key that seals the journal's secret columns (AES-256-GCM), and the keys it replaces.

    Make one with a constructor for your device: :meth:`from_keyring` (a desktop's Secret
    Service, Keychain or Windows Credential Locker), :meth:`from_key_file`, :meth:`from_env`
    or :meth:`from_systemd_credential`; or pass 32 bytes. ``previous`` seals (or keys) still
    open rows sealed before a rotation; every row written is sealed with this key, and
    ``tokenjournal reseal`` re-seals all rows at once. ``repr()`` shows key ids only.
    """

    __slots__ = ("_key", "_previous")

    def __init__(self, key: bytes, *, previous: Iterable[Seal | bytes] = ()) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise ValueError(f"a seal key is {KEY_BYTES} bytes")
        self._key = _Key(bytes(key))
        older: dict[str, _Key] = {}
        for item in previous:
            seal = item if isinstance(item, Seal) else Seal(item)
            for k in (seal._key, *seal._previous):
                if k.id != self._key.id:
                    older.setdefault(k.id, k)
        self._previous: tuple[_Key, ...] = tuple(older.values())

    def __repr__(self) -> str:
        if not self._previous:
            return f"Seal(key_id={self.key_id!r})"
        return f"Seal(key_id={self.key_id!r}, previous={[k.id for k in self._previous]!r})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Seal is not pickled: it would write the key somewhere")

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def from_key_file(
        cls,
        path: str | os.PathLike[str],
        *,
        previous: Iterable[Seal | bytes] = (),
        create: bool = True,
    ) -> Seal:
        """The key in ``path``: 32 random bytes, created (mode 0600) if the file is missing.

        An existing file must hold exactly 32 bytes, be a regular file (not a link) of this
        process's user or of root, and give other users no access and its group no write
        (``chmod 600``, or ``640`` for a group of your service); anything else is refused.
        ``create=False`` only loads: a missing file raises ``ValueError`` (an old key, which
        a new random one could never replace).
        """
        where = Path(os.path.expanduser(os.fspath(path)))
        if create and not os.path.lexists(where):
            _create_key_file(where)
        try:
            # No symlink (another user's file in our name), no FIFO (an open that never
            # returns): only a regular file we own, which nobody else may write.
            fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ValueError(f"key file {where} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError(f"key file {where} is a symbolic link; name the file") from None
            raise ValueError(f"cannot read the key file {where}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            _refuse_unsafe_key_file(where, info)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as file:
            key = file.read(KEY_BYTES + 1)
        if len(key) != KEY_BYTES:
            raise ValueError(
                f"key file {where} holds {info.st_size} bytes, not {KEY_BYTES}: not a seal key"
            )
        return cls(key, previous=previous)

    @classmethod
    def from_env(cls, name: str, *, previous: Iterable[Seal | bytes] = ()) -> Seal:
        """The key in environment variable ``name``, base64 (``openssl rand -base64 32``)."""
        value = os.environ.get(name)
        if not value:
            raise ValueError(f"environment variable {name} is not set (a base64 seal key)")
        return cls(_decode(value, f"environment variable {name}"), previous=previous)

    @classmethod
    def from_systemd_credential(cls, name: str, *, previous: Iterable[Seal | bytes] = ()) -> Seal:
        """The key systemd passes as credential ``name`` (``LoadCredentialEncrypted=``).

        The file ``$CREDENTIALS_DIRECTORY/name`` holds 32 raw bytes or their base64.
        """
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise ValueError(
                f"no $CREDENTIALS_DIRECTORY: credential {name} was not passed by systemd "
                "(LoadCredential= / LoadCredentialEncrypted= in the unit)"
            )
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a credential name")
        try:
            raw = (Path(folder) / name).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read systemd credential {name}: {exc.strerror}") from None
        if len(raw) == KEY_BYTES:
            return cls(raw, previous=previous)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(
                f"systemd credential {name} is neither {KEY_BYTES} bytes nor base64"
            ) from None
        return cls(_decode(text, f"systemd credential {name}"), previous=previous)

    @classmethod
    def from_keyring(cls, service: str, *, previous: Iterable[Seal | bytes] = ()) -> Seal:
        """The key kept by the desktop's keyring under ``service`` (made on first use).

        Only a real backend will do (Secret Service, macOS Keychain, Windows Credential
        Locker, ...): on a box whose keyring would fail, drop the key, or keep it in plain
        text, this raises ``RuntimeError`` naming the alternatives instead of falling back.
        """
        import keyring
        import keyring.errors

        backend = keyring.get_keyring()
        if not _real_keyring(backend):
            raise RuntimeError(
                f"no usable keyring on this machine (backend: {_backend_name(backend)}); "
                f"a seal key would be lost or kept in plain text. Use {_ALTERNATIVES}"
            )
        try:
            stored = backend.get_password(service, KEYRING_USER)
            if stored is None:
                stored = base64.b64encode(os.urandom(KEY_BYTES)).decode()
                backend.set_password(service, KEYRING_USER, stored)
                # Read back: a backend that accepted the key but cannot return it would
                # seal the journal with a key nobody can find again.
                if backend.get_password(service, KEYRING_USER) != stored:
                    raise RuntimeError(
                        f"the keyring ({_backend_name(backend)}) did not keep the seal key; "
                        f"use {_ALTERNATIVES}"
                    )
        except keyring.errors.KeyringError as exc:
            raise RuntimeError(
                f"the keyring ({_backend_name(backend)}) failed: {type(exc).__name__}; "
                f"unlock it, or use {_ALTERNATIVES}"
            ) from None
        return cls(_decode(stored, f"keyring entry {service}/{KEYRING_USER}"), previous=previous)

    # -- what the journal calls --------------------------------------------------------

    @property
    def key_id(self) -> str:
        """This key's id: 8 hex digits derived from the key (it says nothing about it)."""
        return self._key.id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """This key's id, then the ids of the ``previous`` keys it can still open."""
        return (self._key.id, *(k.id for k in self._previous))

    def seal(self, value: str, *, account: str, column: str, generation: int) -> str:
        """``value`` sealed with this key, bound to ``account``, ``column``, ``generation``."""
        nonce = os.urandom(NONCE_BYTES)
        data = self._key.aead.encrypt(
            nonce, value.encode(), _associated(column, account, generation)
        )
        return f"{PREFIX}{self._key.id}:{base64.urlsafe_b64encode(nonce + data).decode()}"

    def open(self, sealed: str, *, account: str, column: str, generation: int) -> str:
        """The value :meth:`seal` sealed with the same account, column and generation.

        Raises :class:`Unopenable` for a value sealed by a key this seal does not hold, or
        under another account, column or generation, or altered.
        """
        from cryptography.exceptions import InvalidTag

        kid = key_id_of(sealed)
        key = next((k for k in (self._key, *self._previous) if k.id == kid), None)
        if key is None:
            raise Unopenable(f"sealed with key id {kid}, which this seal does not hold")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(PREFIX) + 9 :])
            plain = key.aead.decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], _associated(column, account, generation)
            )
            return plain.decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise Unopenable(
                f"does not open with key id {kid} for this account, column and generation "
                "(copied from another row, or altered)"
            ) from None

    def fingerprint(self, value: str | None) -> str:
        """A keyed fingerprint of ``value`` (8 hex digits), or ``-`` for none."""
        if value is None:
            return "-"
        return hmac.new(self._key.fingerprint_key, value.encode(), hashlib.sha256).hexdigest()[:8]


def _create_key_file(where: Path) -> None:
    """A new key at ``where``, whole or not at all: written to a temporary file in the same
    folder, synced, then linked into place. A crash leaves no short key (which every later
    start would refuse), and of two processes starting at once the second reads the
    first's key instead of its half-written file."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=".tokenjournal-key-", dir=where.parent)
    except OSError as exc:
        raise ValueError(f"cannot create the key file {where}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, where)
    except FileExistsError:
        pass  # another process made it first: theirs is the key
    except OSError as exc:
        raise ValueError(f"cannot create the key file {where}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    folder = os.open(where.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the new name survives a power cut too
    finally:
        os.close(folder)


def _refuse_unsafe_key_file(where: Path, info: os.stat_result) -> None:
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise ValueError(f"cannot read the key file {where}: Is a directory")
    if not stat.S_ISREG(mode):
        raise ValueError(f"key file {where} is not a regular file")
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH | stat.S_IWGRP | stat.S_IXGRP):
        raise ValueError(
            f"key file {where} is open to other users or writable by its group "
            f"(mode {stat.S_IMODE(mode):o}); chmod 600 (or 640) it and make a new key"
        )
    if info.st_uid not in (os.geteuid(), 0):  # root's 640 for a service's group is fine
        raise ValueError(
            f"key file {where} belongs to user {info.st_uid}, neither this process's user "
            f"({os.geteuid()}) nor root: another user could have chosen the key"
        )


def is_sealed(value: object) -> bool:
    """Whether a column's value is a sealed one."""
    return isinstance(value, str) and value.startswith(PREFIX)


def key_id_of(sealed: str) -> str:
    """The key id a sealed value names (``?`` if it names none)."""
    kid = sealed[len(PREFIX) : len(PREFIX) + 8]
    ok = is_sealed(sealed) and len(kid) == 8 and sealed[len(PREFIX) + 8 : len(PREFIX) + 9] == ":"
    return kid if ok else "?"


def _decode(text: str, where: str) -> bytes:
    # Either alphabet (standard or URL-safe), strictly: a stray character means a paste or a
    # secret store went wrong, and base64's lenient mode would drop it and read on.
    try:
        key = base64.b64decode(text.strip(), altchars=b"-_", validate=True)
    except ValueError:  # binascii.Error is one; so is a str with non-ASCII characters
        raise ValueError(f"{where} is not base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where} decodes to {len(key)} bytes, not {KEY_BYTES}")
    return key


#: Backends that would not keep a key safe: they fail, forget, or write it in plain text.
_NOT_REAL: Final = frozenset(
    {
        "keyring.backends.fail.Keyring",
        "keyring.backends.null.Keyring",
        "keyrings.alt.file.PlaintextKeyring",
        "keyrings.alt.file.EncryptedKeyring",  # a password prompt on a headless box
        "keyrings.alt.Gnome.Keyring",
        "keyrings.alt.pyfs.PlaintextKeyring",
    }
)


def _backend_name(backend: object) -> str:
    kind = type(backend)
    return f"{kind.__module__}.{kind.__qualname__}"


def _real_keyring(backend: object) -> bool:
    from keyring.backends.chainer import ChainerBackend

    if isinstance(backend, ChainerBackend):
        return any(_real_keyring(b) for b in backend.backends)
    name = _backend_name(backend)
    return name not in _NOT_REAL and "plaintext" not in name.lower()
