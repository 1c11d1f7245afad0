"""The seal itself (invariant 15): AES-256-GCM, values bound to their row, key sources that
refuse what would not keep a key safe, key ids that say nothing about the key."""

from __future__ import annotations

import base64
import os
import pickle
import resource
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.backends.null
import keyring.errors
import pytest
from keyring.backends.chainer import ChainerBackend

import tokenjournal as tj
from tokenjournal._seal import PREFIX, Unopenable, is_sealed, key_id_of

from .conftest import modules_loaded

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
WHERE = {"account": "default", "column": "accounts.refresh_token", "generation": 3}
#: What every refusal of a key source offers instead (the user's way out, so pinned whole).
ALTERNATIVES = (
    "Seal.from_key_file(path) (a 0600 file of 32 random bytes), "
    "Seal.from_env(NAME) (base64, e.g. from a secrets manager) or "
    "Seal.from_systemd_credential(NAME) (systemd-creds, TPM-backed where available)"
)


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring that keeps passwords in a dict: the "real backend" of these tests."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


class ForgetfulKeyring(MemoryKeyring):
    """A keyring that says yes to every key and keeps none."""

    def set_password(self, service: str, username: str, password: str) -> None:
        pass


class LockedKeyring(MemoryKeyring):
    """A keyring whose collection the user has not unlocked."""

    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("the collection is locked")


class UselessChain(ChainerBackend):
    """keyring's chainer over backends none of which would keep a key."""

    backends: ClassVar[list[keyring.backend.KeyringBackend]] = [  # type: ignore[misc]
        keyring.backends.fail.Keyring(),
        keyring.backends.null.Keyring(),
    ]


class MemoryChain(ChainerBackend):
    """keyring's chainer over one real backend (what a desktop's default looks like)."""

    backends: ClassVar[list[keyring.backend.KeyringBackend]] = [MemoryKeyring()]  # type: ignore[misc]


class EmptyChain(ChainerBackend):
    """keyring's chainer with nothing to chain (what a headless box without D-Bus has)."""

    backends: ClassVar[list[keyring.backend.KeyringBackend]] = []  # type: ignore[misc]


@pytest.fixture
def restore_keyring() -> Iterator[None]:
    before = keyring.get_keyring()
    try:
        yield
    finally:
        keyring.set_keyring(before)


# ----------------------------------------------------------------------------- the cipher


def test_a_sealed_value_opens_only_where_it_was_sealed() -> None:
    seal = tj.Seal(KEY)
    sealed = seal.seal("r-secret", **WHERE)  # type: ignore[arg-type]
    assert "r-secret" not in sealed and is_sealed(sealed) and key_id_of(sealed) == seal.key_id
    assert seal.open(sealed, **WHERE) == "r-secret"  # type: ignore[arg-type]
    for moved in (
        {**WHERE, "account": "other"},
        {**WHERE, "column": "accounts.access_token"},
        {**WHERE, "generation": 4},
    ):
        with pytest.raises(Unopenable, match="does not open"):
            seal.open(sealed, **moved)  # type: ignore[arg-type]


def test_a_fresh_nonce_per_write_and_a_tampered_value_does_not_open() -> None:
    seal = tj.Seal(KEY)
    one, two = (seal.seal("same", **WHERE) for _ in range(2))  # type: ignore[arg-type]
    assert one != two
    raw = bytearray(base64.urlsafe_b64decode(one[len(PREFIX) + 9 :]))
    raw[-1] ^= 1
    tampered = one[: len(PREFIX) + 9] + base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(Unopenable):
        seal.open(tampered, **WHERE)  # type: ignore[arg-type]


def test_another_key_does_not_open_and_names_the_key_it_needs() -> None:
    sealed = tj.Seal(KEY).seal("x", **WHERE)  # type: ignore[arg-type]
    with pytest.raises(Unopenable, match=tj.Seal(KEY).key_id):
        tj.Seal(OTHER).open(sealed, **WHERE)  # type: ignore[arg-type]


def test_previous_keys_open_old_values_and_new_ones_use_the_new_key() -> None:
    old = tj.Seal(KEY)
    rotated = tj.Seal(OTHER, previous=[old])
    sealed = old.seal("x", **WHERE)  # type: ignore[arg-type]
    assert rotated.open(sealed, **WHERE) == "x"  # type: ignore[arg-type]
    assert key_id_of(rotated.seal("x", **WHERE)) == rotated.key_id  # type: ignore[arg-type]
    assert rotated.key_ids == (rotated.key_id, old.key_id)
    # A chain of rotations keeps every older key.
    third = tj.Seal(os.urandom(32), previous=[rotated])
    assert set(third.key_ids) == {third.key_id, rotated.key_id, old.key_id}


