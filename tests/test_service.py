"""The standard gRPC services, the stub drift check, settings, and the CLI entry point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import grpc
import pytest
from gradserve import Client
from gradserve_server.app import GradServer
from gradserve_server.settings import Settings, env_name
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def test_reflection_lists_the_service(server: GradServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert "gradserve.v1.GradientService" in names
        assert "grpc.health.v1.Health" in names
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="gradserve.v1.GradientService")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_health_serving(server: GradServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gradserve.v1.GradientService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stubs_match_protos() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_settings_flags_env_and_defaults() -> None:
    s = Settings.load([], {})
    assert (s.port, s.metrics_port, s.max_message_mb, s.device) == (50051, 9464, 512, "auto")
    s = Settings.load(["--port", "6000"], {"GRADSERVE_PORT": "5000", "GRADSERVE_THREADS": "3"})
    assert s.port == 6000 and s.threads == 3  # flag beats env; env beats default
    with pytest.raises(SystemExit):
        Settings.load(["--log-format", "xml"], {})
    with pytest.raises(SystemExit):
        Settings.load([], {"GRADSERVE_PORT": "high"})


def test_configuration_page_documents_every_setting() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    for f in fields(Settings):
        flag = f"--{f.name.replace('_', '-')}"
        assert re.search(rf"`{flag}`", page), f"docs/configuration.md lacks {flag}"
        assert env_name(f.name) in page, f"docs/configuration.md lacks {env_name(f.name)}"


def test_console_script_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "GRADSERVE_PORT": "0", "GRADSERVE_METRICS_PORT": "-1",
           "GRADSERVE_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "gradserve_server"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        port = int(re.search(r'"grpc": "[^"]*:(\d+)"', line).group(1))  # type: ignore[union-attr]
        with Client(f"127.0.0.1:{port}") as client:
            client.wait_ready(30)
            assert client.health() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Run the whole test suite:**", 1)[1].split("```bash\n", 1)[1]
    command = block.split("\n", 1)[0].strip()
    assert "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
