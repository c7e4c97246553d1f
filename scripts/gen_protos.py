"""Generate the Python stubs (+ .pyi) from protos/ into client/gradserve/_proto/.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs differ (CI)
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "client" / "gradserve" / "_proto"
# protoc writes absolute imports ("from gradserve.v1 import ..."); the stubs live inside the SDK
# package, so rewrite them to point there.
_IMPORT = re.compile(r"^from gradserve\.v1 import ", re.MULTILINE)


def generate(dest: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = sorted(p for p in dest.rglob("*.py*") if p.is_file())
    for path in files:
        text = _IMPORT.sub("from gradserve._proto.gradserve.v1 import ", path.read_text())
        path.write_text(text)
    for pkg in {p.parent for p in files} | {dest / "gradserve"}:
        while pkg != dest.parent:
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        print(f"generated stubs in {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        fresh.mkdir()
        generate(fresh)
        drift = []
        for new in sorted(fresh.rglob("*")):
            if new.is_dir():
                continue
            old = OUT / new.relative_to(fresh)
            if not old.exists() or not filecmp.cmp(new, old, shallow=False):
                drift.append(str(old.relative_to(ROOT)))
        if drift:
            print("stubs drifted from protos/; run: python scripts/gen_protos.py", file=sys.stderr)
            print("\n".join(drift), file=sys.stderr)
            return 1
    print("stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
