#!/usr/bin/env bash
# Lint and types, at zero: ruff over the whole tree (pyproject.toml's rules), mypy over the
# handwritten packages, the benchmarks and the scripts. The SDK's public types are also checked
# from a user's side by tests/test_typing.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
mypy client/gradserve server/gradserve_server bench scripts