def test_repr_shows_key_ids_only_and_a_seal_is_never_pickled() -> None:
    seal = tj.Seal(KEY, previous=[OTHER])
    text = repr(seal)
    assert seal.key_id in text and tj.Seal(OTHER).key_id in text
    for secret in (KEY, OTHER):
        assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
    assert seal.key_id not in KEY.hex()  # the id is derived, not a piece of the key
    with pytest.raises(TypeError) as err:
        pickle.dumps(seal)
    assert str(err.value) == "a Seal is not pickled: it would write the key somewhere"


def test_fingerprints_are_keyed() -> None:
    assert tj.Seal(KEY).fingerprint("t") != tj.Seal(OTHER).fingerprint("t")
    assert tj.Seal(KEY).fingerprint("t") != tj.fingerprint("t")
    assert tj.Seal(KEY).fingerprint(None) == "-"


def test_import_tokenjournal_loads_neither_cryptography_nor_keyring() -> None:
    steps = ["import tokenjournal", "tokenjournal.Seal(bytes(32))"]
    assert modules_loaded(steps, ("cryptography", "keyring")) == [[], ["cryptography"]]


# ----------------------------------------------------------------------------- key files


def test_a_missing_key_file_is_made_0600_with_32_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "journal.key"
    made = tj.Seal.from_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert tj.Seal.from_key_file(path).key_id == made.key_id  # the same key next time
    assert tj.Seal.from_key_file(tmp_path / "other.key").key_id != made.key_id


def test_a_key_file_loaded_with_create_false_is_never_made(tmp_path: Path) -> None:
    """An old key (``reseal --previous-key-file``) is loaded: a mistyped path is an error."""
    path = tmp_path / "old.key"
    with pytest.raises(ValueError, match=f"key file {path} does not exist"):
        tj.Seal.from_key_file(path, create=False)
    assert not path.exists()
    path.write_bytes(KEY)
    path.chmod(0o600)
    assert tj.Seal.from_key_file(path, create=False).key_id == tj.Seal(KEY).key_id


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_key_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "journal.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=f"holds {size} bytes, not 32"):
        tj.Seal.from_key_file(path)


@pytest.mark.parametrize(
    "mode", [0o644, 0o604, 0o602, 0o666, 0o620, 0o660, 0o670, 0o610], ids=lambda mode: f"{mode:o}"
)
def test_a_key_file_open_to_others_or_to_its_group_s_writes_is_refused(
    tmp_path: Path, mode: int
) -> None:
    """Other users could read the key; a group member could swap in a key they know before
    the first seal."""
    path = tmp_path / "journal.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    with pytest.raises(ValueError, match="open to other users or writable by its group"):
        tj.Seal.from_key_file(path)


