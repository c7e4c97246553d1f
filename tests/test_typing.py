"""The SDK's public calls have real types: mypy checks tests/typing/sdk_calls.py (assert_type
on every call's result, and calls with wrong arguments that must be refused)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ROOT / "tests" / "typing" / "sdk_calls.py"
EXPECTED = re.compile(r"#\s*E:\s*([\w-]+)\s*$")
REPORTED = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<text>.*?)(?:  \[(?P<code>[\w-]+)\])?$")


def test_sdk_calls_have_real_types(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's sources, not the installed package (an editable install's import hook is
    # opaque to mypy, which would then see every gradserve name as Any).
    monkeypatch.setenv("MYPYPATH", str(ROOT / "client"))
    try:
        from mypy import api
    except ImportError:
        require_tool(False, "mypy (pip install mypy)")
        return
    out, err, _ = api.run([str(CHECKED), "--config-file", str(ROOT / "pyproject.toml"),
                           "--show-error-codes", "--no-error-summary", "--no-pretty"])
    assert not err, err
    expected = {n: m.group(1) for n, line in enumerate(CHECKED.read_text().splitlines(), 1)
                if (m := EXPECTED.search(line))}
    assert len(expected) >= 5, "the file lost its wrong calls"
    got: dict[int, list[str]] = {}
    for line in out.splitlines():
        found = REPORTED.match(line)
        if found and Path(found["path"]).name == CHECKED.name:
            got.setdefault(int(found["line"]), []).append(f"{found['code']}: {found['text']}")
        elif line.strip():
            pytest.fail(f"unexpected mypy output: {line}")
    unexpected = {n: errors for n, errors in got.items() if n not in expected}
    missing = {n: code for n, code in expected.items()
               if not any(e.startswith(f"{code}:") for e in got.get(n, []))}
    assert not unexpected, f"mypy errors (line: errors): {unexpected}"
    assert not missing, f"wrong calls mypy accepted (line: expected code): {missing}"


def test_sync_and_async_methods_show_the_same_parameters_and_docs() -> None:
    """help() and IDEs see each call's own parameters and docstring, the same in both clients."""
    import inspect

    from gradserve import AsyncClient, AsyncRemoteModel, Client, RemoteModel

    for sync, aio in [(Client, AsyncClient), (RemoteModel, AsyncRemoteModel)]:
        names = [n for n in dir(sync) if not n.startswith("_") and callable(getattr(sync, n))]
        assert names == [n for n in dir(aio) if not n.startswith("_")
                         and callable(getattr(aio, n))]
        for name in names:
            if name in ("close",):
                continue
            a, b = getattr(sync, name), getattr(aio, name)
            assert inspect.signature(a).parameters == inspect.signature(b).parameters, name
            assert a.__doc__ and a.__doc__ == b.__doc__, name
    assert list(inspect.signature(Client.create_model).parameters)[:3] == [
        "self", "model_id", "layers"]
    assert "forward_id" in inspect.signature(RemoteModel.backward).parameters
