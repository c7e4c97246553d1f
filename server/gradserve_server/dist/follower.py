"""Ranks 1..N-1: follow rank 0's command stream until it says stop.

A follower has no gRPC server and no state directory: it holds a replica of every model
(built from the state rank 0 publishes) and runs the core ops (core/parallel.py) on them, on
its shard of each batch. Anything that puts it out of step with rank 0 (a wrong sequence number,
a command for a model it does not have, an error only it raised, a lost rank 0) ends the
process with status 1, which makes torchrun restart the whole group.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.budget import MemoryBudget
from ..core.checkpoints import CheckpointStore, Loaded
from ..core.hooks import Hooks
from ..core.limits import Limits
from ..core.model import Model
from ..core.parallel import BACKWARD, FORWARD, OPS, Computed, Work
from .comm import GroupComm, agreed
from .driver import DROP, NOOP, PUBLISH, STOP, VERIFY, state_digest
from .group import Diverged, Group, GroupLost

log = logging.getLogger("gradserve.dist")


@dataclass
class Held:
    """A retained graph's shard on this rank (what core's retained Backward reads)."""

    output: torch.Tensor
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor] = field(default_factory=list)


class Follower(GroupComm):
    def __init__(self, group: Group, limits: Limits) -> None:
        super().__init__(group)
        self.limits = limits
        self.hooks = Hooks()
        self.budget = MemoryBudget(limits.max_memory_bytes, self.hooks,
                                   max_call=limits.max_compute_bytes)
        self.checkpoints = CheckpointStore("", self.hooks)
        self.replicas: dict[str, Model] = {}
        self.counts: dict[str, int] = {}
        self.graphs: dict[str, dict[str, Held]] = {}
        self.seq = 0

    # Parallel's driving half: a follower only follows.
    def run(self, model: Model, work: Work) -> Computed:
        raise RuntimeError(f"rank {self.rank} follows; only rank 0 starts work")

    def publish(self, model: Model) -> None:
        raise RuntimeError(f"rank {self.rank} follows; only rank 0 publishes models")

    def drop(self, model_id: str) -> None:
        raise RuntimeError(f"rank {self.rank} follows; only rank 0 drops models")

    def serve(self) -> int:
        """Run commands until STOP (its exit code) or until the group is lost (1)."""
        while True:
            try:
                seq, command = self.group.recv_header()
                if seq != self.seq + 1:
                    raise Diverged(f"rank {self.rank} expected command {self.seq + 1}, "
                                   f"received {seq}")
                self.seq = seq
                code = self._do(command)
            except GroupLost as exc:
                log.error("rank %d lost the group (%s); exiting so that torchrun restarts it",
                          self.rank, exc)
                return 1
            except Diverged as exc:
                log.error("rank %d is out of step with rank 0: %s; exiting so that torchrun "
                          "restarts the group", self.rank, exc)
                return 1
            except Exception:
                log.exception("rank %d failed outside any call; exiting so that torchrun "
                              "restarts the group", self.rank)
                return 1
            if code is not None:
                return code

    def _do(self, command: dict[str, Any]) -> int | None:
        for posted in command["before"]:  # steps rank 0 took since the last command
            self._run(posted["op"], posted["model"], posted["args"], posted["count"], [], None)
        op, model_id, args = command["op"], command["model"], command["args"]
        if op == NOOP:
            return None
        if op == STOP:
            return int(args["code"])
        if op == PUBLISH:
            self._publish(model_id, args)
            return None
        if op == DROP:
            self._drop(model_id)
            return None
        if op == VERIFY:
            self.group.all_gather_object(state_digest(self._replica(model_id, op)))
            return None
        self._run(op, model_id, args, command["count"], command["sizes"], command["live"])
        return None

    def _replica(self, model_id: str, op: str) -> Model:
        model = self.replicas.get(model_id)
        if model is None:
            raise Diverged(f"command {self.seq} ({op}) is for model {model_id!r}, which rank "
                           f"{self.rank} does not hold")
        return model

    def _run(self, op: str, model_id: str, args: dict[str, Any], count: int,
             sizes: list[int], live: list[str] | None) -> None:
        model = self._replica(model_id, op)
        expected = self.counts.get(model_id, 0) + 1
        if count != expected:
            raise Diverged(f"model {model_id!r}: command {count} of the model arrived as the "
                           f"replica's command {expected}")
        self.counts[model_id] = count
        held = self.graphs.setdefault(model_id, {})
        work = Work(op, args, [], sizes)
        if op == BACKWARD:
            work.local = held.pop(args["forward_id"], None)
        if live is not None:
            for forward_id in [f for f in held if f not in set(live)]:
                del held[forward_id]  # rank 0 evicted, expired or refused it
        try:
            done = OPS[op](model, self, work)
        except GroupLost:
            raise
        except Exception as exc:
            if agreed(exc):  # every rank raised it; rank 0 tells the caller
                log.debug("rank %d: %s on model %s failed on every rank: %s", self.rank, op,
                          model_id, exc)
                return
            log.error("rank %d: %s on model %s failed here only", self.rank, op, model_id,
                      exc_info=exc)
            raise Diverged(f"{op} on model {model_id!r} failed on rank {self.rank} only "
                           f"({type(exc).__name__}: {exc})") from None
        if op == FORWARD and args["retain"] and done.local_outputs:
            held[args["retain"]] = Held(done.local_outputs[model.main_output],
                                        done.local_inputs, done.local_outputs)

    def _publish(self, model_id: str, args: dict[str, Any]) -> None:
        """Build the replica from rank 0's state (a checkpoint that travelled, not a file)."""
        values = self.broadcast(Work(PUBLISH, args))
        model: Model | None = None
        with self.guard() as guard:
            tensors = {k: v for k, v in zip(args["names"], values) if v is not None}
            loaded = Loaded(model_id, Path(f"rank 0's {model_id}"), args["meta"], tensors)
            model = self.checkpoints.build(loaded, model_id, self.group.device, self.limits,
                                           self.hooks, self.budget)
            self._own_stream(model)
        try:
            self.agree(guard, ())
        except Exception as exc:
            if model is not None:
                model.close()
            if agreed(exc):
                return  # some rank could not build it: rank 0 does not store the model
            raise
        assert model is not None
        self._drop(model_id)
        self.replicas[model_id] = model
        self.counts[model_id] = 0
        self.graphs[model_id] = {}

    def _own_stream(self, model: Model) -> None:
        """Dropout on this rank draws its shard's masks from a stream of its own, derived from
        rank 0's (the model's) and the rank: the shards do not share masks."""
        if not model.draws_random:
            return
        digest = hashlib.sha256(model.rng.cpu.numpy().tobytes()
                                + self.rank.to_bytes(4, "little")).digest()
        seed = int.from_bytes(digest[:8], "little") >> 1
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.rng.cpu = torch.get_rng_state()
            if devices:
                model.rng.cuda = torch.cuda.get_rng_state(model.device)

    def _drop(self, model_id: str) -> None:
        old = self.replicas.pop(model_id, None)
        self.counts.pop(model_id, None)
        self.graphs.pop(model_id, None)
        if old is not None:
            old.deleted.set()
            old.close()