def test_a_key_file_of_another_user_a_link_or_a_fifo_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink planted at the key's path named the attacker's own file; a FIFO there
    hung every start in open(); a file another user owns could hold a key they chose."""
    theirs = tmp_path / "theirs.key"
    theirs.write_bytes(KEY)
    theirs.chmod(0o600)
    (tmp_path / "link.key").symlink_to(theirs)
    with pytest.raises(ValueError, match="is a symbolic link"):
        tj.Seal.from_key_file(tmp_path / "link.key")
    os.mkfifo(tmp_path / "fifo.key", 0o600)
    with pytest.raises(ValueError, match="is not a regular file"):
        tj.Seal.from_key_file(tmp_path / "fifo.key")
    real = os.fstat

    def owned_by(uid: int) -> None:
        def fstat(fd: int) -> os.stat_result:
            info = real(fd)
            return os.stat_result((*info[:4], uid, *info[5:]))

        monkeypatch.setattr(os, "fstat", fstat)

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # a service's own user
    owned_by(4242)  # another (non-root) user's file
    with pytest.raises(ValueError, match=r"belongs to user 4242, neither .* \(1000\) nor root"):
        tj.Seal.from_key_file(theirs)
    for owner in (0, 1000):  # root's 640 for the service's group, or the service's own
        owned_by(owner)
        assert tj.Seal.from_key_file(theirs).key_id == tj.Seal(KEY).key_id


def test_a_new_key_file_is_whole_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file was created empty, then written: a process killed in between left a short
    key that every later start refused ("holds 0 bytes"), and a second process starting at
    once read the empty file."""
    path = tmp_path / "journal.key"
    real_write = os.write

    def dies(fd: int, data: bytes) -> int:
        raise KeyboardInterrupt  # the process ends between creating and writing the key

    monkeypatch.setattr(os, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        tj.Seal.from_key_file(path)
    monkeypatch.setattr(os, "write", real_write)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert len(tj.Seal.from_key_file(path).key_id) > 0
    assert path.stat().st_size == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_new_key_is_made_beside_its_name_and_a_killed_making_leaves_a_named_leftover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary key is made in the key's own folder (a link cannot cross file systems,
    and /tmp may be another one), under a name that says what it is, hidden."""
    linked: list[tuple[str, str]] = []
    real_link = os.link

    def link(src: str, dst: Path) -> None:
        linked.append((os.path.dirname(src), os.path.basename(src)))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    tj.Seal.from_key_file(tmp_path / "journal.key")
    ((folder, name),) = linked
    assert folder == str(tmp_path) and name.startswith(".tokenjournal-key-")

    def killed(src: str, dst: Path) -> None:
        raise KeyboardInterrupt  # killed before the link, and before any clean-up

    monkeypatch.setattr(os, "link", killed)
    monkeypatch.setattr(os, "unlink", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        tj.Seal.from_key_file(tmp_path / "other.key")
    (leftover,) = [p.name for p in tmp_path.iterdir() if p.name != "journal.key"]
    assert leftover.startswith(".tokenjournal-key-")


def test_a_key_that_cannot_be_linked_or_opened_says_where_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    path = tmp_path / "journal.key"
    with monkeypatch.context() as patch:
        patch.setattr(os, "link", refuse)
        with pytest.raises(ValueError) as err:
            tj.Seal.from_key_file(path)
    assert str(err.value) == f"cannot create the key file {path}: Permission denied"
    assert list(tmp_path.iterdir()) == []  # the temporary key is gone with the failure
    path.write_bytes(KEY)
    path.chmod(0o600)
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ValueError) as err:
        tj.Seal.from_key_file(path, create=False)
    assert str(err.value) == f"cannot read the key file {path}: Permission denied"


def test_first_starts_at_once_all_get_the_one_key(tmp_path: Path) -> None:
    for round_ in range(20):
        path = tmp_path / f"journal-{round_}.key"
        start = threading.Barrier(8)

        def load(path: Path = path, start: threading.Barrier = start) -> str:
            start.wait()
            return tj.Seal.from_key_file(path).key_id

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: load(), range(8)))
        assert len(set(ids)) == 1, round_


def test_a_key_file_for_a_service_group_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "journal.key"
    path.write_bytes(KEY)
    path.chmod(0o640)
    assert tj.Seal.from_key_file(path).key_id == tj.Seal(KEY).key_id


def test_key_file_rotation_keeps_the_old_key_as_previous(tmp_path: Path) -> None:
    old = tj.Seal.from_key_file(tmp_path / "old.key")
    new = tj.Seal.from_key_file(tmp_path / "new.key", previous=[old])
    assert new.key_ids == (new.key_id, old.key_id)


# ----------------------------------------------------------------------------- env, systemd


def test_from_env_reads_base64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TJ_TEST_KEY", base64.b64encode(KEY).decode())
    assert tj.Seal.from_env("TJ_TEST_KEY").key_id == tj.Seal(KEY).key_id
    monkeypatch.setenv("TJ_TEST_KEY", base64.b64encode(KEY[:16]).decode())
    with pytest.raises(ValueError, match="16 bytes, not 32") as err:
        tj.Seal.from_env("TJ_TEST_KEY")
    assert base64.b64encode(KEY[:16]).decode() not in str(err.value)
    monkeypatch.setenv("TJ_TEST_KEY", "not base64 !!")
    with pytest.raises(ValueError, match="not base64"):
        tj.Seal.from_env("TJ_TEST_KEY")
    monkeypatch.delenv("TJ_TEST_KEY")
    with pytest.raises(ValueError, match="TJ_TEST_KEY is not set"):
        tj.Seal.from_env("TJ_TEST_KEY")


def test_from_systemd_credential_reads_raw_or_base64(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ValueError, match="CREDENTIALS_DIRECTORY"):
        tj.Seal.from_systemd_credential("journal-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "raw").write_bytes(KEY)
    (tmp_path / "b64").write_text(base64.b64encode(KEY).decode() + "\n")
    assert tj.Seal.from_systemd_credential("raw").key_id == tj.Seal(KEY).key_id
    assert tj.Seal.from_systemd_credential("b64").key_id == tj.Seal(KEY).key_id
    with pytest.raises(ValueError, match="cannot read systemd credential missing"):
        tj.Seal.from_systemd_credential("missing")
    with pytest.raises(ValueError, match="not a credential name"):
        tj.Seal.from_systemd_credential("../raw")


# ----------------------------------------------------------------------------- keyring


@pytest.mark.parametrize(
    "backend",
    [keyring.backends.fail.Keyring(), keyring.backends.null.Keyring(), EmptyChain()],
    ids=["fail", "null", "empty-chain"],
)
@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_without_a_real_backend_names_the_alternatives(
    backend: keyring.backend.KeyringBackend,
) -> None:
    keyring.set_keyring(backend)
    with pytest.raises(RuntimeError, match="no usable keyring") as err:
        tj.Seal.from_keyring("myapp")
    for alternative in ("from_key_file", "from_env", "from_systemd_credential"):
        assert alternative in str(err.value)


@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_refuses_a_plain_text_backend() -> None:
    class PlaintextKeyring(MemoryKeyring):
        """Stands for keyrings.alt's file backend: the key would sit in clear on disk."""

    keyring.set_keyring(PlaintextKeyring())
    with pytest.raises(RuntimeError, match="plain text"):
        tj.Seal.from_keyring("myapp")


