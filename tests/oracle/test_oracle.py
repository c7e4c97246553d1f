"""The differential oracle: every drawn call sequence runs on a real server (through the SDK) and
in the local reference (reference.py: the documented equivalents in plain PyTorch, nothing else),
and their results and states must be bit-identical.

A hypothesis RuleBasedStateMachine draws a model spec (layers of every allowed type, Bilinear
and Embedding first layers included; expressions; the mlp plugin; two exported programs; losses
with their options, weight/pos_weight/ignore_index/label_smoothing; every optimizer; float32,
float64, bfloat16, float16; seeds across torch's whole range; frozen, trainable and
initial_parameters), then calls: Forward (train, eval or the default mode), Forward
(retain_graph) with its Backward now or after other calls (a target or an upstream gradient),
Backward (fused; with step, input gradients, output), Step, ZeroGrad, SetParameters (tensors or
Python lists), a checkpoint saved and loaded back, Train (every option, schedules, validation,
non-finite batches, objectives) and TrainStream. After every call an invariant compares
parameters, buffers, gradients, optimizer state and param_groups, and the step count. When only
one side refuses a call, that is a difference too. Shrinking hands back the shortest sequence.

Exceptions to bit-identity (docs/semantics.md):
- a TrainEvent's timing fields (samples_per_second, elapsed_seconds) are measurements, not
  compared;
- after a non-finite loss stops a Train run, the DONE event's grad_norm is NaN unless an event
  showed the latest step (the norm is computed only for steps an event may show).
Validation loss is compared bit for bit against its documented definition (summed batch losses
over summed counts, in batches of batch_size), not against one mean over the set (those differ
in the last bits of float rounding; docs/semantics.md).

Not covered here (elsewhere or not yet): module= (the SDK exports it: the exported path is
drawn), Train from an uploaded dataset (tests/test_train.py compares it to inline data), two
models interleaving their dropout streams (tests/test_model_rng.py), cancellation and deadlines,
the asyncio client, CUDA devices and torch.distributed ranks.

100 examples in CI (one server for the module, about 15 s here); GRADSERVE_FUZZ=1 runs 4000
(GRADSERVE_ORACLE_EXAMPLES overrides the count).
"""

from __future__ import annotations

import copy
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
import specs
import torch
from gradserve import Client, FailedPreconditionError, GradServeError, InternalError
from gradserve._ops import decode_named
from gradserve._proto.gradserve.v1 import gradserve_pb2 as pb
from gradserve._proto.gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.results import optimizer_state
from gradserve_server.app import GradServer, build_server
from gradserve_server.settings import Settings
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from reference import Event, Failed, Reference, Spec

FUZZ = os.environ.get("GRADSERVE_FUZZ", "") == "1"
EXAMPLES = int(os.environ.get("GRADSERVE_ORACLE_EXAMPLES", "4000" if FUZZ else "100"))
STEPS = 25 if FUZZ else 10
if EXAMPLES > 100:  # longer than the suite's per-test timeout
    pytestmark = pytest.mark.timeout(0)

# What the drawn examples exercised (compared on both sides), checked after the run so that a
# strategy that stops reaching a call cannot pass silently.
COVERAGE: Counter[str] = Counter()


def note(what: str) -> None:
    event(what)
    COVERAGE[what] += 1


@pytest.fixture(scope="module")
def oracle_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Any]]:
    """One server for the whole module (with a state dir, for checkpoints)."""
    for name in ("residual", "two_heads"):  # exported once, before hypothesis draws (seconds)
        specs.archive(name)
    state = tmp_path_factory.mktemp("oracle-state")
    server: GradServer
    server, _ = build_server(Settings(port=0, metrics_port=-1, threads=4, state_dir=str(state)))
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        with Client(address, timeout=60) as client, grpc.insecure_channel(address) as channel:
            yield client, pb_grpc.GradientServiceStub(channel)
    finally:
        server.stop()


# ------------------------------------------------------------------ comparing


