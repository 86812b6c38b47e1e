"""Test-wide fixtures and the ``reference`` marker.

Every file a test reads is in the repository (``tests/data``, or the package's own ``sdcli/data``; see
``data_paths.py``).

A test that needs a reference library (torch, diffusers, transformers, peft) is marked ``reference``, so that
``pytest -m "not reference"`` runs every other test in an environment without them. The mark is given here, not
by hand: to every test of a module that imports a reference library (or a test helper built on one) at its top,
and to every test that asks for the ``torch``, ``diffusers`` or ``transformers`` fixture, which import the
library when the test runs. A test that is not marked but still tries to import one of them, and is skipped
for it, fails instead: its mark would be missing.
"""

from __future__ import annotations

from types import ModuleType

import pytest

REFERENCE_LIBRARIES = ("torch", "diffusers", "transformers", "peft")
"""The reference implementations the tests compare against; never imported by sdcli itself."""

REFERENCE_HELPERS = ("tiny_pipeline",)
"""Test helpers that import the reference libraries at their top (reference_models imports them only where used)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "reference: needs torch / diffusers / transformers (the reference "
                                       "implementations); deselect with -m \"not reference\"")


def _reference_imports(module: ModuleType | None) -> list[str]:
    """The reference libraries and helpers bound at the top level of a test module."""
    if module is None:
        return []
    found = set()
    for value in vars(module).values():
        name = getattr(value, "__module__", None) if not isinstance(value, ModuleType) else value.__name__
        root = (name or "").split(".")[0]
        if root in REFERENCE_LIBRARIES or root in REFERENCE_HELPERS:
            found.add(root)
    return sorted(found)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("reference") is not None:
            continue
        needs = set(getattr(item, "fixturenames", ())) & set(REFERENCE_LIBRARIES)
        if needs or _reference_imports(getattr(item, "module", None)):
            item.add_marker(pytest.mark.reference)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and call.excinfo is not None and item.get_closest_marker("reference") is None:
        message = str(call.excinfo.value)
        if any(f"could not import '{name}'" in message for name in REFERENCE_LIBRARIES):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} imports a reference library ({message}) but is not marked "
                               "'reference': ask for the torch / diffusers / transformers fixture instead")
    return report


def _import_reference(name: str) -> ModuleType:
    return pytest.importorskip(name, reason=f"{name} is a reference implementation (the test extra)")


@pytest.fixture(scope="session")
def torch() -> ModuleType:
    """torch, imported when the test runs (the test is then marked ``reference``)."""
    return _import_reference("torch")


@pytest.fixture(scope="session")
def diffusers(torch) -> ModuleType:
    return _import_reference("diffusers")


@pytest.fixture(scope="session")
def transformers() -> ModuleType:
    return _import_reference("transformers")


@pytest.fixture(scope="session")
def peft(torch) -> ModuleType:
    """peft, which diffusers' LoRA loading runs on."""
    return _import_reference("peft")
