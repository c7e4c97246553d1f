"""Every fenced code block of README.md and docs/*.md runs against a live server, or says why not.

How each block is handled, by its info string (its first word):

- `python`: written to a file and run as a program (`python FILE`) in a fresh process.
  Like a non-zero exit status, a Python warning on stderr fails the block: the reader sees it.
- `bash`, `sh`, `shell`: run with `bash -euo pipefail`; `gradserve` and `python` are this
  environment's, `GRADSERVE_ADDRESS` names the live server, and `buf` (tests/node) is on PATH.
- `json`, `yaml`, `toml`: parsed. `promql`: every `gradserve_*` metric it names must be one the
  live server exports, and promtool must accept the expression.
- anything else, and any block that cannot run here, carries a marker with the reason on the
  line before it (blank lines between are allowed):

      <!-- fragment: starts a server; the docs test starts its own -->

  or the same words after the language in the info string: ```` ```python fragment: why ````.

The blocks run as a reader would run them, in page order, in one working directory per page
(files an earlier block of the page wrote are there; the repository's top-level folders are
linked in, so `bench/...` and `tests/node` resolve). Addresses are those of the quick start:
`127.0.0.1:50051` (and `localhost:`) is the docs server, `:50052`, `:50053`, ... more servers
(started when a block names them), `:9464` the first server's /metrics. The servers run with the
quick start's settings: defaults, no state dir. New blocks are picked up by themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
PARSE = {"json", "yaml", "yml", "toml", "promql"}
BLOCK_TIMEOUT_S = 240
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*fragment:\s*(?P<reason>.*?)\s*-->\s*$")
INFO_FRAGMENT = re.compile(r"\bfragment:\s*(?P<reason>.*)$")
ADDRESS = re.compile(r"\b(?:127\.0\.0\.1|localhost):(?P<port>5005[1-9]|9464)\b")
WARNING = re.compile(r"^.*\b[A-Z]\w*Warning: .*$", re.MULTILINE)  # how Python prints a warning
NODE_BIN = ROOT / "tests" / "node" / "node_modules" / ".bin"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int          # of the opening fence, 1-based
    lang: str
    code: str
    fragment: str | None  # the reason it is not run; None: it runs

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page}" \
               f":{self.line}"

    @property
    def kind(self) -> str:
        """'python', 'shell', 'parse' or 'unhandled' (a block no rule runs)."""
        if self.lang in RUN:
            return RUN[self.lang]
        return "parse" if self.lang in PARSE else "unhandled"


def parse(text: str, page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their fragment markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        info = opening["info"].strip()
        end = i + 1
        while end < len(lines) and not re.match(
                rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        body = "\n".join(re.sub(rf"^[ \t]{{0,{indent}}}", "", line)
                         for line in lines[i + 1:end])
        reason = None
        before = i - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marked = MARKER.match(lines[before]) if before >= 0 else None
        in_info = INFO_FRAGMENT.search(info)
        if marked:
            reason = marked["reason"]
        elif in_info:
            reason = in_info["reason"].strip()
        lang = info.split()[0].lower() if info else ""
        blocks.append(Block(page, i + 1, lang, body + "\n", reason))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse(page.read_text(), page)]


BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.fragment is None and b.kind != "unhandled"]


# ------------------------------------------------------------------------------ live servers


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    metrics: str
    log: Path


def start_server(log: Path, metrics: bool) -> Server:
    """gradserve-server as the quick start runs it (defaults), on free ports."""
    env = {**os.environ, "GRADSERVE_PORT": "0", "GRADSERVE_LOG_FORMAT": "json",
           "GRADSERVE_METRICS_PORT": "0" if metrics else "-1"}
    env.pop("GRADSERVE_STATE_DIR", None)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gradserve_server"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"grpc"' in line:
                fields = json.loads(line)
                address = "127.0.0.1:" + fields["grpc"].rsplit(":", 1)[1]
                return Server(proc, address, f"127.0.0.1:{fields['metrics_port']}", log)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the docs server did not start:\n{log.read_text()[-3000:]}")


@dataclass
class Live:
    """The docs' servers (started on first use) and each page's working directory."""

    base: Path
    serve: bool = True  # False: the harness's own test, which needs no server
    servers: list[Server] = field(default_factory=list)
    workdirs: dict[Path, Path] = field(default_factory=dict)
    results: dict[str, str | None] = field(default_factory=dict)  # block id -> failure or None

    def server(self, index: int) -> Server:
        while len(self.servers) <= index:
            n = len(self.servers)
            self.servers.append(start_server(self.base / f"server{n}.log", metrics=n == 0))
        return self.servers[index]

    def workdir(self, page: Path) -> Path:
        if page not in self.workdirs:
            work = self.base / f"page-{len(self.workdirs)}-{page.stem}"
            work.mkdir()
            for entry in ROOT.iterdir():  # the clone's files, as a reader in its root sees them
                if not entry.name.startswith("."):  # not .git, .venv: no block may touch those
                    (work / entry.name).symlink_to(entry)
            self.workdirs[page] = work
        return self.workdirs[page]

    def substitute(self, code: str) -> str:
        """The quick start's addresses -> the live servers' (starting those a block names)."""
        def live(match: re.Match[str]) -> str:
            port = match["port"]
            if port == "9464":
                return self.server(0).metrics
            return self.server(int(port) - 50051).address
        return ADDRESS.sub(live, code)

    def stop(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    state = Live(tmp_path_factory.mktemp("docs"))
    yield state
    state.stop()


# ------------------------------------------------------------------------------ running blocks


def environment(live: Live) -> dict[str, str]:
    env = dict(os.environ)
    if live.serve:
        env["GRADSERVE_ADDRESS"] = live.server(0).address
    path = [str(Path(sys.executable).parent)]
    if NODE_BIN.is_dir():
        path.append(str(NODE_BIN))  # buf, as docs/interop.md's reader has it
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", "")])
    env.pop("GRADSERVE_TOKEN", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# Shell commands a docs test cannot run: the block must say so with a fragment marker (failing at
# once says that, where running it would hang on a server or fail on a missing tool).
CANNOT_RUN = {
    r"\bgradserve-server\b|\bgradserve_server\b|\btorchrun\b": "starts a server",
    r"\b(docker|podman|kubectl|helm)\s": "needs a container runtime or a cluster",
    r"\bpip (install|download)\b": "installs packages",
}


def unrunnable(block: Block) -> str | None:
    """Why a shell block cannot run here, if it cannot."""
    if block.kind != "shell":
        return None
    for pattern, why in CANNOT_RUN.items():
        for line in block.code.splitlines():
            if not line.lstrip().startswith("#") and re.search(pattern, line):
                return (f"{why} ({line.strip()[:60]!r}); mark the block "
                        f"'<!-- fragment: {why} -->' or change it")
    return None


def requirements(block: Block) -> None:
    """Skip (locally; fail in CI) a block whose tools this machine lacks."""
    if re.search(r"(^|[\s;|&(])(buf|npx --prefix tests/node)\s", block.code):
        require_tool(NODE_BIN.joinpath("buf").exists(),
                     "buf from tests/node (npm ci --prefix tests/node)")


def run_program(block: Block, live: Live) -> str | None:
    """Run a python or shell block; None when it exits 0, else what went wrong."""
    work = live.workdir(block.page)
    code = live.substitute(block.code)
    script = live.base / f"block-{block.page.stem}-{block.line}"
    script.write_text(code)
    argv = ([sys.executable, str(script)] if block.kind == "python"
            else ["bash", "-euo", "pipefail", str(script)])
    try:
        done = subprocess.run(argv, check=False, cwd=work, env=environment(live), capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = [o.decode(errors="replace") if isinstance(o, bytes) else o or ""
               for o in (exc.stdout, exc.stderr)]
        return f"timed out after {BLOCK_TIMEOUT_S} s; output so far:\n{out[0]}\n{out[1]}"
    if done.returncode != 0:
        return (f"exit status {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
                f"\n--- stderr\n{done.stderr[-6000:]}")
    warned = WARNING.search(done.stderr)
    if warned:  # a reader would see it: an example that warns is a broken example
        return f"it warns: {warned.group(0)}\n--- stderr\n{done.stderr[-6000:]}"
    return None


def metric_names(live: Live) -> set[str]:
    import urllib.request

    with urllib.request.urlopen(f"http://{live.server(0).metrics}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def check_promql(block: Block, live: Live) -> str | None:
    known = metric_names(live)
    for name in set(re.findall(r"\bgradserve_[a-z0-9_]+", block.code)):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if name not in known and base not in known:
            return f"{name}: the server exports no such metric"
    require_tool(shutil.which("promtool") is not None, "promtool (apt-get install -y prometheus)")
    rules = live.base / f"rules-{block.page.stem}-{block.line}.yaml"
    rules.write_text(json.dumps({"groups": [{"name": "docs", "rules": [
        {"record": "docs:check", "expr": block.code.strip()}]}]}))
    done = subprocess.run(["promtool", "check", "rules", str(rules)], check=False,
                          capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else done.stdout + done.stderr


def check_data(block: Block, live: Live) -> str | None:
    """Parse a data block (json, yaml, toml) or check a promql expression."""
    try:
        if block.lang == "json":
            json.loads(block.code)
        elif block.lang in ("yaml", "yml"):
            import yaml

            list(yaml.safe_load_all(block.code))
        elif block.lang == "toml":
            import tomllib  # Python 3.11+

            tomllib.loads(block.code)
        elif block.lang == "promql":
            return check_promql(block, live)
    except Exception as exc:  # noqa: BLE001 - any parse error is the finding
        return f"not valid {block.lang}: {exc}"
    return None


def run(block: Block, live: Live) -> str | None:
    if block.kind == "parse":
        return check_data(block, live)
    why = unrunnable(block)
    if why:
        return why
    requirements(block)
    return run_program(block, live)


def run_page_until(block: Block, live: Live) -> str | None:
    """Run block after every earlier runnable block of its page (each once, in page order, as a
    reader would: a later block may use a file an earlier one wrote). An earlier block's failure
    is its own test's; this block fails only if it fails itself."""
    for earlier in RUNNABLE:
        if earlier.page == block.page and earlier.line <= block.line \
                and earlier.id not in live.results:
            live.results[earlier.id] = run(earlier, live)
    return live.results[block.id]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_documented_block_runs(block: Block, live: Live) -> None:
    failure = run_page_until(block, live)
    if failure is not None:
        logs = "\n".join(f"--- {s.log.name} (tail)\n{s.log.read_text()[-2000:]}"
                         for s in live.servers)
        pytest.fail(f"{block.id}: the ```{block.lang} block fails: {failure}\n{logs}",
                    pytrace=False)


