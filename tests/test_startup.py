"""`gradserve-server` refuses a bad start in one line on stderr that names the flag, the value and
the cause: exit status 2 for usage errors (a flag out of range, an unknown flag), 1 for runtime
ones (a port in use, an address that is not this machine's, an unreadable or wrong file)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_security import _make_ca

QUIET = {"GRADSERVE_LOG_FORMAT": "text"}


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """python -m gradserve_server with args; every GRADSERVE_* setting not given is unset."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
    return subprocess.run([sys.executable, "-m", "gradserve_server", *args],
                          env={**base, **QUIET, **(env or {})}, capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("gradserve-server: ")
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_operator_starts_on_a_grpc_port_in_use(taken_port: int) -> None:
    line = one_line(start("--port", str(taken_port), "--metrics-port", "-1"), 1)
    assert (f"--port (or GRADSERVE_PORT) {taken_port}: 127.0.0.1:{taken_port} is already in use "
            "by another process") in line


def test_operator_changes_only_the_port_of_a_second_server() -> None:
    """The likely clash: a second server with only --port changed meets the first's default
    metrics port (9464), and the message says which flag to change."""
    with socket.socket() as first:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            first.bind(("127.0.0.1", 9464))
            first.listen()
        except OSError:
            pass  # 9464 is in use on this machine already: the same clash
        line = one_line(start("--port", "0"), 1)
    assert ("--metrics-port (or GRADSERVE_METRICS_PORT) 9464: 127.0.0.1:9464 is already in use"
            in line)
    assert "or -1 to turn /metrics off" in line


@pytest.mark.parametrize(("host", "cause"), [
    ("999.1.1.1", "not an IP address of this machine, and no name resolves to it"),
    ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: never a local address
])
def test_operator_gives_a_host_that_is_not_this_machines(host: str, cause: str) -> None:
    line = one_line(start("--host", host, "--port", "0", "--metrics-port", "-1"), 1)
    assert f"--host (or GRADSERVE_HOST) '{host}': {cause}" in line


def test_operator_gives_a_tls_certificate_that_is_not_one(tmp_path: Path) -> None:
    pki = _make_ca(tmp_path)
    junk = tmp_path / "cert.pem"
    junk.write_text("not a certificate\n")
    line = one_line(start("--tls-cert", str(junk), "--tls-key", str(pki["server.key"]),
                          "--port", "0", "--metrics-port", "-1"), 1)
    assert f"--tls-cert (or GRADSERVE_TLS_CERT) {junk}: no certificate in it" in line
    line = one_line(start("--tls-cert", str(pki["server.crt"]), "--tls-key",
                          str(pki["client.key"]), "--port", "0", "--metrics-port", "-1"), 1)
    assert f"--tls-key (or GRADSERVE_TLS_KEY) {pki['client.key']}: the key does not belong to " \
           "the certificate" in line
    missing = tmp_path / "nope.key"
    line = one_line(start("--tls-cert", str(pki["server.crt"]), "--tls-key", str(missing),
                          "--port", "0", "--metrics-port", "-1"), 1)
    assert f"--tls-key (or GRADSERVE_TLS_KEY) {missing}: cannot read it (No such file" in line


def test_operator_names_a_token_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "tokens"
    line = one_line(start("--auth-token-file", str(missing), "--port", "0",
                          "--metrics-port", "-1"), 1)
    assert f"--auth-token-file {missing}: cannot read the token file" in line


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--port", "70000"], {}, ("--port (or GRADSERVE_PORT) 70000: expected an integer in "
                              "[0, 65535]")),
    ([], {"GRADSERVE_PORT": "high"}, "GRADSERVE_PORT (or --port) 'high': expected an integer"),
    (["--prot", "1"], {}, "unrecognized arguments: --prot 1"),
    (["--device", "tpu"], {}, "--device (or GRADSERVE_DEVICE) 'tpu': expected auto, cpu, cuda"),
    (["--port", "50061", "--metrics-port", "50061"], {},
     "--metrics-port (or GRADSERVE_METRICS_PORT) 50061: it is the gRPC port (--port) too"),
    (["--grace-seconds", "1e300"], {}, ("--grace-seconds (or GRADSERVE_GRACE_SECONDS) 1e+300: "
                                       "expected a number in [0, 31536000]")),
    (["--max-concurrent-rpcs", "99999999999"], {}, "expected an integer in [1, 1073741824]"),
    (["--dist-timeout-seconds", "1e300"], {}, "expected a number in (0, 31536000]"),
    (["--max-models", "9" * 30], {}, "expected an integer in [1, 9007199254740992]"),
])
def test_operator_makes_a_usage_error(args: list[str], env: dict[str, str], needle: str) -> None:
    line = one_line(start(*args, env=env), 2)
    assert needle in line and line.endswith("(--help lists every flag)")


def test_every_numeric_flag_has_a_range() -> None:
    from dataclasses import fields

    from gradserve_server.settings import Settings

    numeric = [f for f in fields(Settings) if f.type in ("int", "float")]
    assert len(numeric) > 30
    unbounded = [f.name for f in numeric if "max" not in f.metadata
                 or not ({"min", "above"} & set(f.metadata))]
    assert not unbounded, f"flags without a lower and an upper bound: {unbounded}"
