"""The README's quickstart works as written (against the reference server on loopback)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import reference_server

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python quickstart"
    return blocks[0]


async def run(code: str) -> tuple[int, str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await child.communicate()
    return child.returncode or 0, out.decode()


async def test_quickstart_signs_in_once_and_then_reads_the_journal(
    server: ReferenceServer, tmp_path: Path
) -> None:
    code = quickstart()
    assert 'AUTH = "http://127.0.0.1:8787"' in code and "~/.local/state/myapp/tokens.db" in code
    code = code.replace("http://127.0.0.1:8787", server.url).replace(
        "~/.local/state/myapp/tokens.db", str(tmp_path / "myapp" / "tokens.db")
    )
    for _ in range(2):
        status, out = await run(code)
        assert status == 0, out
        assert out.startswith("200 {") and "demo@example.com" in out
    assert server.stats()["signins"] == 1  # the second run used the journal


async def test_quickstart_signs_in_again_after_the_server_forgot_the_session(
    tmp_path: Path,
) -> None:
    """A test server restarted with its in-memory store: SessionEnded, handled as written."""
    journal = str(tmp_path / "myapp" / "tokens.db")
    for run_number in range(2):
        async with reference_server() as server:  # a new server each time: it forgot us
            code = quickstart().replace("http://127.0.0.1:8787", server.url)
            status, out = await run(code.replace("~/.local/state/myapp/tokens.db", journal))
            assert status == 0, out
            assert "200 {" in out and "Traceback" not in out
            assert ("session ended (" in out) == (run_number == 1)


def oauth_quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if "sign_in_device" in b]
    assert found, "the README has no OAuth 2.0 device quickstart"
    return found[0]


async def test_oauth_device_quickstart_signs_in_once_then_reads_the_journal(tmp_path: Path) -> None:
    async with ReferenceServer(ServerConfig(test_mode=True, device_interval=1)) as server:
        code = oauth_quickstart().replace("http://127.0.0.1:8787", server.url)
        code = code.replace("~/.local/state/device_app/tokens.db", str(tmp_path / "tokens.db"))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert child.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(30):
            while not lines or "enter the code" not in lines[-1]:
                lines.append((await child.stdout.readline()).decode())
                assert lines[-1], "".join(lines)
            server.device_action(lines[-1].split()[-1], "approve")
            out = (await child.stdout.read()).decode()
            assert await child.wait() == 0, "".join(lines) + out
        assert out.startswith("200 {")
        status, again = await run(code)  # the second run reads the journal
        assert status == 0 and again.startswith("200 {"), again
        stats = server.stats()
        assert stats["device_authorizations"] == 1 and stats["signins"] == 1


def not_using_asyncio() -> str:
    """The four snippets of "Not using asyncio?", run one after the other."""
    section = README.read_text().split("## Not using asyncio?", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4, "the section shows the sync manager, its outbox, requests, httpx"
    return "\n".join(blocks)


def test_not_using_asyncio_snippets_run_as_written(tmp_path: Path) -> None:
    """Blocking clients: the reference server runs in a thread of this test's own."""
    from .harness.threaded import ThreadedReferenceServer

    with ThreadedReferenceServer() as server:
        code = not_using_asyncio().replace("http://127.0.0.1:8787", server.url)
        code = code.replace("~/.local/state/myapp/tokens.db", str(tmp_path / "tokens.db"))
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stdout + out.stderr
            assert out.stdout.count("demo@example.com") == 3, out.stdout
        assert server.stats()["signins"] == 1  # the second run used the journal
        readings = server.run(server.server.readings)
        assert [r["body"] for r in readings] == [{"t": 21.5}] * 2  # one per run


def outbox_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if 'tm.outbox("readings")' in b]
    assert found, "the README has no outbox example"
    return found[0]


async def test_outbox_example_delivers_once(server: ReferenceServer, tmp_path: Path) -> None:
    """The README's outbox example, as written, against the reference server's API."""
    import tokenjournal as tj

    path = str(tmp_path / "tokens.db")
    async with tj.TokenManager(server.url, journal=path) as tm:
        await tm.sign_in(email="demo@example.com", password="demo")
    body = "\n".join("    " + line for line in outbox_snippet().splitlines())
    scope: dict[str, object] = {"tj": tj, "AUTH": server.url, "API": server.url + "/api"}
    scope["path"] = path
    exec(f"async def example():\n{body}\n    return item_id, stats, dead", scope)
    item_id, stats, dead = await scope["example"]()  # type: ignore[operator]
    assert (stats.pending, stats.delivered, dead) == (0, 1, [])
    assert [r["key"] for r in server.readings()] == [item_id]
