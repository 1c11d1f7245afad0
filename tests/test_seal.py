"""The seal itself (invariant 15): AES-256-GCM, values bound to their row, key sources that
refuse what would not keep a key safe, key ids that say nothing about the key."""

from __future__ import annotations

import base64
import os
import pickle
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.backends.null
import pytest
from keyring.backends.chainer import ChainerBackend

import tokenjournal as tj
from tokenjournal._seal import PREFIX, Unopenable, is_sealed, key_id_of

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
WHERE = {"account": "default", "column": "accounts.refresh_token", "generation": 3}


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
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(seal)


def test_fingerprints_are_keyed() -> None:
    assert tj.Seal(KEY).fingerprint("t") != tj.Seal(OTHER).fingerprint("t")
    assert tj.Seal(KEY).fingerprint("t") != tj.fingerprint("t")
    assert tj.Seal(KEY).fingerprint(None) == "-"


def test_import_tokenjournal_loads_neither_cryptography_nor_keyring() -> None:
    code = (
        "import sys, tokenjournal\n"
        "print(sorted(m for m in ('cryptography', 'keyring') if m in sys.modules))\n"
        "tokenjournal.Seal(bytes(32))\n"
        "print('cryptography' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


# ----------------------------------------------------------------------------- key files


def test_a_missing_key_file_is_made_0600_with_32_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "journal.key"
    made = tj.Seal.from_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert tj.Seal.from_key_file(path).key_id == made.key_id  # the same key next time
    assert tj.Seal.from_key_file(tmp_path / "other.key").key_id != made.key_id


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_key_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "journal.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=f"holds {size} bytes, not 32"):
        tj.Seal.from_key_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666])
def test_a_key_file_other_users_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "journal.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    with pytest.raises(ValueError, match="by every user"):
        tj.Seal.from_key_file(path)


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
