"""The transport's own pieces: lanes, the idle watch, request parsing, drain budget, start-up."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch
from gradserve import Client
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve_server.app import GradServer, rpc_grace
from gradserve_server.core.errors import InvalidArgument
from gradserve_server.settings import Settings
from gradserve_server.transport import rpc
from gradserve_server.transport.lanes import InlinePolicy
from gradserve_server.transport.streams import StreamIdle, StreamWatch


def test_drain_gives_calls_at_most_half_the_grace_and_ten_seconds() -> None:
    assert rpc_grace(20.0) == 10.0
    assert rpc_grace(6.0) == 3.0
    assert rpc_grace(60.0) == 10.0  # checkpoints get the other 50 s
    assert rpc_grace(0.0) == 0.0


def test_every_method_of_the_service_has_a_handler(server: GradServer) -> None:
    names = {m.name for m in pb.DESCRIPTOR.services_by_name["GradientService"].methods}
    service = rpc.GradientService(server.core, server.shm, server.lanes, server.watch)
    assert set(service.handlers()) == names
    # every handler reads its own request (none parsed by gRPC before the handler runs)
    assert all(h.request_streaming for h in service.handlers().values())


def test_upload_chunks_are_views_of_the_received_bytes() -> None:
    raw = pb.UploadDatasetRequest(chunk=b"abc" * 1000).SerializeToString()
    chunk = rpc._chunk(raw)
    assert isinstance(chunk, memoryview) and chunk.obj is raw and bytes(chunk) == b"abc" * 1000
    header = pb.UploadDatasetRequest(header=pb.DatasetHeader(dataset_id="d")).SerializeToString()
    with pytest.raises(InvalidArgument, match="only chunks"):
        rpc._chunk(header)
    with pytest.raises(InvalidArgument, match="not a valid"):
        rpc._chunk(b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")


def test_inline_policy_allows_only_what_was_quick_before() -> None:
    policy = InlinePolicy(0.0005)
    assert not policy.allows("k")  # never seen: an executor first
    policy.record("k", 0.0001)
    assert policy.allows("k")
    policy.record("k", 0.002)  # ran long once: back to the executor
    assert not policy.allows("k")
    assert not InlinePolicy(0).allows("k") and not policy.allows(None)


def test_idle_watch_ends_a_read_that_waits_too_long() -> None:
    watch = StreamWatch(idle_s=0.2)

    class Context:
        async def read(self) -> bytes:
            await asyncio.sleep(30)
            return b""

    async def run() -> BaseException | None:
        task = asyncio.ensure_future(watch.read(Context(), "UploadDataset"))
        await asyncio.sleep(0.3)
        assert watch.sweep() == 1
        try:
            await task
        except StreamIdle as exc:
            return exc
        return None

    error = asyncio.run(run())
    assert isinstance(error, StreamIdle) and "--stream-idle-seconds" in str(error)
    assert len(watch) == 0


def test_settings_refuse_nonsense_transport_flags() -> None:
    for flags in (["--stream-idle-seconds", "-1"], ["--inline-us", "-5"],
                  ["--max-concurrent-rpcs", "0"], ["--max-streams-per-connection", "0"],
                  ["--max-shm-regions", "0"], ["--max-shm-regions-per-connection", "0"],
                  ["--tune-malloc", "2"]):
        with pytest.raises(SystemExit):
            Settings.load(flags, {})
    s = Settings.load(["--stream-idle-seconds", "5"], {"GRADSERVE_MAX_SHM_REGIONS": "9"})
    assert s.stream_idle_seconds == 5.0 and s.max_shm_regions == 9


def test_cli_says_in_one_line_that_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gradserve_server", "--port", str(port),
             "--metrics-port", "-1"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [(f"gradserve-server: --port (or GRADSERVE_PORT) {port}: 127.0.0.1:{port} is "
                      "already in use by another process (another gradserve-server?); choose "
                      "another port, 0 for a free one")], lines
    assert "Traceback" not in result.stderr


def test_a_tiny_call_that_turns_slow_goes_back_to_the_executor(
        make_server: Any) -> None:
    server = make_server(inline_us=1_000_000)  # generous: a loaded machine stays under it
    with Client(f"127.0.0.1:{server.port}") as c:
        m = c.create_model(layers=[{"type": "Linear", "in_features": 2, "out_features": 1}])
        x = torch.ones(4, 2)
        for _ in range(3):
            assert torch.equal(m.forward(x), m.forward(x))
        kinds = [k for k in server.lanes.inline._last if k[0] == "Forward"]
        assert kinds and all(server.lanes.inline.allows(k) for k in kinds)
        server.lanes.inline.record(kinds[0], 2.0)  # as if the last one had taken two seconds
        assert not server.lanes.inline.allows(kinds[0])
        m.forward(x)  # runs on the executor, measures afresh
        assert server.lanes.inline.allows(kinds[0])


def test_help_lists_every_flag() -> None:
    from dataclasses import fields

    from gradserve_server.settings import build_parser

    text = build_parser().format_help()  # argparse formats each help string: no stray '%'
    for f in fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in text
