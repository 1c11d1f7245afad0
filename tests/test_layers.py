"""The house: the package's import graph has no circle and no arrow running back up, and the
wheel holds the library, the reference server and the command, nothing only tests use.

The graph comes from ``grimp`` (it parses every import, function-level ones included).
Imports under ``if TYPE_CHECKING:`` are left out (grimp's ``exclude_type_checking_imports``):
they never run, so they cannot make a circle at import time; set ``COUNT_TYPE_CHECKING`` to
see them too.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import grimp
import pytest

import tokenjournal
from tokenjournal import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tokenjournal"
COUNT_TYPE_CHECKING = False

#: Top to bottom. A module may import its own layer and the ones below, never one above.
#: A module that is in no layer fails the test: give every new module its place here.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(f"{PACKAGE}{'.' if name else ''}{name}" for name in layer)
    for layer in (
        {"__main__", "cli"},  # the command (``cli.*`` belongs here too, see ``layer_of``)
        # ``testing.reference_server`` starts the reference server, so testing sits above it.
        {"testing"},
        {"server"},  # the reference server (``server.*``)
        {"adapters"},  # requests and httpx auth, over either manager
        {"sync"},  # the blocking manager
        {""},  # ``tokenjournal/__init__.py``: the public surface
        {"_manager", "_middleware", "_device", "_discovery", "_browser", "_listener"},
        # _outbox: its SQL is the journal's, the manager is seen through OutboxHost
        {"_journal", "_outbox", "_doorbell", "_transport", "_retry", "_events", "_faults"},
        {"_protocols"},
        {"_tokens", "_numbers", "_terminal", "_urls", "_errors", "_clock", "_seal"},
    )
)

#: Back-arrows tolerated for now: none (the manager's circles through _device and
#: _middleware are gone). A new one fails the checks below.
KNOWN_BACK_ARROWS: frozenset[tuple[str, str]] = frozenset()


@cache
def graph() -> grimp.ImportGraph:
    """The package's import graph (no cache folder is written)."""
    return grimp.build_graph(
        PACKAGE, exclude_type_checking_imports=not COUNT_TYPE_CHECKING, cache_dir=None
    )


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of ``module`` (a subpackage's modules share its layer)."""
    for prefix in (f"{PACKAGE}.cli", f"{PACKAGE}.server"):
        if module == prefix or module.startswith(prefix + "."):
            module = prefix
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")


def arrows(*, known: bool = False) -> Iterator[tuple[str, str]]:
    """Every import between two modules of the package (the known back-arrows only if asked)."""
    g = graph()
    for importer in sorted(g.modules):
        for imported in sorted(g.find_modules_directly_imported_by(importer)):
            if known or (importer, imported) not in KNOWN_BACK_ARROWS:
                yield importer, imported


def where(importer: str, imported: str) -> str:
    lines = [
        d["line_number"] for d in graph().get_import_details(importer=importer, imported=imported)
    ]
    return f"{importer} -> {imported} (line {', '.join(map(str, lines))})"


def circles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    succ: dict[str, list[str]] = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_this_checkout() -> None:
    """grimp reads the package the tests import (not another install of it)."""
    g = graph()
    assert f"{PACKAGE}._manager" in g.modules and f"{PACKAGE}.cli.demo" in g.modules
    assert Path(tokenjournal.__file__).resolve().is_relative_to(ROOT / "sdk")


def test_every_module_has_a_layer() -> None:
    for module in graph().modules:
        layer_of(module)


def test_no_import_runs_back_up() -> None:
    upward = [where(a, b) for a, b in arrows() if layer_of(a) > layer_of(b)]
    assert upward == [], "a lower layer imports a higher one:\n" + "\n".join(upward)


def test_no_circle() -> None:
    found = circles(list(arrows()))
    # Every arrow inside each circle, with its line.
    detail = [where(a, b) for c in found for a, b in arrows() if a in c and b in c]
    assert found == [], f"import circles {found}:\n" + "\n".join(detail)


def test_the_library_never_reaches_the_command_the_server_or_testing() -> None:
    """Not even through a chain: ``import tokenjournal`` loads none of them."""
    g = graph()
    top = layer_of(PACKAGE)
    for module in sorted(m for m in g.modules if layer_of(m) >= top):
        above = sorted(m for m in g.find_upstream_modules(module) if layer_of(m) < top)
        assert above == [], (module, above)


def test_the_server_imports_nothing_of_the_client_but_shared_leaves() -> None:
    """The reference server stands on its own: only leaf modules (``_urls``) are shared."""
    bottom = len(LAYERS) - 1
    for importer, imported in arrows(known=True):
        if importer.startswith(f"{PACKAGE}.server") and not imported.startswith(
            f"{PACKAGE}.server"
        ):
            assert layer_of(imported) == bottom, where(importer, imported)


# --------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel built from this checkout (hatchling, from the `test` extra; no network)."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps"),
            *("--no-build-isolation", "--disable-pip-version-check", "-q", "-w", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("tokenjournal-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_holds_the_library_the_server_and_the_command(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    modules = {n for n in names if n.endswith(".py")}
    assert all(n.startswith("tokenjournal/") for n in modules), modules
    assert {"tokenjournal/__init__.py", "tokenjournal/py.typed", "tokenjournal/testing.py"} <= set(
        names
    )
    assert "tokenjournal/server/__init__.py" in modules
    assert {f"tokenjournal/cli/{name}.py" for name in cli.COMMANDS} <= modules
    assert not any("mpbench" in n or n.startswith("tests/") for n in names)


def test_every_module_in_the_wheel_is_used_by_the_package(wheel: zipfile.ZipFile) -> None:
    """Nothing in the wheel is there only for the tests: each module is reachable from what
    users run (``import tokenjournal``, ``tokenjournal.testing``, ``tokenjournal.server``,
    ``tokenjournal.sync``, ``tokenjournal.adapters``, the command and its subcommands, the
    demo's client program)."""
    g = graph()
    roots = {PACKAGE, f"{PACKAGE}.testing", f"{PACKAGE}.server", f"{PACKAGE}.__main__"}
    roots |= {f"{PACKAGE}.sync", f"{PACKAGE}.adapters"}
    roots |= {f"{PACKAGE}.cli"} | {f"{PACKAGE}.cli.{name}" for name in cli.COMMANDS}
    reachable = set(roots)
    for root in roots:
        reachable |= g.find_upstream_modules(root)
    shipped = {
        n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for n in wheel.namelist()
        if n.endswith(".py")
    }
    assert shipped - reachable == set()


def test_the_wheel_carries_the_license_and_the_project_metadata(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    licenses = [n for n in names if n.split("/")[-1] == "LICENSE" and ".dist-info/" in n]
    assert licenses, names
    assert "MIT License" in wheel.read(licenses[0]).decode()
    (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
    text = wheel.read(metadata).decode()
    for version in ("3.11", "3.12", "3.13"):
        assert f"Classifier: Programming Language :: Python :: {version}\n" in text
    assert "Project-URL: Changelog, " in text and "Project-URL: Homepage, " in text
