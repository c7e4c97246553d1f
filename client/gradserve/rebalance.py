"""Move models to their owners after the servers changed: `gradserve rebalance`.

When a server is added or removed, rendezvous hashing (gradserve.routing) gives some model ids a
new owner; clients then look for those models on the new owner. A rebalance finds every model
that is not on its owner and moves it there over the API, one model at a time:

1. read the model's spec (GetModel) and its parameters and buffers (GetParameters) on its server;
2. create it under the same id on its owner and write the same values (CreateModel with the
   spec, SetParameters), then read them back and compare them bit for bit;
3. check that the model did not change on the old server meanwhile, checkpoint it on the new one
   (when that server has a state dir), and only then delete it on the old server.

A model is deleted on the old server only after its owner holds the same values; any failure
leaves it where it was (and removes a partial copy), to be moved by a later run. What a move
keeps and what it does not (optimizer state, the step count, ...): docs/scaling.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import codec, routing
from ._ops import Op
from ._proto.gradserve.v1 import gradserve_pb2 as pb
from .client import Client
from .errors import AlreadyExistsError, FailedPreconditionError, GradServeError
from .model import RemoteModel
from .results import model_info

if TYPE_CHECKING:
    from typing_extensions import Self

# Statuses of a move.
PLANNED, BLOCKED, MOVED, SKIPPED, FAILED = "planned", "blocked", "moved", "skipped", "failed"


@dataclass
class Move:
    """One model to move: from the server that holds it to the one that owns its id."""

    model_id: str
    source: str
    target: str
    status: str = PLANNED
    note: str = ""


@dataclass
class Plan:
    servers: tuple[str, ...]  # the servers from now on (their identities)
    drain: tuple[str, ...]  # servers being emptied
    moves: list[Move] = field(default_factory=list)
    staying: int = 0  # models already on their owner
    notes: list[str] = field(default_factory=list)  # what a rebalance cannot move

    @property
    def ok(self) -> bool:
        return all(m.status in (PLANNED, MOVED) for m in self.moves)


class Rebalancer:
    """Connections to every server (one Client each) and the routing of the servers to keep.

    servers: the servers from now on (a list of host:port, or dns:///name:port entries), as
    every client will be given them; drain: servers to empty (being removed). Client options
    (token, TLS, timeout) apply to each connection.
    """

    def __init__(self, servers: str | Sequence[str], drain: Sequence[str] = (),
                 **options: Any) -> None:
        keep = [e.identity for e in routing.endpoints(
            [servers] if isinstance(servers, str) else servers)]
        gone = [e.identity for e in routing.endpoints(list(drain))] if drain else []
        if set(keep) & set(gone):
            raise ValueError(f"--drain: {sorted(set(keep) & set(gone))} also among the servers")
        self.router = routing.Router(keep)
        self.drain = tuple(gone)
        self.clients = {s: Client(s, **options) for s in (*self.router.servers, *gone)}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the plan

    def plan(self) -> Plan:
        """Every model not on its owner, and notes on what cannot move. Changes nothing."""
        plan = Plan(self.router.servers, self.drain)
        held = {s: c.list_models() for s, c in self.clients.items()}
        for server, models in held.items():
            for model in models:
                target = self.router.owner(model.id)
                if target == server:
                    plan.staying += 1
                    continue
                plan.moves.append(Move(model.id, server, target, *_blocked(model)))
        plan.moves.sort(key=lambda m: (m.model_id, m.source))
        plan.notes.extend(self._dataset_notes())
        plan.notes.extend(self._checkpoint_notes())
        return plan

    def _dataset_notes(self) -> list[str]:
        where: dict[str, set[str]] = {}
        for server, client in self.clients.items():
            for dataset in client.list_datasets():
                where.setdefault(dataset.dataset_id, set()).add(server)
        return [f"dataset {d!r} is not on {', '.join(sorted(set(self.router.servers) - on))}: "
                "upload it again (a dataset cannot be copied between servers)"
                for d, on in sorted(where.items()) if not set(self.router.servers) <= on]

    def _checkpoint_notes(self) -> list[str]:
        notes = []
        for server, client in self.clients.items():
            for ckpt in client.list_checkpoints():
                if ckpt.name == ckpt.model_id:
                    continue  # a model's own checkpoint moves (or goes) with the model
                if server in self.drain:
                    notes.append(f"checkpoint {ckpt.name!r} (model {ckpt.model_id!r}) is not "
                                 f"moved: it stays in the state dir of {server}, being drained")
                elif self.router.owner(ckpt.model_id) != server:
                    notes.append(f"checkpoint {ckpt.name!r} (model {ckpt.model_id!r}) stays on "
                                 f"{server}; load it there with --address {server}")
        return notes

    # ------------------------------------------------------------------ the moves

    def run(self, plan: Plan, report: Callable[[Move], None] | None = None) -> Plan:
        """Make every planned move of plan, one at a time; report(move) after each."""
        for move in plan.moves:
            if move.status == PLANNED:
                self.move(move)
            if report is not None:
                report(move)
        return plan

    def move(self, move: Move) -> Move:
        """Move one model (see the module doc); sets move.status and move.note."""
        src, dst = self.clients[move.source], self.clients[move.target]
        try:
            model = src.model(move.model_id)
            blocked = _blocked(model)
            if blocked:
                move.status, move.note = blocked
            else:
                _move(model, dst, move)
        except GradServeError as exc:
            move.status, move.note = FAILED, str(exc)
        return move


def _blocked(model: RemoteModel) -> tuple[str, str] | tuple[()]:
    """(BLOCKED, why) for a model a rebalance cannot move now."""
    if model.info.spec.WhichOneof("source") == "exported":
        return BLOCKED, ("exported models cannot be re-created from GetModel (it does not "
                         "return the archive): create it on its owner again")
    if model.info.training:
        return BLOCKED, "a Train run holds it: run the rebalance again when it ends"
    return ()


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same names, and each tensor of the same dtype, shape and bytes."""
    return a.keys() == b.keys() and all(codec.encode(a[k]) == codec.encode(b[k]) for k in a)


def _move(model: RemoteModel, dst: Client, move: Move) -> None:
    if any(bool((g != 0).any()) for g in model.grads().values()):
        move.status, move.note = SKIPPED, ("it holds gradients not yet applied: step() or "
                                           "zero_grad() first (gradients cannot be moved)")
        return
    values = model.parameters(buffers=True)
    created = Op("CreateModel", pb.CreateModelRequest(model_id=model.id, spec=model.info.spec),
                 model_info).then(dst._remote)
    try:
        copy = dst._run(created)
    except AlreadyExistsError:
        # A copy from an interrupted rebalance finishes the move only if it holds the same values.
        copy = dst.model(model.id)
        if not _same(copy.parameters(buffers=True), values):
            move.status, move.note = SKIPPED, (f"{move.target} already holds another model "
                                               f"{model.id!r}: resolve by hand")
            return
    else:
        try:
            copy.set_parameters(values)
            if not _same(copy.parameters(buffers=True), values):
                raise GradServeError("the values read back differ from those written")
        except GradServeError as exc:
            _discard(copy)
            move.status, move.note = FAILED, f"copy on {move.target} failed: {exc}"
            return
    before = model.info.step
    again = model.refresh()
    if again.step != before or again.training or not _same(
            model.parameters(buffers=True), values):
        _discard(copy)
        move.status, move.note = SKIPPED, "it changed during the move: run the rebalance again"
        return
    notes = []
    try:
        dst.save_checkpoint(model.id)
    except FailedPreconditionError as exc:  # no state dir there: the copy lives in memory
        notes.append(f"not checkpointed on {move.target}: {exc.details}")
    model.delete()
    move.status, move.note = MOVED, "; ".join(notes)


def _discard(copy: RemoteModel) -> None:
    try:
        copy.delete()
    except GradServeError:
        pass