@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_makes_the_key_once_and_finds_it_again() -> None:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    first = tj.Seal.from_keyring("myapp")
    assert len(base64.b64decode(backend.entries[("myapp", "journal-key")])) == 32
    assert tj.Seal.from_keyring("myapp").key_id == first.key_id
    assert tj.Seal.from_keyring("otherapp").key_id != first.key_id


# ----------------------------------------------------------------------------- exact refusals


def test_a_new_key_file_is_never_open_to_others_not_even_before_its_chmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another user who opens the file in the moment between its creation and the chmod
    # keeps that descriptor and reads the key once written: the file must be born 0600.
    born: list[int] = []
    real_fchmod = os.fchmod

    def fchmod(fd: int, mode: int) -> None:
        born.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    before = os.umask(0)  # the worst umask: the mode os.open is given is all that counts
    try:
        tj.Seal.from_key_file(tmp_path / "journal.key")
    finally:
        os.umask(before)
    assert born == [0o600]
    assert stat.S_IMODE((tmp_path / "journal.key").stat().st_mode) == 0o600


def test_a_key_file_that_cannot_be_made_or_read_says_where_and_why(tmp_path: Path) -> None:
    nowhere = tmp_path / "missing" / "journal.key"
    with pytest.raises(ValueError) as err:
        tj.Seal.from_key_file(nowhere)
    assert str(err.value) == f"cannot create the key file {nowhere}: No such file or directory"
    folder = tmp_path / "journal.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(ValueError) as err:
        tj.Seal.from_key_file(folder)
    assert str(err.value) == f"cannot read the key file {folder}: Is a directory"


