"""One live model: module, loss, optimizer, retained graphs, and PyTorch's semantics on them."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..catalog.exported import (
    ArchiveLimits,
    ExportedModule,
    build_exported,
    check_archive,
    output_index,
)
from ..catalog.expressions import ExpressionModule, check_name, compile_expression
from ..catalog.layers import build_sequential
from ..catalog.losses import Loss, build_loss
from ..catalog.optimizers import build_optimizer
from ..catalog.plugins import build_plugin
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .hooks import Hooks
from .limits import Limits
from .spec import FLOAT_DTYPES, SOURCES, ModelSpec

T = TypeVar("T")
# Seeded construction touches torch's global RNG; one creation at a time keeps it reproducible.
_RNG_LOCK = threading.Lock()


@dataclass
class BackwardResult:
    loss: float | None
    step: int
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    input_grads: list[torch.Tensor] = field(default_factory=list)
    output: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)  # all, for multi-output models


@dataclass
class Outputs:
    """Every output of a multi-output model and the index of the one the loss applies to."""

    tensors: list[torch.Tensor]
    main: int


@dataclass
class _Graph:
    output: torch.Tensor
    inputs: list[torch.Tensor]
    nbytes: int
    created: float
    outputs: list[torch.Tensor] = field(default_factory=list)


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that later in-place updates cannot tear.

    From CUDA the copy goes into pinned memory without blocking; the caller synchronises once
    (_synchronize) before the results are read, after all copies have been queued.
    """
    t = t.detach()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.cpu() if t.device.type != "cpu" else t.clone()


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work (copies to pinned memory) before results leave the call."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _mib(nbytes: int) -> str:
    """A byte limit as its setting (--max-*-mb) states it, e.g. '1 MiB (1048576 bytes)'."""
    return f"{nbytes / (1024 * 1024):g} MiB ({nbytes} bytes)"


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def archive_limits(limits: Limits) -> ArchiveLimits:
    return ArchiveLimits(limits.max_exported_bytes, limits.max_exported_nodes,
                         limits.max_parameters, limits.exported_ops)


def _build_module(spec: ModelSpec, dtype: torch.dtype, limits: Limits,
                  device: torch.device) -> nn.Module:
    if spec.source == "exported":
        return build_exported(spec.exported, archive_limits(limits), device)
    if spec.source == "layers":
        return build_sequential(spec.layers)
    if spec.source == "expression":
        for name in spec.inputs:
            check_name(name, "spec.expression.inputs")
        if len(set(spec.inputs)) != len(spec.inputs):
            raise InvalidArgument("spec.expression.inputs: names must be unique")
        for name in spec.parameters:
            check_name(name, "spec.expression.parameters")
            if name in spec.inputs:
                raise InvalidArgument(f"spec.expression: {name!r} is both an input and a parameter")
        expr = compile_expression(spec.expression, [*spec.inputs, *spec.parameters], dtype)
        params = {}
        for name, value in spec.parameters.items():
            if not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
                raise InvalidArgument(f"spec.expression.parameters[{name}]: must be numeric")
            params[name] = value.detach().to(dtype).clone()
        return ExpressionModule(expr, spec.inputs, params)
    if spec.source == "plugin":
        return build_plugin(spec.plugin, spec.plugin_kwargs)
    raise InvalidArgument(f"spec.source: set exactly one of {SOURCES}")


