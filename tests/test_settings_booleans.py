"""GRADSERVE_* booleans read as what they say: "false" is False (bool("false") would be True)."""

from __future__ import annotations

import pytest
from gradserve_server.settings import _convert


@pytest.mark.parametrize(("raw", "value"), [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True), (" TRUE ", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False),
])
def test_boolean_values(raw: str, value: bool) -> None:
    assert _convert("bool", raw) is value
    assert _convert(bool, raw) is value


@pytest.mark.parametrize("raw", ["", "maybe", "2", "t"])
def test_other_text_is_not_a_boolean(raw: str) -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        _convert("bool", raw)


def test_other_kinds_are_unchanged() -> None:
    assert _convert("int", "8") == 8 and _convert("float", "0.5") == 0.5
    assert _convert("str", "false") == "false"