def test_a_huge_file_at_the_key_path_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.key"
    with open(path, "wb") as file:
        file.truncate(1 << 30)  # sparse: a gigabyte that takes no disk
    path.chmod(0o600)
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # Room for this test, none for the file: reading it whole would be a MemoryError.
    resource.setrlimit(resource.RLIMIT_AS, ((used << 10) + (256 << 20), hard))
    try:
        with pytest.raises(ValueError) as err:
            tj.Seal.from_key_file(path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert str(err.value) == f"key file {path} holds {1 << 30} bytes, not 32: not a seal key"


def test_from_env_says_exactly_what_is_wrong_and_keeps_previous_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refusal() -> str:
        with pytest.raises(ValueError) as err:
            tj.Seal.from_env("TJ_TEST_KEY")
        return str(err.value)

    monkeypatch.delenv("TJ_TEST_KEY", raising=False)
    assert refusal() == "environment variable TJ_TEST_KEY is not set (a base64 seal key)"
    monkeypatch.setenv("TJ_TEST_KEY", "not base64 !!")
    assert refusal() == "environment variable TJ_TEST_KEY is not base64"
    monkeypatch.setenv("TJ_TEST_KEY", base64.b64encode(KEY[:16]).decode())
    assert refusal() == "environment variable TJ_TEST_KEY decodes to 16 bytes, not 32"
    monkeypatch.setenv("TJ_TEST_KEY", base64.b64encode(KEY).decode())
    rotated = tj.Seal.from_env("TJ_TEST_KEY", previous=[OTHER])
    assert rotated.key_ids == (tj.Seal(KEY).key_id, tj.Seal(OTHER).key_id)


@pytest.mark.parametrize(
    "garbage",
    [
        "!" + base64.b64encode(KEY).decode(),
        base64.b64encode(KEY).decode()[:20] + "*#" + base64.b64encode(KEY).decode()[20:],
        base64.b64encode(KEY).decode() + " x",
    ],
    ids=["leading", "inside", "trailing"],
)
def test_a_base64_key_with_stray_characters_is_refused_not_read_around_them(
    monkeypatch: pytest.MonkeyPatch, garbage: str
) -> None:
    monkeypatch.setenv("TJ_TEST_KEY", garbage)
    with pytest.raises(ValueError) as err:
        tj.Seal.from_env("TJ_TEST_KEY")
    assert str(err.value) == "environment variable TJ_TEST_KEY is not base64"


def test_a_url_safe_base64_key_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    key = bytes([0xFB, 0xFF] * 16)  # base64 of these needs the two alphabets' extra digits
    text = base64.urlsafe_b64encode(key).decode()
    assert "-" in text and "_" in text
    monkeypatch.setenv("TJ_TEST_KEY", text + "\n")
    assert tj.Seal.from_env("TJ_TEST_KEY").key_id == tj.Seal(key).key_id


def test_from_systemd_credential_says_exactly_what_is_wrong_and_keeps_previous_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusal(name: str) -> str:
        with pytest.raises(ValueError) as err:
            tj.Seal.from_systemd_credential(name)
        return str(err.value)

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert refusal("journal-key") == (
        "no $CREDENTIALS_DIRECTORY: credential journal-key was not passed by systemd "
        "(LoadCredential= / LoadCredentialEncrypted= in the unit)"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for name in ("", ".", "..", "../raw", "a/b"):
        assert refusal(name) == f"{name!r} is not a credential name"
    (tmp_path / "binary").write_bytes(b"\xff" * 16)
    assert refusal("binary") == "systemd credential binary is neither 32 bytes nor base64"
    (tmp_path / "text").write_text("not a key!\n")
    assert refusal("text") == "systemd credential text is not base64"
    (tmp_path / "raw").write_bytes(KEY)
    (tmp_path / "b64").write_text(base64.b64encode(KEY).decode() + "\n")
    for name in ("raw", "b64"):
        rotated = tj.Seal.from_systemd_credential(name, previous=[OTHER])
        assert rotated.key_ids == (tj.Seal(KEY).key_id, tj.Seal(OTHER).key_id)


def _keyring_refusal(kind: type[Exception], service: str = "myapp") -> str:
    with pytest.raises(kind) as err:
        tj.Seal.from_keyring(service)
    return str(err.value)


@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_names_the_backend_it_refuses() -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    assert _keyring_refusal(RuntimeError) == (
        "no usable keyring on this machine (backend: keyring.backends.fail.Keyring); "
        f"a seal key would be lost or kept in plain text. Use {ALTERNATIVES}"
    )
    keyring.set_keyring(UselessChain())
    assert _keyring_refusal(RuntimeError) == (
        f"no usable keyring on this machine (backend: {__name__}.UselessChain); "
        f"a seal key would be lost or kept in plain text. Use {ALTERNATIVES}"
    )


@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_uses_a_chain_that_holds_a_real_backend() -> None:
    keyring.set_keyring(MemoryChain())
    first = tj.Seal.from_keyring("myapp")
    assert tj.Seal.from_keyring("myapp").key_id == first.key_id


@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_refuses_a_keyring_that_drops_the_key_or_is_locked() -> None:
    keyring.set_keyring(ForgetfulKeyring())
    assert _keyring_refusal(RuntimeError) == (
        f"the keyring ({__name__}.ForgetfulKeyring) did not keep the seal key; use {ALTERNATIVES}"
    )
    keyring.set_keyring(LockedKeyring())
    text = _keyring_refusal(RuntimeError)
    assert text == (
        f"the keyring ({__name__}.LockedKeyring) failed: KeyringLocked; "
        f"unlock it, or use {ALTERNATIVES}"
    )


@pytest.mark.usefixtures("restore_keyring")
def test_from_keyring_reads_a_stored_key_checks_it_and_keeps_previous_keys() -> None:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    backend.entries[("myapp", "journal-key")] = base64.b64encode(KEY).decode()
    rotated = tj.Seal.from_keyring("myapp", previous=[OTHER])
    assert rotated.key_ids == (tj.Seal(KEY).key_id, tj.Seal(OTHER).key_id)
    backend.entries[("myapp", "journal-key")] = "not a key!"
    assert _keyring_refusal(ValueError) == "keyring entry myapp/journal-key is not base64"


# ----------------------------------------------------------------------------- the format

#: Known answers for KEY: a journal sealed by this version must open in every later one, so
#: the key derivation, the associated data and the encoding are pinned, not just round-tripped.
KEY_ID = "fb53190e"
OTHER_ID = "15c75852"
NONCE = b"\x02" * 12
SEALED = "tjs1:fb53190e:AgICAgICAgICAgIC_imGsTYBz2xxkboZ__w4q5_dD2n6QKO-"


def test_known_answers_key_ids_fingerprints_and_a_sealed_value() -> None:
    seal = tj.Seal(KEY)
    assert (seal.key_id, tj.Seal(OTHER).key_id) == (KEY_ID, OTHER_ID)
    assert (seal.fingerprint("t"), seal.fingerprint("r-secret")) == ("420c690a", "61aa8e99")
    assert seal.open(SEALED, **WHERE) == "r-secret"  # type: ignore[arg-type]


def test_a_sealed_value_is_prefix_key_id_colon_and_url_safe_base64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: NONCE[:n])
    assert tj.Seal(KEY).seal("r-secret", **WHERE) == SEALED  # type: ignore[arg-type]


def test_a_seal_key_is_32_bytes_or_a_bytearray_of_them() -> None:
    assert tj.Seal(bytearray(KEY)).key_id == KEY_ID
    for bad in (KEY[:31], KEY + b"\0", "k" * 32, list(KEY)):
        with pytest.raises(ValueError) as err:
            tj.Seal(bad)  # type: ignore[arg-type]
        assert str(err.value) == "a seal key is 32 bytes"


def test_previous_keys_are_listed_once_and_never_the_current_key() -> None:
    seal = tj.Seal(KEY, previous=[KEY, OTHER, tj.Seal(OTHER), tj.Seal(OTHER, previous=[KEY])])
    assert seal.key_ids == (KEY_ID, OTHER_ID)
    assert repr(seal) == f"Seal(key_id='{KEY_ID}', previous=['{OTHER_ID}'])"
    assert repr(tj.Seal(KEY)) == f"Seal(key_id='{KEY_ID}')"
    assert tj.Seal(KEY).key_ids == (KEY_ID,)


def test_open_says_which_key_it_lacks_or_that_the_value_does_not_belong() -> None:
    with pytest.raises(Unopenable) as err:
        tj.Seal(OTHER).open(SEALED, **WHERE)  # type: ignore[arg-type]
    assert str(err.value) == f"sealed with key id {KEY_ID}, which this seal does not hold"
    with pytest.raises(Unopenable) as err:
        tj.Seal(KEY).open(SEALED, **{**WHERE, "generation": 4})  # type: ignore[arg-type]
    assert str(err.value) == (
        f"does not open with key id {KEY_ID} for this account, column and generation "
        "(copied from another row, or altered)"
    )
    for broken in (SEALED[:-1], SEALED[:14], SEALED[:14] + "!!!!"):
        with pytest.raises(Unopenable, match="does not open"):
            tj.Seal(KEY).open(broken, **WHERE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "kid"),
    [
        (SEALED, KEY_ID),
        ("tjs1:abcdefgh:", "abcdefgh"),
        ("tjs1:abcdefgh", "?"),
        ("tjs1:abcdefg:x", "?"),
        ("tjs1:abcdefghx", "?"),
        ("tjs1:abc", "?"),
        ("tjs1:", "?"),
        ("TJS1:abcdefgh:x", "?"),
        ("abcd:abcdefgh:x", "?"),
    ],
)
def test_key_id_of_reads_only_a_well_formed_head(value: str, kid: str) -> None:
    assert key_id_of(value) == kid


def test_is_sealed_only_for_text_that_starts_with_the_prefix() -> None:
    assert is_sealed(SEALED) and is_sealed("tjs1:")
    for value in (None, 42, b"tjs1:abcdefgh:x", "TJS1:abcdefgh:x", "r-secret", "", "xtjs1:"):
        assert not is_sealed(value)
