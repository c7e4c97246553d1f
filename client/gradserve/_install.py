"""What to install for an optional feature, said the same way by every message that needs it.

gradserve is installed from a clone (it is not on a package index), so hints name the clone's
extras (`pip install '.[cli]'`); torch is named at the version the server extra pins.
"""

from __future__ import annotations

import re

TORCH_FALLBACK = "torch"


def pinned_torch() -> str:
    """'torch==2.13.0': the requirement of the installed gradserve's server extra."""
    from importlib import metadata  # only when a message needs it: import gradserve stays light

    try:
        requires = metadata.requires("gradserve") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return TORCH_FALLBACK
    for req in requires:
        found = re.match(r"\s*torch\s*(==\s*[^;\s]+)\s*;.*extra\s*==\s*['\"]server['\"]", req)
        if found:
            return "torch" + found.group(1).replace(" ", "")
    return TORCH_FALLBACK


def torch_hint() -> str:
    return (f"pip install '{pinned_torch()}' (the version the server extra pins; README "
            "'torch and GPUs' names the CPU and CUDA builds)")


def extra_hint(extra: str, what: str) -> str:
    """How to get `what` (a package) that the `extra` extra brings."""
    also = " (the 'server' extra includes it)" if extra == "cli" else ""
    return f"{what}{also}: from a clone of gradserve, pip install '.[{extra}]'"
