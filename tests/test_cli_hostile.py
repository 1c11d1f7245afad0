"""The command line against hostile input: tampered journals, odd paths and numbers, secrets
in URLs, Ctrl-C at start. Each test pins a defect a hostile review of the CLI found."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import itertools
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

import tokenjournal as tj
from tokenjournal._journal import Holder
from tokenjournal._outbox import OutboxStats
from tokenjournal._terminal import is_clean
from tokenjournal.cli import main
from tokenjournal.cli.conformance import ConformanceOptions
from tokenjournal.cli.status import _outbox_line, read_journal, render_text
from tokenjournal.server import ServerConfig, run

NOW = 1_800_000_000.0
KEY = bytes(range(32))
ESC = "\x1b]0;pwned-title\x07\x1b[2J\x1b[1;1HALL GOOD"
RED = "\x1b[31mFAKE\x1b[0m\r"


def pair(n: int) -> tj.TokenSet:
    at = datetime.fromtimestamp(NOW, tz=UTC)
    return tj.TokenSet(f"access-secret-{n}", f"refresh-secret-{n}", at + timedelta(hours=1), at)


async def _build(path: Path, seal: tj.Seal | None = None, account: str = "alice") -> None:
    journal = tj.SQLiteJournal(path, seal=seal)
    await journal.open()
    try:
        await journal.store_tokens(account, pair(1), NOW)
        holder = Holder(f"{ESC}:4242:abcd", 4242, "otherhost")
        await journal.begin_refresh(account, holder, 1, NOW + 10, 30.0)
    finally:
        await journal.close()


def build(path: Path, seal: tj.Seal | None = None, account: str = "alice") -> Path:
    asyncio.run(_build(path, seal, account))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def key_file(tmp_path: Path, name: str = "key.bin", key: bytes = KEY) -> Path:
    path = tmp_path / name
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The stderr of an argparse refusal (status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    err: str = capsys.readouterr().err
    return err


# ------------------------------------------------------------ 1. status: every field escaped


def test_status_escapes_every_journal_string_a_tampered_journal_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fingerprints, key ids, the device id, an ended code, an intent's fingerprint, a lease
    holder and the account name of an edited journal reach the terminal escaped (the
    fingerprint columns were printed raw)."""
    path = build(tmp_path / "tokens.db", tj.Seal(KEY), account=f"{RED}alice")
    build(tmp_path / "tokens.db", tj.Seal(KEY), account="bob")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "UPDATE accounts SET access_fp = ?, refresh_fp = ?, sealed_by = ?", (ESC, RED, RED)
        )
        db.execute("UPDATE intents SET refresh_fp = ?", (RED,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'device_id'", (ESC,))
        db.execute(
            "UPDATE accounts SET access_token = NULL, refresh_token = NULL, ended_code = ?,"
            " ended_at = ? WHERE account = 'bob'",
            (RED, NOW),
        )
    db.close()
    code, out, err = run_main(capsys, "status", "--journal", str(path))
    assert (code, err) == (0, "")
    assert is_clean(out), out
    assert "\\x1b]0;pwned-title\\x07\\x1b[2J" in out  # shown escaped, not dropped
    assert "refresh     \\x1b[31mFAKE\\x1b[0m\\x0d\n" in out
    assert "access      \\x1b]0;pwned-title\\x07\\x1b[2J\\x1b[1;1HALL GOOD, expires" in out
    assert "at rest     sealed (key id \\x1b[31mFAKE" in out
    assert "ended by the server: \\x1b[31mFAKE" in out


# ------------------------------------------------------------ 2. serve: port and --db


@pytest.mark.parametrize("port", ["-1", "65536", "99999999999999999999"])
def test_serve_port_outside_0_to_65535_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    err = usage_error(capsys, "serve", "--test-mode", "--port", port)
    assert "argument --port: a port is 0-65535" in err and "Traceback" not in err


def test_serve_run_refuses_a_port_out_of_range_before_binding() -> None:
    with pytest.raises(ValueError, match="0-65535"):
        run(ServerConfig(test_mode=True), "127.0.0.1", 65536)


def _serve_db(capsys: pytest.CaptureFixture[str], db: Path) -> str:
    code, out, err = run_main(capsys, "serve", "--test-mode", "--port", "0", "--db", str(db))
    assert code == 1 and out == ""
    assert err.startswith(f"tokenjournal serve: cannot use {db} as the server's database: ")
    assert err.count("\n") == 1, err
    return err


def test_serve_db_that_is_a_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _serve_db(capsys, tmp_path).endswith(": it is not a file\n")


def test_serve_db_of_random_bytes_is_one_line_and_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "random.db"
    db.write_bytes(bytes(range(256)) * 20)
    before = digest(db)
    assert "file is not a database" in _serve_db(capsys, db)
    assert digest(db) == before


def test_serve_db_that_is_a_client_journal_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _serve_db(capsys, build(tmp_path / "tokens.db"))
    assert "schema" in err and "newer than this server" in err


def test_serve_db_in_a_missing_folder_is_not_called_a_listen_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _serve_db(capsys, tmp_path / "nowhere" / "server.db")
    assert "No such file or directory" in err and "listen" not in err


# ------------------------------------------------------------ 3. reseal: a previous key loads


def test_reseal_missing_previous_key_file_is_an_error_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = build(tmp_path / "tokens.db", tj.Seal(KEY))
    before = digest(journal)
    typo = tmp_path / "old.kye"
    code, out, err = run_main(
        capsys,
        "reseal",
        "--journal",
        str(journal),
        "--key-file",
        str(key_file(tmp_path)),
        "--previous-key-file",
        str(typo),
    )
    assert (code, out) == (1, "")
    assert err == f"tokenjournal reseal: --previous-key-file: key file {typo} does not exist\n"
    assert not typo.exists()
    assert digest(journal) == before


# ------------------------------------------------------------ 4. conformance: no userinfo


@pytest.mark.parametrize(
    "url",
    ["http://demo:hunter2@127.0.0.1:9", "http://:hunter2@127.0.0.1:9", "ftp://u:hunter2@h"],
)
@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_conformance_refuses_a_password_in_the_url_and_never_prints_it(
    capsys: pytest.CaptureFixture[str], url: str, json_flag: tuple[str, ...]
) -> None:
    code, out, err = run_main(capsys, "conformance", url, *json_flag)
    assert (code, out) == (2, "")
    assert "hunter2" not in err and err.count("\n") == 1
    assert "user name or password" in err and "--password-env" in err and " ps" in err


def test_conformance_refuses_userinfo_in_the_token_url() -> None:
    with pytest.raises(ValueError, match="--token-url holds a user name") as refused:
        ConformanceOptions(
            "http://127.0.0.1:9", protocol="oauth2", token_url="http://me:hunter2@h/token"
        )
    assert "hunter2" not in str(refused.value)


def test_conformance_options_refuse_userinfo_for_library_callers() -> None:
    with pytest.raises(ValueError, match="user name or password"):
        ConformanceOptions("http://demo@127.0.0.1:9")
    ConformanceOptions("http://127.0.0.1:9/a@b")  # an @ in the path is no userinfo


# ------------------------------------------------------------ 5. Ctrl-C while starting


def _interrupt(*args: object, **kwargs: object) -> NoReturn:
    raise KeyboardInterrupt


def _quiet_130(capsys: pytest.CaptureFixture[str], *argv: str) -> None:
    try:
        code = main(list(argv))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while the command line starts escaped main (a traceback)")
    assert code == 130
    assert capsys.readouterr() == ("", "")


def test_ctrl_c_while_the_commands_load_exits_130_quietly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def loading(name: str, package: str | None = None) -> ModuleType:
        if name == "tokenjournal.cli.serve":
            raise KeyboardInterrupt
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", loading)
    _quiet_130(capsys, "status", "--journal", "x.db")


def test_ctrl_c_while_the_arguments_are_parsed_exits_130_quietly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", _interrupt)
    _quiet_130(capsys, "status", "--journal", "x.db")


def test_a_real_sigint_while_the_commands_load_exits_130_without_a_traceback() -> None:
    """The signal itself, raised (no timing) as the first subcommand module is imported."""
    code = (
        "import importlib, signal, sys\n"
        # A background job (CI under nohup, `cmd &`) starts with SIGINT ignored, and then
        # Python installs no KeyboardInterrupt handler: give it the one a terminal gives.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import tokenjournal.cli as cli\n"
        "real = importlib.import_module\n"
        "def loading(name, package=None):\n"
        "    if name == 'tokenjournal.cli.demo':\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "    return real(name, package)\n"
        "importlib.import_module = loading\n"
        "sys.exit(cli.main(['status', '--journal', 'x.db']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TOKENJOURNAL_CRASH_AT"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")


# ------------------------------------------------------------ 6. the minor ones


def test_status_shows_an_intent_started_in_the_future_as_such(tmp_path: Path) -> None:
    """The clock was stepped back a day since the refresh began: not "1d 0h ago"."""
    path = build(tmp_path / "tokens.db")
    status = asyncio.run(read_journal(path, now=NOW - 86400))
    text = render_text(status)
    assert "started 2027-01-15 08:00:10Z (1d 0h in the future)" in text, text
    assert "ago" not in text.split("intent", 1)[1].split("\n", 1)[0]
    past = render_text(asyncio.run(read_journal(path, now=NOW + 70)))
    assert "started 2027-01-15 08:00:10Z (1m 00s ago)" in past


def test_status_shows_an_outbox_item_from_the_future_as_such() -> None:
    line = _outbox_line(OutboxStats("a", "b", 1, 0, 0, 0, 0, oldest_age=-120.0))
    assert line.endswith("oldest 2m 00s in the future")
    assert _outbox_line(OutboxStats("a", "b", 1, 0, 0, 0, 0, 120.0)).endswith("2m 00s ago")


def _reason(err: str, command: str) -> str:
    prefix = f"tokenjournal {command}: "
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err.removeprefix(prefix)


def _status_and_reseal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, journal: Path
) -> tuple[str, str]:
    code, out, status_err = run_main(capsys, "status", "--journal", str(journal))
    assert (code, out) == (1, "")
    key = str(key_file(tmp_path))
    code, out, reseal_err = run_main(capsys, "reseal", "--journal", str(journal), "--key-file", key)
    assert (code, out) == (1, "")
    return _reason(status_err, "status"), _reason(reseal_err, "reseal")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_reseal_says_not_a_file_as_status_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    journal = tmp_path / "tokens.db"
    if kind == "folder":
        journal.mkdir()
    else:
        os.mkfifo(journal, 0o600)
    status, reseal = _status_and_reseal(capsys, tmp_path, journal)
    assert reseal == status == f"journal {journal} is not a file\n"


def test_reseal_refuses_an_empty_file_as_status_does_and_makes_no_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "tokens.db"
    journal.touch(0o600)
    status, reseal = _status_and_reseal(capsys, tmp_path, journal)
    assert reseal == status == f"journal {journal} is not a tokenjournal journal (schema 0)\n"
    assert journal.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.bin", "tokens.db"]


def test_reseal_refuses_an_sqlite_file_without_a_journal_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Schema 0, no tables (a creation that never got past its first page): no journal."""
    journal = tmp_path / "tokens.db"
    with contextlib.closing(sqlite3.connect(journal)) as db:
        db.execute("PRAGMA journal_mode = WAL")
    before = digest(journal)
    status, reseal = _status_and_reseal(capsys, tmp_path, journal)
    assert reseal == status == f"journal {journal} is not a tokenjournal journal (schema 0)\n"
    assert digest(journal) == before


@pytest.mark.parametrize("kind", ["missing", "folder", "empty"])
def test_reseal_of_no_journal_makes_no_new_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Regression: --key-file of a file not there yet made a new random key before the
    journal was refused (a mistyped --journal left a key that seals nothing)."""
    journal = tmp_path / "tokens.db"
    if kind == "folder":
        journal.mkdir()
    elif kind == "empty":
        journal.touch(0o600)
    key = tmp_path / "new.key"
    code, out, err = run_main(capsys, "reseal", "--journal", str(journal), "--key-file", str(key))
    assert (code, out) == (1, "")
    assert err.startswith(f"tokenjournal reseal: journal {journal} ")
    assert not key.exists()


def test_reseal_still_seals_a_plain_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = build(tmp_path / "tokens.db")
    key = str(key_file(tmp_path))
    code, out, err = run_main(capsys, "reseal", "--journal", str(journal), "--key-file", key)
    assert (code, err) == (0, "")
    assert f"sealed (key id {tj.Seal(KEY).key_id})" in out


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan"])
def test_conformance_refuses_a_non_finite_timeout_when_parsing(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    err = usage_error(capsys, "conformance", "http://127.0.0.1:9", "--timeout", value)
    assert "argument --timeout" in err and "run failed" not in err


def test_conformance_options_refuse_non_finite_numbers() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive finite number"):
        ConformanceOptions("http://127.0.0.1:9", timeout=float("inf"))
    with pytest.raises(ValueError, match="grace must be a finite number"):
        ConformanceOptions("http://127.0.0.1:9", grace=float("nan"))


def test_conformance_help_keeps_every_line_continuation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["conformance", "--help"])
    out = capsys.readouterr().out
    assert "--protocol oauth2 \\\n      --client-id myapp --username me" in out
    examples = out.split("examples:", 1)[1].splitlines()
    # a line that goes on ends in " \", and the next one is indented as its continuation
    for line, after in itertools.pairwise(examples):
        if after.startswith("      --"):
            assert line.endswith(" \\"), line
