#!/usr/bin/env bash
# Lint the gradserve contract and check it for breaking changes against the released v1 API.
#
#   scripts/proto-check.sh                    # buf lint + buf breaking (CI runs this)
#   scripts/proto-check.sh WORKSPACE          # the same on another copy (buf.yaml + protos/)
#   scripts/proto-check.sh --update-baseline  # after a release: record protos/ as the new baseline
#
# buf comes from tests/node (npm ci --prefix tests/node), or $BUF, or buf on PATH.
# The baseline is a buf image (YAML, so a moved baseline shows up plainly in review) of the
# last released protos; comments are left out of it because they are not part of the contract.
# Both checks take well under a second, so they run on every build rather than only when
# protos/ changed: a contract identical to the baseline passes trivially.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASELINE="$ROOT/protos/released/gradserve-v1.image.yaml"

find_buf() {
  if [[ -n "${BUF:-}" ]]; then
    echo "$BUF"
  elif [[ -x "$ROOT/tests/node/node_modules/.bin/buf" ]]; then
    echo "$ROOT/tests/node/node_modules/.bin/buf"
  elif command -v buf >/dev/null 2>&1; then
    command -v buf
  else
    echo "proto-check: buf not found; run: npm ci --prefix tests/node" >&2
    exit 2
  fi
}

check() {
  local workspace="$1"
  (
    cd "$workspace"
    "$BUF_BIN" lint
    echo "proto-check: buf lint passed"
    "$BUF_BIN" breaking --against "$BASELINE"
    echo "proto-check: no breaking changes against ${BASELINE#"$ROOT"/}"
  )
}

BUF_BIN="$(find_buf)"
case "${1:-}" in
  --update-baseline)
    check "$ROOT"
    mkdir -p "$(dirname "$BASELINE")"
    (cd "$ROOT" && "$BUF_BIN" build --exclude-source-info -o "$BASELINE")
    echo "proto-check: wrote ${BASELINE#"$ROOT"/}; commit it with the release"
    ;;
  -h|--help)
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    ;;
  -*)
    echo "proto-check: unknown option $1 (see --help)" >&2
    exit 2
    ;;
  *)
    check "${1:-$ROOT}"
    ;;
esac