def same(a: Any, b: Any) -> bool:
    """Bit-identical values: tensors of one dtype and shape, equal elementwise (NaN equals
    NaN); floats equal or both NaN; containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def check(what: str, remote: Any, local: Any) -> None:
    assert same(remote, local), f"{what} differs:\n  server: {remote!r}\n  local:  {local!r}"


def _groups(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer hyper-parameters as JSON carries them (numbers as floats, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        return float(v)

    return [{k: plain(v) for k, v in sorted(g.items())} for g in groups]


class Outcome:
    """A call's result, or the exception it raised."""

    def __init__(self, fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        try:
            self.value = fn()
        except errors as exc:
            self.error = exc


# ------------------------------------------------------------------ the machine


class Oracle(RuleBasedStateMachine):
    client: Client  # set by the test
    stub: Any  # the generated stub on a channel of its own: the invariant's reads, unwrapped

    graphs = Bundle("graphs")

    def __init__(self) -> None:
        super().__init__()
        self.model: Any = None
        self._ref: Reference | None = None
        self.spec: Spec | None = None
        self.dead = False  # both sides refused a call: the rest of the example is skipped

    # ---------------------------------------------------------- plumbing

    @property
    def ref(self) -> Reference:
        """The local side (set by create; every rule checks `alive` first)."""
        assert self._ref is not None
        return self._ref

    @ref.setter
    def ref(self, value: Reference) -> None:
        self._ref = value

    @property
    def alive(self) -> bool:
        return self.model is not None and not self.dead

    def inputs(self, seed: int, n: int, dtype: str = "float32") -> list[torch.Tensor]:
        assert self.spec is not None
        xs = self.spec.inputs(torch.Generator().manual_seed(seed), n)
        return [x.to(getattr(torch, dtype)) if x.is_floating_point() else x for x in xs]

    def target(self, seed: int, xs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A target fitting the model's output (its shape from a local no-draw eval pass)."""
        assert self.spec is not None
        probe = copy.deepcopy(self.ref.module).eval()
        try:
            with torch.no_grad():
                cast, _ = self.ref.cast(xs, grad=False)
                out = probe(*cast)
        except (RuntimeError, TypeError, ValueError, IndexError):
            # The model fails on these inputs (both sides must refuse the call): any target.
            out = torch.zeros(xs[0].shape[0] if xs else 1, 1)
        out = next(iter(out.values())) if isinstance(out, dict) else out
        out = out[0] if isinstance(out, (tuple, list)) else out
        return self.spec.target(torch.Generator().manual_seed(seed + 1), out)

    def both(self, remote: Callable[[], Any], local: Callable[[], Any]
             ) -> tuple[Any, Any] | None:
        """Run the call on both sides. One failing alone is a difference; both failing ends
        the example (the sides stopped at the same point, but the state is not compared)."""
        r = Outcome(remote, (GradServeError,))
        loc = Outcome(local, (Failed, RuntimeError, ValueError, TypeError, IndexError))
        if r.error is not None or loc.error is not None:
            assert r.error is not None and loc.error is not None, (
                f"only one side failed:\n  server: {r.error!r}\n  local: {loc.error!r}")
            assert not isinstance(r.error, InternalError), f"a bad call got {r.error!r}"
            note(f"both refused: {type(r.error).__name__}")
            self.dead = True
            return None
        return r.value, loc.value

    # ---------------------------------------------------------- creation

    @initialize(spec=specs.specs())
    def create(self, spec: Spec) -> None:
        self.spec = spec
        kwargs = {k: v for k, v in spec.create.items()}
        local = Outcome(lambda: self._local_model(spec), (Failed, RuntimeError, ValueError,
                                                          TypeError, IndexError, OverflowError))
        remote = Outcome(lambda: self.client.create_model(**kwargs), (GradServeError,))
        if remote.error is not None:
            # Refused at creation: the local code must raise for every input (docs/models.md
            # "Expressions": text that raises locally is refused at creation).
            assert local.error is not None, (
                f"the server refused {spec.description}: {remote.error}; local code runs it")
            return
        assert not isinstance(local.error, (TypeError, OverflowError)), (
            f"{spec.description}: local code raises {local.error!r} for any input; the server "
            "must refuse it at creation")
        note(f"source: {spec.description.split()[0]}")
        for option in ("frozen", "trainable", "initial_parameters"):
            if spec.create.get(option):
                note(f"option: {option}")
        self.model = remote.value
        order = [p.name for p in self.model.info.parameters]
        self.ref = Reference(spec, order)
        if local.error is not None:  # data-dependent: the same call must fail remotely
            self.dead = False

    def _local_model(self, spec: Spec) -> Reference:
        """Build locally and run once on sample inputs (a copy: it draws nothing that
        counts)."""
        ref = Reference(spec)
        probe = copy.deepcopy(ref)
        xs = spec.inputs(torch.Generator().manual_seed(0), 3)
        probe.forward(xs, eval_mode=False)
        return ref

    def teardown(self) -> None:
        if self.model is not None:
            try:
                self.model.delete()
            except GradServeError:
                pass

    # ---------------------------------------------------------- the calls

    @rule(seed=st.integers(0, 2**31), n=st.integers(2, 5),
          eval_mode=st.sampled_from([True, False, None]),
          dtype=st.sampled_from(["float32", "float32", "float64"]))
    def forward(self, seed: int, n: int, eval_mode: bool | None, dtype: str) -> None:
        """Forward; eval_mode None: not given (the default is train mode, as a local module
        after construction: dropout draws, BatchNorm statistics change)."""
        if not self.alive:
            return
        xs = self.inputs(seed, n, dtype)
        kwargs = {} if eval_mode is None else {"eval_mode": eval_mode}
        got = self.both(lambda: self.model.forward(*xs, **kwargs),
                        lambda: self.ref.forward(xs, bool(eval_mode)))
        if got is not None:
            remote, local = got
            check("Forward output", list(remote) if isinstance(remote, tuple) else [remote],
                  local)
            note("compared: Forward (eval)" if eval_mode else "compared: Forward (train)")

    @rule(target=graphs, seed=st.integers(0, 2**31), n=st.integers(2, 5),
          eval_mode=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
          now=st.sampled_from([None, None, "target", "grad_output"]), grads=st.booleans(),
          input_grads=st.booleans(), step=st.booleans())
    def forward_retained(self, seed: int, n: int, eval_mode: bool, dtype: str,
                         now: str | None, grads: bool, input_grads: bool, step: bool) -> Any:
        """Forward(retain_graph); its Backward now (`now`) or by a later rule from the
        bundle (other calls in between)."""
        graph = self._forward_retained(seed, n, eval_mode, dtype)
        if graph is None or now is None:
            return graph
        self.backward_retained(graph, now == "grad_output", grads, input_grads, step)
        return None

    def _forward_retained(self, seed: int, n: int, eval_mode: bool, dtype: str) -> Any:
        if not self.alive:
            return None
        xs = self.inputs(seed, n, dtype)
        key = uuid.uuid4().hex
        got = self.both(lambda: self.model.forward(*xs, retain_graph=True, eval_mode=eval_mode),
                        lambda: self.ref.forward(xs, eval_mode, retain=key))
        if got is None:
            return None
        remote, local = got
        out = remote.output
        check("Forward(retain_graph) output", list(out) if isinstance(out, tuple) else [out],
              local)
        self.ref.graphs[remote.forward_id] = self.ref.graphs.pop(key)
        note("compared: Forward (retain_graph)")
        return (remote.forward_id, seed, xs)

    @rule(seed=st.integers(0, 2**31), n=st.integers(2, 5), grads=st.booleans(),
          input_grads=st.booleans(), step=st.booleans(), output=st.booleans(),
          dtype=st.sampled_from(["float32", "float32", "float64"]))
    def backward(self, seed: int, n: int, grads: bool, input_grads: bool, step: bool,
                 output: bool, dtype: str) -> None:
        if not self.alive:
            return
        objective = self.spec is not None and "expression" in self.spec.create and not \
            self.spec.create.get("inputs")
        xs = [] if objective else self.inputs(seed, n, dtype)
        y = None if objective else self.target(seed, xs)
        inputs = None if objective else (tuple(xs) if len(xs) > 1 else xs[0])
        got = self.both(
            lambda: self.model.backward(inputs, y, return_grads=grads,
                                        return_input_grads=input_grads, step=step,
                                        return_output=output),
            lambda: self.ref.backward(xs, y, step=step, input_grads=input_grads))
        if got is not None:
            self._check_backward(*got, grads, input_grads, output)
            note("compared: Backward (fused)")

    def _check_backward(self, remote: Any, local: dict[str, Any], grads: bool,
                        input_grads: bool, output: bool) -> None:
        check("Backward loss", remote.loss, local["loss"])
        check("Backward step", remote.step, local["step"])
        if grads:
            check("Backward grads", remote.grads, local["grads"])
        if input_grads:
            check("Backward input_grads", remote.input_grads, local["input_grads"])
        if output:
            out = remote.output
            check("Backward output", list(out) if isinstance(out, tuple) else [out],
                  local["outputs"] if isinstance(out, tuple) else local["outputs"][:1])

    @rule(graph=consumes(graphs), upstream=st.booleans(), grads=st.booleans(),
          input_grads=st.booleans(), step=st.booleans())
    def backward_retained(self, graph: Any, upstream: bool, grads: bool, input_grads: bool,
                          step: bool) -> None:
        if not self.alive:
            return
        if graph is None or graph[0] not in self.ref.graphs:
            return  # from a failed call, or dropped by a checkpoint load on both sides
        forward_id, seed, xs = graph
        main = self.ref.graphs[forward_id].outputs[0]
        if upstream:
            g = torch.randn(main.shape, generator=torch.Generator().manual_seed(seed + 7))
            got = self.both(
                lambda: self.model.backward(forward_id=forward_id, grad_output=g,
                                            return_grads=grads, return_input_grads=input_grads,
                                            step=step),
                lambda: self.ref.backward(None, None, forward_id=forward_id, grad_output=g,
                                          step=step))
        else:
            y = self.target(seed, xs)
            got = self.both(
                lambda: self.model.backward(forward_id=forward_id, target=y, return_grads=grads,
                                            return_input_grads=input_grads, step=step),
                lambda: self.ref.backward(None, y, forward_id=forward_id, step=step))
        if got is not None:
            self._check_backward(*got, grads, input_grads, False)
            note(f"compared: Backward (retained, {'grad_output' if upstream else 'target'})")

    @rule(keep_grad=st.booleans())
    def step(self, keep_grad: bool) -> None:
        if not self.alive:
            return
        got = self.both(lambda: self.model.step(keep_grad=keep_grad),
                        lambda: self.ref.step(keep_grad))
        if got is not None:
            check("Step", *got)
            note("compared: Step")

    @rule(now=st.sampled_from([False, False, True]))
    def zero_grad(self, now: bool) -> None:
        if not self.alive or not now:  # drawn less often (see checkpoint)
            return
        if self.both(self.model.zero_grad, self.ref.zero_grad) is not None:
            note("compared: ZeroGrad")

    @rule(seed=st.integers(0, 2**31), python=st.booleans(), data=st.data())
    def set_parameters(self, seed: int, python: bool, data: st.DataObject) -> None:
        if not self.alive:
            return
        state = self.ref.module.state_dict()
        names = [n for n, t in state.items() if t.is_floating_point()]
        if not names:
            return
        chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3,
                                    unique=True))
        g = torch.Generator().manual_seed(seed)
        values: dict[str, Any] = {}
        for name in chosen:
            value = torch.randn(state[name].shape, generator=g)
            # Python floats and lists take the model's dtype (docs/models.md); tensors keep theirs.
            values[name] = value.tolist() if python else value.to(state[name].dtype)
        if self.both(lambda: self.model.set_parameters(values),
                     lambda: self.ref.set_parameters(values)) is not None:
            note("compared: SetParameters")

    @rule(now=st.sampled_from([False, False, False, True]))
    def checkpoint(self, now: bool) -> None:
        """SaveCheckpoint then LoadCheckpoint into the same id: the model continues exactly
        (only its retained graphs are gone). Drawn one time in four: a rule without arguments
        would be drawn so often that retained graphs rarely live to their Backward."""
        if not self.alive or not now:
            return
        name = f"oracle-{uuid.uuid4().hex[:12]}"
        self.model.save_checkpoint(name)
        try:
            self.model = self.client.load_checkpoint(name, self.model.id)
        finally:
            self.client.delete_checkpoint(name)
        self.ref.drop_graphs()
        note("compared: checkpoint save/load")

    @rule(data=st.data(), seed=st.integers(0, 2**31), n=st.integers(2, 12),
          validation=st.booleans(), poison=st.integers(0, 3))
    def train(self, data: st.DataObject, seed: int, n: int, validation: bool,
              poison: int) -> None:
        if not self.alive:
            return
        assert self.spec is not None
        objective = "expression" in self.spec.create and not self.spec.create.get("inputs")
        options = data.draw(specs.train_options(objective))
        X = y = val = None
        if not objective:
            X = self.inputs(seed, n)
            y = self.target(seed, X)
            if poison == 0 and y is not None and y.is_floating_point():
                y = y.clone()
                y.view(-1)[seed % y.numel()] = math.nan  # a non-finite batch
            if validation:
                Xv = self.inputs(seed + 3, data.draw(st.integers(2, 9)))
                val = (Xv, self.target(seed + 3, Xv))
        inputs = None if X is None else (tuple(X) if len(X) > 1 else X[0])

        def remote() -> tuple[list[Any], str]:
            run = self.model.train(inputs, y, validation=None if val is None else (
                tuple(val[0]) if len(val[0]) > 1 else val[0][0], val[1]), progress=False,
                **options)
            events: list[Any] = []
            try:
                events.extend(run)
            except FailedPreconditionError as exc:  # a non-finite loss: its DONE came first
                s = events[-1].summary if events else None
                if s is None or s.stop_reason != "non_finite":
                    raise
                return events, str(exc)
            return events, ""

        got = self.both(remote, lambda: self.ref.train(X, y, val, options))
        if got is None:
            return
        (events, failure), local = got
        note(f"Train ended: {local[-1].summary['stop_reason']}")
        self.states_match()  # the end state first: a differing step shows there, not as a loss
        self._check_events(events, local, options)
        assert bool(failure) == (local[-1].summary["stop_reason"] == "non_finite"), failure

    def _check_events(self, remote: list[Any], local: list[Event],
                      options: dict[str, Any]) -> None:
        kinds = [e.kind for e in remote]
        check(f"Train events {options}", kinds, [e.kind for e in local])
        for i, (r, loc) in enumerate(zip(remote, local)):
            where = f"Train event {i} ({r.kind}) of {options}"
            for name in ("step", "epoch", "batch_loss", "epoch_loss", "learning_rate",
                         "val_loss", "run_step", "total_steps"):
                check(f"{where}: {name}", getattr(r, name), getattr(loc, name))
            s = r.summary
            exception = (s is not None and s.stop_reason == "non_finite"
                         and math.isnan(r.grad_norm))  # not computed (module docstring)
            if not exception:
                check(f"{where}: grad_norm", r.grad_norm, loc.grad_norm)
            if loc.summary is not None:
                assert s is not None
                for name, value in loc.summary.items():
                    check(f"{where}: summary.{name}", getattr(s, name), value)

    @rule(data=st.data(), seed=st.integers(0, 2**31), batches=st.integers(1, 4),
          clip=st.sampled_from([0.0, 0.0, 0.5]), skip=st.booleans(), poison=st.integers(0, 3))
    def train_stream(self, data: st.DataObject, seed: int, batches: int, clip: float,
                     skip: bool, poison: int) -> None:
        if not self.alive:
            return
        assert self.spec is not None
        if "expression" in self.spec.create and not self.spec.create.get("inputs"):
            return  # objectives have no batches to stream
        schedule = data.draw(specs.schedules(stream=True))
        pairs: list[tuple[list[torch.Tensor], torch.Tensor | None]] = []
        for b in range(batches):
            xs = self.inputs(seed + b, data.draw(st.integers(2, 4)))
            y = self.target(seed + b, xs)
            if poison == 0 and b == batches - 1 and y is not None and y.is_floating_point():
                y = y.clone()
                y.view(-1)[0] = math.inf
            pairs.append((xs, y))
        sent = [(tuple(xs) if len(xs) > 1 else xs[0], y) for xs, y in pairs]

        def remote() -> list[Any]:
            out: list[Any] = []
            try:
                for r in self.model.train_stream(sent, clip_grad_norm=clip, schedule=schedule,
                                                 skip_nonfinite=skip):
                    out.append((r.step, r.loss, r.grad_norm, r.learning_rate, r.skipped))
            except FailedPreconditionError:
                out.append("failed")
            return out

        got = self.both(remote, lambda: self.ref.train_stream(pairs, clip, schedule, skip))
        if got is not None:
            check(f"TrainStream results (clip {clip}, schedule {schedule}, skip {skip})", *got)
            note("compared: TrainStream")

    # ---------------------------------------------------------- the invariant

    @invariant()
    def states_match(self) -> None:
        """Parameters, buffers, gradients and optimizer state (one GetParameters), and the
        step count."""
        if not self.alive:
            return
        local = self.ref.state()
        reply = self.stub.GetParameters(pb.GetParametersRequest(
            model_id=self.model.id, include_grads=True, include_buffers=True,
            include_optimizer_state=True), timeout=60)
        order = [p.name for p in self.model.info.parameters]
        values = decode_named(reply.parameters, order)
        values.update(decode_named(reply.buffers, order))
        check("parameters and buffers", values, {**local["parameters"], **local["buffers"]})
        check("gradients", decode_named(reply.grads, order), local["grads"])
        opt = optimizer_state(reply, order)
        check("optimizer state", opt.state,  # each parameter's entries in key order
              {n: dict(sorted(e.items())) for n, e in local["optimizer"].items()})
        check("optimizer param_groups", _groups(opt.param_groups), _groups(local["groups"]))
        step = self.stub.GetModel(pb.GetModelRequest(model_id=self.model.id), timeout=60).step
        check("step", step, local["step"])


def test_remote_calls_equal_local_pytorch(oracle_client: tuple[Client, Any]) -> None:
    """The oracle: drawn models and call sequences, server against local PyTorch."""
    Oracle.client, Oracle.stub = oracle_client
    Oracle.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        # No "explain" phase: it traces every line, and torch under a tracer is slow.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large])
    COVERAGE.clear()
    run_state_machine_as_test(Oracle, settings=Oracle.TestCase.settings)
    print(dict(sorted(COVERAGE.items())))
    if EXAMPLES >= 100:  # every call and source compared at least once in a full run
        wanted = ["compared: Forward (eval)", "compared: Forward (train)",
                  "compared: Forward (retain_graph)", "compared: Backward (fused)",
                  "compared: Backward (retained, grad_output)",
                  "compared: Backward (retained, target)", "compared: Step",
                  "compared: ZeroGrad", "compared: SetParameters",
                  "compared: checkpoint save/load", "compared: TrainStream",
                  "source: layers", "source: expression", "source: plugin", "source: exported"]
        missing = [w for w in wanted if not COVERAGE[w]]
        assert not missing, f"the drawn examples never reached {missing}: {dict(COVERAGE)}"
        assert any(k.startswith("Train ended") for k in COVERAGE), dict(COVERAGE)