def test_every_block_is_run_or_says_why() -> None:
    unhandled = [f"{b.id} (```{b.lang or 'no language'})" for b in BLOCKS
                 if b.fragment is None and b.kind == "unhandled"]
    assert not unhandled, (
        "these blocks are neither run nor marked; give them a runnable language (python, bash, "
        "json, yaml, toml, promql) or put '<!-- fragment: WHY -->' on the line before:\n"
        + "\n".join(unhandled))
    silent = [b.id for b in BLOCKS if b.fragment is not None and len(b.fragment.split()) < 2]
    assert not silent, f"a fragment marker must say why the block does not run: {silent}"


def test_the_docs_have_runnable_examples() -> None:
    """The harness finds the blocks (a broken parser would make every test above vacuous)."""
    kinds = {b.kind for b in RUNNABLE}
    assert {"python", "shell", "parse"} <= kinds
    assert len(RUNNABLE) >= 20
    readme = [b for b in RUNNABLE if b.page.name == "README.md" and b.kind == "python"]
    assert any("Client(" in b.code for b in readme)


def test_the_quick_start_environment_has_what_the_examples_need() -> None:
    """The examples run after `pip install ".[server]"` alone: what they import comes from the
    standard library, gradserve or a requirement of the base or server extra, and the server
    extra brings the command's file formats (the cli extra: YAML specs, .safetensors)."""
    from importlib import metadata

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {canonicalize_name(Requirement(r).name) for r in reqs}

    installed = names(project["dependencies"]) | names(extras["server"])
    assert names(extras["cli"]) <= installed, "the server extra must include the cli extra"
    providers = metadata.packages_distributions()
    imported = {m for b in RUNNABLE if b.kind in ("python", "shell")
                for m in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", b.code, re.MULTILINE)}
    missing = {m: providers.get(m) for m in imported - set(sys.stdlib_module_names)
               - {"gradserve", "gradserve_server"}
               if not names(providers.get(m, [])) & installed}
    assert not missing, f"examples import what the server extra does not install: {missing}"


# ------------------------------------------------------------------------------ the harness itself


PAGE = '''# A page

<!-- fragment: pseudo-code -->

```python
for each batch: step()
```

```python
raise SystemExit(3)
```

    ```bash indented
    echo hi
    ```

```go
x := 1
```
'''


def test_harness_fails_a_broken_block_and_an_unmarked_one(tmp_path: Path) -> None:
    blocks = parse(PAGE, tmp_path / "page.md")
    assert [(b.lang, b.fragment is None, b.kind) for b in blocks] == [
        ("python", False, "python"), ("python", True, "python"), ("bash", True, "shell"),
        ("go", True, "unhandled")]
    assert blocks[0].fragment == "pseudo-code"
    assert blocks[2].code == "echo hi\n"
    state = Live(tmp_path, serve=False)
    failure = run_program(blocks[1], state)
    assert failure is not None and "exit status 3" in failure
    assert run_program(blocks[2], state) is None
    server = parse("```bash\ngradserve-server --port 0 &\n```\n", tmp_path / "s.md")[0]
    assert "starts a server" in (run(server, state) or "")
    state.stop()
