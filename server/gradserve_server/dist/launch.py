"""Under torchrun: each rank's device, the process group, and the hello that checks the group.

`torchrun --nproc-per-node N -m gradserve_server` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. WORLD_SIZE > 1 makes them one server: rank 0
serves, the others follow (follower.py). Each rank takes cuda:LOCAL_RANK when CUDA is there
(nccl), else the CPU (gloo); --dist-backend overrides. Anything that keeps a rank from
joining (no such device, a rank that never arrives, different versions) is a StartupError:
one line, exit 1, within --dist-timeout-seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import StartupError
from ..settings import Settings
from .follower import Follower
from .group import Group, Liveness, RankInfo

log = logging.getLogger("gradserve.dist")


@dataclass(frozen=True)
class TorchrunEnv:
    """The variables torchrun (or any env:// launcher) sets for each process."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    restart: int
    run_id: str
    agent_store: bool  # torchrun's agent hosts the store (else rank 0 does)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], one: bool = False) -> TorchrunEnv | None:
        """None without a group of two or more (a plain start, or torchrun with one process).

        one: torchrun with one process forms a group of one too (--dist-backend named rather
        than auto: checks a backend, e.g. nccl on a machine with one GPU)."""
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise StartupError(f"WORLD_SIZE={environ.get('WORLD_SIZE')!r}: expected an "
                               "integer (set by torchrun)") from None
        if world < 1 or (world == 1 and not (one and "RANK" in environ)):
            return None
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                   if not environ.get(k)]
        if missing:
            raise StartupError(f"WORLD_SIZE={world} without {', '.join(missing)}: start the "
                               "server with torchrun (docs/scaling.md)")
        try:
            return cls(int(environ["RANK"]), world, int(environ["LOCAL_RANK"]),
                       environ["MASTER_ADDR"], int(environ["MASTER_PORT"]),
                       int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                       environ.get("TORCHELASTIC_RUN_ID", "none"),
                       environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        except ValueError as exc:
            raise StartupError(f"torchrun's environment is not valid: {exc}") from None


def rank_device(requested: str, local_rank: int, rank: int) -> torch.device:
    """--device for one rank: auto/cuda -> cuda:LOCAL_RANK when CUDA is there, cpu -> cpu."""
    where = f"rank {rank} (LOCAL_RANK {local_rank})"
    if requested not in ("auto", "cpu", "cuda"):
        raise StartupError(f"--device {requested!r}: under torchrun use auto, cpu or cuda; each "
                           "rank takes cuda:LOCAL_RANK itself")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StartupError(f"{where}: --device cuda, but CUDA is not available on this host")
    if local_rank >= torch.cuda.device_count():
        raise StartupError(f"{where}: no device cuda:{local_rank}; this host has "
                           f"{torch.cuda.device_count()} (set --nproc-per-node to at most that)")
    return torch.device("cuda", local_rank)


def _version() -> str:
    try:
        return metadata.version("gradserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def start_group(settings: Settings, env: TorchrunEnv) -> Group:
    """Join the group: device, process groups, hello (versions checked), liveness."""
    device = rank_device(settings.device, env.local_rank, env.rank)
    backend = settings.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise StartupError(f"rank {env.rank}: --dist-backend nccl needs CUDA devices; this "
                           "rank runs on the CPU (use gloo)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=settings.dist_timeout_seconds)
    where = f"rank {env.rank} of {env.world}"
    try:
        # torchrun's agent keeps one store across restarts: each attempt's keys get a prefix of
        # their own, or a restarted rank could read a dead rank's address from the last one.
        store = dist.TCPStore(env.master_addr, env.master_port, env.world,
                              is_master=env.rank == 0 and not env.agent_store, timeout=timeout)
        prefixed = dist.PrefixStore(f"gradserve/{env.run_id}/{env.restart}", store)
        extra: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=prefixed, rank=env.rank, world_size=env.world,
                                timeout=timeout, **extra)
        cpu = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except Exception as exc:  # noqa: BLE001 - rendezvous timeouts, refused connections
        raise StartupError(f"{where}: the process group did not form within "
                           f"--dist-timeout-seconds {settings.dist_timeout_seconds:g} "
                           f"({_first_line(exc)})") from None
    me = RankInfo(env.rank, socket.gethostname(), os.getpid(), str(device), torch.__version__,
                  _version())
    group = Group(env.rank, env.world, device, backend, settings.dist_timeout_seconds, cpu,
                  [me], None)
    try:
        ranks: list[RankInfo] = group.all_gather_object(me)
    except Exception as exc:  # noqa: BLE001
        raise StartupError(f"{where}: the other ranks did not say hello within "
                           f"--dist-timeout-seconds ({_first_line(exc)})") from None
    group.ranks = ranks
    for what in ("version", "torch"):
        seen = {getattr(r, what) for r in ranks}
        if len(seen) > 1:
            listing = ", ".join(f"rank {r.rank}: {getattr(r, what)}" for r in ranks)
            raise StartupError(f"the ranks run different {what}s of "
                               f"{'gradserve' if what == 'version' else 'torch'} ({listing}); "
                               "every rank must run the same image")
    try:
        beats = dist.TCPStore(env.master_addr, env.master_port, is_master=False,
                              timeout=timedelta(seconds=10))
        group.liveness = Liveness(beats, f"gradserve/{env.run_id}/{env.restart}/beat",
                                  env.rank, env.world)
    except Exception as exc:  # noqa: BLE001 - lost ranks are then reported without names
        log.warning("rank %d: no liveness counters in torchrun's store (%s); a lost rank will "
                    "not be named", env.rank, _first_line(exc))
    if env.rank == 0:
        log.info("distributed group formed", extra={"fields": {
            "world_size": env.world, "backend": backend, "restart": env.restart,
            "ranks": [str(r) for r in ranks]}})
    return group


def follow(group: Group, settings: Settings) -> int:
    """A worker rank's life: follow rank 0 until it says stop; the process's exit status."""
    def on_signal(signum: int, _frame: object) -> None:
        # torchrun forwards SIGTERM to every rank: rank 0 drains, then tells this one to stop.
        log.info("rank %d received %s; waiting for rank 0 to stop the group", group.rank,
                 signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = Follower(group, settings.limits).serve()
    group.close()
    log.info("rank stopped", extra={"fields": {"exit_code": code}})
    return code


class RankFilter(logging.Filter):
    """Every log line of a group member says which rank wrote it."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {"rank": self.rank, **getattr(record, "fields", {})}
        return True


def tag_logs(rank: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(RankFilter(rank))