class Model:
    """A model and its training state. Every public method takes the model's lock."""

    def __init__(self, model_id: str, spec: ModelSpec, device: torch.device, limits: Limits,
                 hooks: Hooks) -> None:
        dtype = FLOAT_DTYPES.get(spec.dtype)
        if dtype is None:
            raise InvalidArgument(f"spec.dtype: {spec.dtype!r} is not a floating dtype; "
                                  f"expected one of {sorted(FLOAT_DTYPES)}")
        self.id = model_id
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.limits = limits
        self.hooks = hooks
        self.loss_fn: Loss = build_loss(spec.loss, spec.loss_reduction, spec.loss_kwargs)
        self._check_size(spec, dtype)
        with _RNG_LOCK, torch.random.fork_rng(devices=[]):
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            module = _build_module(spec, dtype, limits, device)
        # Exported models: inputs and outputs by name, and which output the loss applies to.
        self.exported = module if isinstance(module, ExportedModule) else None
        self.input_names = (self.exported.input_names if self.exported is not None
                            else list(spec.inputs))
        self.output_names: list[str] = []
        self.main_output = 0
        if self.exported is not None:
            self.main_output = output_index(self.exported.output_names, spec.output_index,
                                            spec.output_name)
            if self.exported.num_outputs > 1:
                self.output_names = self.exported.output_names
        self.module: nn.Module = module.to(dtype=dtype).to(device)
        self.module.train()
        self._apply_initial(spec.initial_parameters)
        self._apply_frozen(spec.frozen)
        self.optimizer = build_optimizer(spec.optimizer, spec.optimizer_params,
                                         self.module.parameters())
        self.step_count = 0
        self.lock = threading.Lock()
        self.training_run: str | None = None
        self.deleted = threading.Event()
        self._graphs: OrderedDict[str, _Graph] = OrderedDict()
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._graph_bytes = 0
        self._results: OrderedDict[str, Any] = OrderedDict()
        self.created = time.time()

    # ------------------------------------------------------------------ construction helpers

    def _check_size(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        """Count parameters and buffers on the meta device before allocating anything real."""
        if spec.source == "expression":
            count = sum(v.numel() for v in spec.parameters.values())
        elif spec.source == "exported":  # counted from the archive's tables, nothing read yet
            count = check_archive(spec.exported, archive_limits(self.limits)).num_elements
        else:
            with torch.device("meta"):
                module = _build_module(spec, dtype, self.limits, torch.device("meta"))
            # Buffers count too: BatchNorm1d(10**9, affine=False) has no parameters but would
            # allocate gigabytes of running statistics.
            count = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
        if count > self.limits.max_parameters:
            raise ResourceExhausted(
                f"spec: the model has {count} parameter and buffer elements; the limit "
                f"(max_parameters) is {self.limits.max_parameters}"
            )

    def _named_state(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict(keep_vars=True))

    def _apply_initial(self, values: Mapping[str, torch.Tensor]) -> None:
        self._assign(values, "spec.initial_parameters")

    def _apply_frozen(self, names: Sequence[str]) -> None:
        params = dict(self.module.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise InvalidArgument(f"spec.frozen: unknown parameter(s) {unknown}; "
                                  f"parameters: {list(params)}")
        for name in names:
            params[name].requires_grad_(False)

    def _assign(self, values: Mapping[str, torch.Tensor], what: str) -> None:
        """Copy values into parameters/buffers in place, all checked before any is written."""
        state = self._named_state()
        for name, value in values.items():
            if name not in state:
                raise InvalidArgument(f"{what}[{name}]: unknown name; known: {list(state)}")
            if tuple(value.shape) != tuple(state[name].shape):
                raise InvalidArgument(f"{what}[{name}]: shape {list(value.shape)} does not match "
                                      f"{list(state[name].shape)}")
            if value.is_floating_point() != state[name].is_floating_point():
                raise InvalidArgument(f"{what}[{name}]: dtype {value.dtype} does not fit "
                                      f"{state[name].dtype}")
        with torch.no_grad():
            for name, value in values.items():
                state[name].copy_(value)

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        params = dict(self.module.named_parameters())
        entries = []
        for name, t in self.module.state_dict(keep_vars=True).items():
            is_param = name in params
            entries.append({"name": name, "shape": list(t.shape),
                            "dtype": str(t.dtype).removeprefix("torch."),
                            "trainable": bool(is_param and t.requires_grad),
                            "buffer": not is_param})
        return {
            "model_id": self.id, "spec": self.spec, "parameters": entries,
            "step": self.step_count, "device": str(self.device),
            "num_parameters": sum(p.numel() for p in params.values()),
            "inputs": list(self.input_names), "retained_graphs": len(self._graphs),
            "training": self.training_run is not None, "outputs": list(self.output_names),
        }

    # ------------------------------------------------------------------ request plumbing

    @contextmanager
    def mutating(self) -> Iterator[None]:
        """Hold the lock for a state-changing call; refuse while a Train run owns the model."""
        with self.lock:
            if self.training_run is not None:
                raise FailedPrecondition(
                    f"model {self.id!r} is training (run {self.training_run}); cancel the run "
                    "or wait for it to finish"
                )
            yield

    def once(self, request_id: str, fn: Callable[[], T]) -> T:
        """Run fn at most once per request_id (caller holds the lock); repeats get the result."""
        if not request_id:
            return fn()
        if request_id in self._results:
            return self._results[request_id]  # type: ignore[no-any-return]
        result = fn()
        self._results[request_id] = result
        while len(self._results) > self.limits.request_id_window:
            self._results.popitem(last=False)
        return result

    def prepare_inputs(self, inputs: Sequence[torch.Tensor], requires_grad: bool = False
                       ) -> list[torch.Tensor]:
        """Move inputs to the device; floating ones take the model dtype (documented rule)."""
        expected = len(self.input_names) if self.spec.source in ("expression", "exported") else (
            1 if self.spec.source == "layers" else None)
        if expected is not None and len(inputs) != expected:
            names = f" ({', '.join(self.input_names)})" if self.input_names else ""
            raise InvalidArgument(f"inputs: the model takes {expected} input(s){names}, "
                                  f"got {len(inputs)}")
        out = []
        for t in inputs:
            # .to() is skipped when nothing changes: each torch call drops and retakes the GIL.
            # Copies to a GPU do not block; the call synchronises before its results return.
            if t.is_floating_point():
                if t.dtype != self.dtype or t.device != self.device:
                    t = t.to(device=self.device, dtype=self.dtype, non_blocking=True)
                if requires_grad:
                    t = t.detach().requires_grad_(True)
            elif t.device != self.device:
                t = t.to(device=self.device, non_blocking=True)
            out.append(t)
        return out

    def prepare_target(self, target: torch.Tensor | None) -> torch.Tensor | None:
        if target is None:
            return None
        if target.is_floating_point():
            if target.dtype != self.dtype or target.device != self.device:
                target = target.to(device=self.device, dtype=self.dtype, non_blocking=True)
            return target
        if target.device != self.device:
            target = target.to(device=self.device, non_blocking=True)
        return target

    def run_outputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """module(*inputs) as a list of outputs, turning torch's shape/dtype complaints into
        INVALID_ARGUMENT. Exported graphs are first run on meta tensors against max_graph_mb."""
        try:
            if self.exported is not None:
                self.exported.check_memory(inputs, self.limits.max_graph_bytes)
                return list(self.module(*inputs))
            out = self.module(*inputs)
        except InvalidArgument:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise InvalidArgument(f"inputs: the forward pass failed: {exc}") from None
        if not isinstance(out, torch.Tensor):
            raise InvalidArgument("the model returned a non-tensor output; plugins must return "
                                  "one tensor")
        return [out]

    def run_module(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The output the loss applies to (the only one, except for multi-output models)."""
        return self.run_outputs(inputs)[self.main_output]

    def _pack(self, outs: list[torch.Tensor]) -> torch.Tensor | Outputs:
        return Outputs(outs, self.main_output) if self.output_names else outs[0]

    def _timed(self, phase: str, start: float) -> None:
        self.hooks.phase_seconds(self.id, phase, time.perf_counter() - start)

    # ------------------------------------------------------------------ Forward

    def forward(self, inputs: Sequence[torch.Tensor], retain_graph: bool, eval_mode: bool
                ) -> tuple[torch.Tensor | Outputs, str]:
        start = time.perf_counter()
        with self.lock:
            self._expire_graphs()
            if retain_graph and self.training_run is not None:
                raise FailedPrecondition(f"model {self.id!r} is training; retained forwards "
                                         "are refused until the run ends")
            self.set_mode(eval_mode)
            try:
                if not retain_graph:
                    with torch.no_grad():
                        outs = self.run_outputs(self.prepare_inputs(inputs))
                    if any(out.device.type != "cpu" for out in outs):
                        outs = [_snapshot(out) for out in outs]
                        _synchronize(self.device)
                    else:  # a plugin may enable grad itself
                        outs = [out.detach() if out.requires_grad else out for out in outs]
                    self._timed("forward", start)
                    return self._pack(outs), ""
                xs = self.prepare_inputs(inputs, requires_grad=True)
                outs = self.run_outputs(xs)
                forward_id = self._retain(outs, xs)
            finally:
                self.set_mode(False)
            self._timed("forward", start)
            outs = [_snapshot(out) for out in outs]
            _synchronize(self.device)
            return self._pack(outs), forward_id

    def set_mode(self, eval_mode: bool) -> None:
        """module.train()/eval(), skipped when already there (it walks every submodule)."""
        if self.module.training == eval_mode:
            self.module.train(not eval_mode)

    def _retain(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> str:
        if not any(out.requires_grad for out in outputs):
            raise FailedPrecondition("retain_graph: the output does not depend on any trainable "
                                     "parameter or floating input; nothing to differentiate")
        forward_id = uuid.uuid4().hex
        nbytes = _nbytes([*outputs, *inputs])
        # Refuse before evicting: a graph that can never fit must not cost the others theirs.
        if nbytes > self.limits.max_graph_bytes:
            raise ResourceExhausted(f"retain_graph: this graph holds {nbytes} bytes; the limit "
                                    f"(max_graph_mb) is {_mib(self.limits.max_graph_bytes)}")
        while self._graphs and (len(self._graphs) >= self.limits.max_graphs
                                or self._graph_bytes + nbytes > self.limits.max_graph_bytes):
            self._evict(next(iter(self._graphs)), "the per-model budget "
                        f"(max_graphs={self.limits.max_graphs}, "
                        f"max_graph_mb={_mib(self.limits.max_graph_bytes)}) was reached")
        self._graphs[forward_id] = _Graph(outputs[self.main_output], inputs, nbytes,
                                          time.monotonic(), outputs)
        self._graph_bytes += nbytes
        self.hooks.graphs(self.id, len(self._graphs), 0)
        return forward_id

    def _evict(self, forward_id: str, why: str) -> None:
        graph = self._graphs.pop(forward_id)
        self._graph_bytes -= graph.nbytes
        self._evicted[forward_id] = why
        while len(self._evicted) > 4096:
            self._evicted.popitem(last=False)
        self.hooks.graphs(self.id, len(self._graphs), 1)

    def _expire_graphs(self) -> None:
        deadline = time.monotonic() - self.limits.graph_ttl_s
        while self._graphs:
            forward_id, graph = next(iter(self._graphs.items()))
            if graph.created > deadline:
                break
            self._evict(forward_id, f"it was unused for {self.limits.graph_ttl_s:g} s (graph TTL)")

    def _take_graph(self, forward_id: str) -> _Graph:
        self._expire_graphs()
        graph = self._graphs.pop(forward_id, None)
        if graph is not None:
            self._graph_bytes -= graph.nbytes
            self.hooks.graphs(self.id, len(self._graphs), 0)
            return graph
        why = self._evicted.get(forward_id)
        if why is not None:
            raise FailedPrecondition(f"forward_id {forward_id}: the graph was evicted because {why};"
                                     " run Forward again")
        raise NotFound(f"forward_id {forward_id!r}: no retained graph with this id on model "
                       f"{self.id!r} (each graph is consumed by one Backward)")

    def drop_graphs(self) -> None:
        self._graphs.clear()
        self._graph_bytes = 0

    # ------------------------------------------------------------------ Backward / Step

    def backward(
        self,
        *,
        inputs: Sequence[torch.Tensor],
        target: torch.Tensor | None,
        forward_id: str,
        grad_output: torch.Tensor | None,
        return_grads: bool,
        return_input_grads: bool,
        step: bool,
        return_output: bool,
        request_id: str = "",
        grad_outputs: Sequence[torch.Tensor] = (),
    ) -> BackwardResult:
        with self.mutating():
            return self.once(request_id, lambda: self._backward(
                inputs, target, forward_id, grad_output, return_grads, return_input_grads,
                step, return_output, grad_outputs))

    def _backward(self, inputs: Sequence[torch.Tensor], target: torch.Tensor | None,
                  forward_id: str, grad_output: torch.Tensor | None, return_grads: bool,
                  return_input_grads: bool, step: bool, return_output: bool,
                  grad_outputs: Sequence[torch.Tensor] = ()) -> BackwardResult:
        start = time.perf_counter()
        if grad_outputs and (grad_output is not None or target is not None or not forward_id):
            raise InvalidArgument("grad_outputs: only with forward_id, and instead of "
                                  "grad_output and target")
        if forward_id:
            if inputs:
                raise InvalidArgument("inputs: give either inputs (fused) or forward_id, not both")
            if ((grad_output is None) == (target is None) and self.loss_fn.needs_target
                    and not grad_outputs):
                raise InvalidArgument("with forward_id give exactly one of target or grad_output")
            graph = self._take_graph(forward_id)
            out, xs, outs = graph.output, graph.inputs, graph.outputs
        else:
            if grad_output is not None:
                raise InvalidArgument("grad_output: only valid with forward_id")
            xs = self.prepare_inputs(inputs, requires_grad=return_input_grads)
            self.set_mode(False)
            outs = self.run_outputs(xs)
            out = outs[self.main_output]
            self._timed("forward", start)
            start = time.perf_counter()
        loss_value: float | None = None
        roots: list[torch.Tensor]
        grads_in: list[torch.Tensor] | None
        if grad_outputs:
            if len(grad_outputs) != len(outs):
                raise InvalidArgument(f"grad_outputs: {len(grad_outputs)} given; the model has "
                                      f"{len(outs)} output(s) ({', '.join(self.output_names)})")
            roots, grads_in = [], []
            for i, (o, g) in enumerate(zip(outs, grad_outputs)):
                if g.shape != o.shape:
                    raise InvalidArgument(f"grad_outputs[{i}]: shape {list(g.shape)} does not "
                                          f"match the output shape {list(o.shape)}")
                if o.requires_grad:
                    roots.append(o)
                    grads_in.append(g.to(device=o.device, dtype=o.dtype))
        elif grad_output is not None:
            g = self.prepare_target(grad_output)
            assert g is not None
            if g.shape != out.shape:
                raise InvalidArgument(f"grad_output: shape {list(g.shape)} does not match the "
                                      f"output shape {list(out.shape)}")
            roots, grads_in = [out], [g.to(out.dtype)]
        else:
            loss = self.loss_fn(out, self.prepare_target(target))
            loss_value = float(loss.detach())
            roots, grads_in = [loss], None
        wanted = [x for x in xs if x.requires_grad] if return_input_grads else []
        if not roots or not all(r.requires_grad for r in roots):
            raise FailedPrecondition("the loss does not depend on any trainable parameter or "
                                     "input; nothing to differentiate")
        try:
            torch.autograd.backward(roots, grads_in)
        except RuntimeError as exc:
            raise InvalidArgument(f"backward failed: {exc}") from None
        self._timed("backward", start)
        result = BackwardResult(loss=loss_value, step=self.step_count)
        if loss_value is not None:
            self.hooks.loss(self.id, loss_value)
        if return_grads:
            result.grads = {n: _snapshot(p.grad) for n, p in self.module.named_parameters()
                            if p.grad is not None}
        if return_input_grads:
            result.input_grads = [_snapshot(x.grad) if x.grad is not None else
                                  torch.zeros_like(x, device="cpu") for x in wanted]
        if return_output:
            result.output = _snapshot(out)
            if self.output_names:
                result.outputs = [_snapshot(o) for o in outs]
        if step:
            result.step = self._step(zero_grad=True)
        _synchronize(self.device)
        return result

    def step(self, keep_grad: bool = False, request_id: str = "") -> int:
        with self.mutating():
            return self.once(request_id, lambda: self._step(zero_grad=not keep_grad))

    def _step(self, zero_grad: bool, samples: int = 0) -> int:
        start = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.step()
            if zero_grad:
                self.optimizer.zero_grad()
        self.step_count += 1
        self._timed("optimizer_step", start)
        self.hooks.steps(self.id, 1, samples)
        if self.optimizer is not None:
            self.hooks.learning_rate(self.id, float(self.optimizer.param_groups[0]["lr"]))
        return self.step_count

    def zero_grad(self, request_id: str = "") -> None:
        with self.mutating():
            self.once(request_id, lambda: self.module.zero_grad())

    # ------------------------------------------------------------------ parameters

    def get_parameters(self, names: Sequence[str], include_grads: bool, include_buffers: bool
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                  dict[str, torch.Tensor]]:
        with self.lock:
            params = dict(self.module.named_parameters())
            buffers = dict(self.module.named_buffers())
            unknown = [n for n in names if n not in params and n not in buffers]
            if unknown:
                raise NotFound(f"names: unknown parameter(s) {unknown}; known: "
                               f"{[*params, *buffers]}")
            chosen = list(names) or [*params, *(buffers if include_buffers else ())]
            values = {n: _snapshot(params[n]) for n in chosen if n in params}
            bufs = {n: _snapshot(buffers[n]) for n in chosen if n in buffers}
            grads = {n: _snapshot(params[n].grad) for n in values
                     if include_grads and params[n].grad is not None}
            _synchronize(self.device)
            return values, grads, bufs

    def set_parameters(self, values: Mapping[str, torch.Tensor], request_id: str = "") -> None:
        if not values:
            raise InvalidArgument("parameters: give at least one name -> tensor")
        with self.mutating():
            self.once(request_id, lambda: self._assign(values, "parameters"))

    def total_grad_norm(self) -> float:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads))
