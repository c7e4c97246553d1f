"""One live model: module, loss, optimizer, retained graphs, and PyTorch's semantics on them."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
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
from ..catalog.layers import build_sequential, layer_inputs
from ..catalog.losses import Loss, build_loss
from ..catalog.optimizers import build_optimizer, state_factor
from ..catalog.plugins import build_plugin
from ..catalog.schedules import LRScheduler
from . import estimate
from .budget import MemoryBudget, Reservation, fmt_bytes
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .hooks import Hooks
from .limits import Limits
from .parallel import (
    ASSIGN,
    BACKWARD,
    FORWARD,
    FUSED,
    LOCAL,
    STEP,
    ZERO_GRAD,
    Parallel,
    Work,
)
from .request_ids import RequestIdWindow, fingerprint
from .spec import FLOAT_DTYPES, SOURCES, ModelSpec

T = TypeVar("T")
# torch's global generator is what dropout draws from. Each model keeps its own stream and swaps
# it in around calls that may draw (and around construction); this lock makes each swap atomic.
_RNG_LOCK = threading.Lock()
# Layers that draw random numbers in training mode. MultiheadAttention drops out functionally,
# without a submodule. Sources other than layers and expressions (plugins: arbitrary code) are
# assumed to draw; expressions never do.
RANDOM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd, nn.RReLU, nn.MultiheadAttention)
# Memory estimates kept per model: one per input signature (shapes, dtypes, mode).
MAX_ESTIMATES = 256
_NO_ESTIMATE = estimate.Estimate(0, 0, 0)


@dataclass
class BackwardResult:
    loss: float | None
    step: int
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    input_grads: list[torch.Tensor] = field(default_factory=list)
    output: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)  # all, for multi-output models


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did: the model's step count after it, the total gradient norm
    before clipping (nan when not computed) and the learning rate it used."""

    step: int
    grad_norm: float
    lr: float


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
    # The whole batch's output shapes, and its rows per rank (a graph split over a group:
    # each rank keeps its shard's graph under the same id).
    shapes: list[torch.Size] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


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


def nbytes_of(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _draws_random(spec: ModelSpec, module: nn.Module) -> bool:
    if spec.source == "expression":
        return False
    if spec.source != "layers":
        return True
    return any(isinstance(m, RANDOM_LAYERS) for m in module.modules())


class ModelRNG:
    """A model's own random stream: torch's CPU generator state (and its CUDA device's).

    It starts as torch's global generator would be after `torch.manual_seed(seed)` and building
    the model, and advances only by the model's own calls (dropout masks in training mode), so
    a remote model draws what the same local code draws. It is saved in checkpoints.
    """

    def __init__(self, device: torch.device, cpu: torch.Tensor,
                 cuda: torch.Tensor | None = None) -> None:
        self.device = device
        self.cpu = cpu
        self.cuda = cuda

    @classmethod
    def capture(cls, device: torch.device) -> ModelRNG:
        """The global generators' state now (caller holds _RNG_LOCK inside fork_rng)."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(device, torch.get_rng_state(), cuda)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Swap this stream into torch's global generators for the block, then swap it out."""
        cuda = self.device.type == "cuda"
        with _RNG_LOCK:
            saved = torch.get_rng_state()
            saved_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
            torch.set_rng_state(self.cpu)
            if cuda and self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            try:
                yield
            finally:
                self.cpu = torch.get_rng_state()
                if cuda:
                    self.cuda = torch.cuda.get_rng_state(self.device)
                    torch.cuda.set_rng_state(saved_cuda, self.device)  # type: ignore[arg-type]
                torch.set_rng_state(saved)


def _plain(value: Any) -> Any:
    """An optimizer hyper-parameter as JSON: tuples as lists, 0-d tensors as numbers."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _fresh_seed() -> int:
    """A seed for a model created without one (never the global generator's next state)."""
    return int.from_bytes(os.urandom(8), "little") >> 1
def _meta_size(spec: ModelSpec, dtype: torch.dtype, limits: Limits) -> tuple[int, int, int]:
    """(parameter and buffer elements, their bytes, trainable parameter bytes), on meta tensors."""
    size = torch.empty((), dtype=dtype).element_size()
    if spec.source == "expression":
        count = sum(v.numel() for v in spec.parameters.values())
        frozen = sum(v.numel() for k, v in spec.parameters.items() if k in spec.frozen)
        return count, count * size, (count - frozen) * size
    if spec.source == "exported":  # counted from the archive's tables, nothing read yet
        count = check_archive(spec.exported, archive_limits(limits)).num_elements
        return count, count * size, count * size
    with torch.device("meta"):
        module = _build_module(spec, dtype, limits, torch.device("meta")).to(dtype=dtype)
    # Buffers count too: BatchNorm1d(10**9, affine=False) has no parameters but would
    # allocate gigabytes of running statistics.
    tensors = (*module.parameters(), *module.buffers())
    trainable = sum(p.nbytes for name, p in module.named_parameters() if name not in spec.frozen)
    return sum(t.numel() for t in tensors), sum(t.nbytes for t in tensors), trainable


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
        expr = compile_expression(spec.expression, [*spec.inputs, *spec.parameters])
        params = {}
        # In name order: a proto map has none, and the order is the optimizer's and the
        # state_dict's (it decides how clip_grad_norm sums the norms).
        for name, value in sorted(spec.parameters.items()):
            if not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
                raise InvalidArgument(f"spec.expression.parameters[{name}]: must be numeric")
            params[name] = value.detach().to(dtype).clone()
        return ExpressionModule(expr, spec.inputs, params)
    if spec.source == "plugin":
        return build_plugin(spec.plugin, spec.plugin_kwargs)
    raise InvalidArgument(f"spec.source: set exactly one of {SOURCES}")


class Model:
    """A model and its training state. Every public method takes the model's lock."""

    # Where its work runs: this process, or every rank of a group (the store sets it).
    parallel: Parallel = LOCAL

    def __init__(self, model_id: str, spec: ModelSpec, device: torch.device, limits: Limits,
                 hooks: Hooks, budget: MemoryBudget | None = None) -> None:
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
        self.loss_fn: Loss = build_loss(spec.loss, spec.loss_reduction, spec.loss_kwargs,
                                         dtype, device)
        self.budget = budget if budget is not None else MemoryBudget()
        self._charges: dict[str, int] = {}
        self._trainable_bytes = self._check_size(spec, dtype)
        try:
            seed = spec.seed if spec.seed is not None else _fresh_seed()
            cuda = [device] if device.type == "cuda" else []
            with _RNG_LOCK, torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                module = _build_module(spec, dtype, limits, device)
                # The stream continues where initialisation left it, as in local code.
                self.rng = ModelRNG.capture(device)
            self.draws_random = _draws_random(spec, module)
            # Exported models: inputs and outputs by name, and which output the loss applies to.
            self.exported = module if isinstance(module, ExportedModule) else None
            self.input_names = (self.exported.input_names if self.exported is not None
                                else list(spec.inputs))
            # Inputs a call must give: declared (expressions, exported), the first layer's
            # (layers: two for Bilinear), unchecked (plugins).
            self.num_inputs: int | None = (
                len(self.input_names) if spec.source in ("expression", "exported")
                else layer_inputs(spec.layers[0]["type"]) if spec.source == "layers" else None)
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
        except BaseException:
            self.close()
            raise
        self.step_count = 0
        self.lock = threading.Lock()
        # Changes since the last checkpoint of this model under its own id: autosave writes a
        # model only when version moved past saved_version. Bumped by every call that may
        # change the model (mutating(), train-mode forwards, a Train run's start and end).
        self.version = 1
        self.saved_version = 0
        self._training_run: str | None = None
        self.deleted = threading.Event()
        self._graphs: OrderedDict[str, _Graph] = OrderedDict()
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._graph_bytes = 0
        self.requests = RequestIdWindow(limits.request_id_window, limits.request_id_window_bytes)
        self.created = time.time()
        # Memory pre-checks: the module on meta tensors (built on first use; None: it cannot
        # be copied) and the estimates by call signature.
        self._twin: nn.Module | None | bool = False
        self._estimates: OrderedDict[tuple[Any, ...], estimate.Estimate] = OrderedDict()
        self._state_keys: set[int] | None = None

    @property
    def training_run(self) -> str | None:
        return self._training_run

    @training_run.setter
    def training_run(self, run: str | None) -> None:
        self._training_run = run
        self.version += 1  # a run zeroes gradients first and steps: the model changes

    # ------------------------------------------------------------------ construction helpers

    def _check_size(self, spec: ModelSpec, dtype: torch.dtype) -> int:
        """Size the model on the meta device and charge the memory budget before allocating.

        Charged: parameters and buffers, a gradient per trainable parameter and the optimizer's
        state (catalog.optimizers.STATE_TENSORS). Returns the trainable bytes.
        """
        count, nbytes, trainable = _meta_size(spec, dtype, self.limits)
        if count > self.limits.max_parameters:
            raise ResourceExhausted(
                f"spec: the model has {count} parameter and buffer elements; the limit "
                f"(max_parameters) is {self.limits.max_parameters}"
            )
        charges = {"parameters": nbytes, "gradients": trainable,
                   "optimizer": trainable * state_factor(spec.optimizer, spec.optimizer_params)}
        self.budget.charge_all(charges, lambda: (
            f"model {self.id!r} ({count} parameter and buffer elements: "
            f"{', '.join(f'{k} {fmt_bytes(v)}' for k, v in charges.items())})"))
        self._charges = charges
        return trainable

    def close(self) -> None:
        """Give back the model's memory budget (deleted, replaced, or never finished building)."""
        charges, self._charges = self._charges, {}
        for kind, nbytes in charges.items():
            self.budget.release(kind, nbytes)
        if getattr(self, "_graphs", None):
            self.drop_graphs()

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

    def check_alive(self) -> None:
        """NotFound once the model was deleted or replaced (caller holds the lock): a call that
        waited for the lock while DeleteModel closed the model must not charge it anything."""
        if self.deleted.is_set():
            raise NotFound(f"model_id: model {self.id!r} was deleted or replaced while this call "
                           "waited for it")

    @contextmanager
    def mutating(self) -> Iterator[None]:
        """Hold the lock for a state-changing call; refuse while a Train run owns the model."""
        with self.lock:
            self.check_alive()
            if self.training_run is not None:
                raise FailedPrecondition(
                    f"model {self.id!r} is training (run {self.training_run}); cancel the run "
                    "or wait for it to finish"
                )
            self.version += 1
            yield

    def once(self, method: str, request_id: str, payload: Callable[[], tuple[Any, ...]],
             fn: Callable[[], T]) -> T:
        """Run fn at most once per (method, request_id) (caller holds the lock).

        A repeat with the same payload gets the first reply; payload() is only evaluated when
        there is an id (its fingerprint tells a retry from a reuse of the id).
        """
        if not request_id:
            return fn()
        try:
            return self.requests.run(method, request_id, lambda: fingerprint(*payload()), fn)
        finally:
            self._charge_replies()

    def _charge_replies(self) -> None:
        """Keep the budget's id_cache charge equal to the replies kept; trim them if it is full."""
        held = self._charges.get("id_cache", 0)
        now = self.requests.nbytes
        if now > held and not self.budget.try_charge("id_cache", now - held):
            self.requests.trim(held)  # the budget is full: keep fewer replies, never more memory
            now = self.requests.nbytes
        if now < held:
            self.budget.release("id_cache", held - now)
        self._charges["id_cache"] = now

    def prepare_inputs(self, inputs: Sequence[torch.Tensor], requires_grad: bool = False,
                       leaves: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Move inputs to the device; floating ones take the model dtype (documented rule).

        requires_grad: each floating input becomes a leaf that requires grad, in its own dtype
        and place, and what the model gets is its cast (an autograd op, as in local code);
        the leaves are appended to `leaves`.
        """
        expected = self.num_inputs
        if expected is not None and len(inputs) != expected:
            names = f" ({', '.join(self.input_names)})" if self.input_names else ""
            raise InvalidArgument(f"inputs: the model takes {expected} input(s){names}, "
                                  f"got {len(inputs)}")
        out = []
        for t in inputs:
            # .to() is skipped when nothing changes: each torch call drops and retakes the GIL.
            # Copies to a GPU do not block; the call synchronises before its results return.
            if t.is_floating_point():
                if requires_grad:
                    t = t.detach().requires_grad_(True)
                    if leaves is not None:
                        leaves.append(t)
                if t.dtype != self.dtype or t.device != self.device:
                    t = t.to(device=self.device, dtype=self.dtype, non_blocking=True)
            elif t.device != self.device:
                t = t.to(device=self.device, non_blocking=True)
            out.append(t)
        return out

    def prepared_bytes(self, inputs: Sequence[torch.Tensor]) -> int:
        """nbytes_of(prepare_inputs(inputs)), without preparing them (floating: model dtype)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for t in inputs)

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
        INVALID_ARGUMENT. Exported graphs are first run on fake tensors against max_graph_mb.

        In training mode the model changes (BatchNorm statistics, its random stream): the
        version moves, and a model that draws random numbers draws from its own stream.
        """
        try:
            if self.exported is not None:
                self.exported.check_memory(inputs, self.limits.max_graph_bytes)
            if self.module.training:
                self.version += 1
                if self.draws_random:
                    with self.rng.active():
                        out = self.module(*inputs)
                else:
                    out = self.module(*inputs)
            else:
                out = self.module(*inputs)
            if self.exported is not None:
                return list(out)
        except InvalidArgument:
            raise
        # ArithmeticError: exported graphs' checks on fake tensors divide by a batch of one.
        except (RuntimeError, ValueError, IndexError, TypeError, ArithmeticError) as exc:
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

    @property
    def trainable_bytes(self) -> int:
        """Bytes of the trainable parameters (their gradients; an optimizer step's temporaries)."""
        return self._trainable_bytes

    def _timed(self, phase: str, start: float) -> None:
        self.hooks.phase_seconds(self.id, phase, time.perf_counter() - start)

    # ------------------------------------------------------------------ memory pre-checks

    def request_bytes(self, tensors: Sequence[torch.Tensor], call: str) -> Reservation:
        """Charge a request's tensors to the budget while the call holds them."""
        return self.budget.reserve("requests", nbytes_of(tensors),
                                   lambda: f"{call} on model {self.id!r} (its request tensors)")

    def _signature(self, tensors: Sequence[torch.Tensor], requires_grad: bool = False
                   ) -> tuple[tuple[torch.Size, torch.dtype, bool], ...]:
        """Shapes and dtypes the model computes with (floating inputs take the model dtype)."""
        dtype = self.dtype
        return tuple([(t.shape, dtype if t.is_floating_point() else t.dtype,
                       requires_grad or t.requires_grad) for t in tensors])

    def estimate_call(self, phase: str, inputs: Sequence[torch.Tensor], eval_mode: bool = False,
                 target: torch.Tensor | None = None, requires_grad: bool = False
                 ) -> estimate.Estimate:
        """What the call allocates, run once per signature on meta tensors (caller holds the lock).

        Repeats cost a dict lookup. A meta run that stops part way (bad inputs, an operator
        without a meta kernel) estimates what ran until then; a module that cannot be copied to
        meta tensors gets a zero estimate (its calls are not pre-checked).
        """
        sig = self._signature(inputs, requires_grad)
        tsig = None if target is None else self._signature((target,))[0][:2]
        key = (phase, eval_mode, sig, tsig)
        found = self._estimates.get(key)
        if found is not None:
            return found
        if self._twin is False:
            self._twin = estimate.meta_twin(self.module)
        twin = self._twin
        est = None
        if isinstance(twin, nn.Module):
            est = estimate.run(twin, sig, phase, eval_mode, self.loss_fn, tsig)
        est = est or _NO_ESTIMATE
        self._estimates[key] = est
        while len(self._estimates) > MAX_ESTIMATES:
            self._estimates.popitem(last=False)
        return est

    def reserve_call(self, nbytes: int, call: str, inputs: Sequence[torch.Tensor] = ()
                     ) -> Reservation:
        """Reserve a computation's estimated bytes, or refuse it before it runs."""
        return self.budget.reserve_call(nbytes, lambda: (
            f"{call} on model {self.id!r}"
            + (f" with inputs {[list(t.shape) for t in inputs]}" if inputs else "")))

    def reserve_batch(self, phase: str, inputs: Sequence[torch.Tensor],
                      target: torch.Tensor | None, call: str, extra: int = 0) -> Reservation:
        """estimate + reserve_call for one batch of a training loop (caller holds the lock)."""
        est = self.estimate_call(phase, inputs, phase == estimate.FORWARD, target)
        return self.reserve_call(est.peak + extra, call, inputs)

    def _state_storages(self) -> set[int]:
        """Storages of parameters and buffers: a graph that saves them holds nothing new."""
        if self._state_keys is None:
            self._state_keys = {estimate.storage_key(t)
                                for t in (*self.module.parameters(), *self.module.buffers())}
        return self._state_keys

    # ------------------------------------------------------------------ Forward

    def forward(self, inputs: Sequence[torch.Tensor], retain_graph: bool, eval_mode: bool
                ) -> tuple[torch.Tensor | Outputs, str]:
        start = time.perf_counter()
        with self.request_bytes(inputs, "Forward"), self.lock:
            self.check_alive()
            self._expire_graphs()
            if retain_graph and self.training_run is not None:
                raise FailedPrecondition(f"model {self.id!r} is training; retained forwards "
                                         "are refused until the run ends")
            self.set_mode(eval_mode)
            try:
                if not retain_graph:
                    est = self.estimate_call(estimate.FORWARD, inputs, eval_mode)
                    work = Work(FORWARD, {"eval": eval_mode, "retain": ""}, list(inputs))
                    with self.reserve_call(est.peak, "Forward", inputs), torch.no_grad():
                        outs = self.parallel.run(self, work).outputs
                        if any(out.device.type != "cpu" for out in outs):
                            outs = [_snapshot(out) for out in outs]
                            _synchronize(self.device)
                        else:  # a plugin may enable grad itself
                            outs = [out.detach() if out.requires_grad else out for out in outs]
                    self._timed("forward", start)
                    return self._pack(outs), ""
                est = self.estimate_call(estimate.RETAIN, inputs, eval_mode, requires_grad=True)
                # The graph holds the inputs as sent (its leaves) and their casts.
                held = self.prepared_bytes(inputs) + nbytes_of(
                    [t for t in inputs if t.is_floating_point() and t.dtype != self.dtype])
                if est.saved + held > self.limits.max_graph_bytes:  # refused before computing
                    raise self._graph_too_big(est.saved + held)
                # The output's copy for the reply (_snapshot) comes on top of the peak.
                with self.reserve_call(est.peak + est.output, "Forward(retain_graph)",
                                       inputs) as reservation:
                    # What autograd saves for backward, apart from parameters and the inputs.
                    saved = estimate.SavedBytes(self._state_storages())
                    forward_id = uuid.uuid4().hex
                    work = Work(FORWARD, {"eval": eval_mode, "retain": forward_id},
                                list(inputs), local=saved)
                    done = self.parallel.run(self, work)
                    # This rank keeps its shard's graph (one process: the whole batch's).
                    outs, xs = done.local_outputs, done.local_inputs
                    kept = sum(0 if estimate.storage_key(out) in saved.seen else out.nbytes
                               for out in outs)
                    self._retain(outs, xs, nbytes_of(xs) + saved.nbytes + kept, reservation,
                                 forward_id, [o.shape for o in done.outputs], work.sizes)
                    outs = [_snapshot(out) for out in done.outputs]
            finally:
                self.set_mode(False)
            self._timed("forward", start)
            _synchronize(self.device)
            return self._pack(outs), forward_id

    def set_mode(self, eval_mode: bool) -> None:
        """module.train()/eval(), skipped when already there (it walks every submodule)."""
        if self.module.training == eval_mode:
            self.module.train(not eval_mode)

    def _graph_too_big(self, nbytes: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"retain_graph: this graph holds {nbytes} bytes (inputs, output and what autograd "
            f"saves for backward); the limit (max_graph_mb) is "
            f"{_mib(self.limits.max_graph_bytes)}")

    def _retain(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], nbytes: int,
                reservation: Reservation, forward_id: str, shapes: list[torch.Size],
                sizes: list[int]) -> str:
        """Keep the graph: nbytes (inputs, outputs, saved tensors) move from the call's
        reservation to the budget's retained graphs."""
        if not any(out.requires_grad for out in outputs):
            raise FailedPrecondition("retain_graph: the output does not depend on any trainable "
                                     "parameter or floating input; nothing to differentiate")
        # Refuse before evicting: a graph that can never fit must not cost the others theirs.
        if nbytes > self.limits.max_graph_bytes:
            raise self._graph_too_big(nbytes)
        reservation.keep("graphs", nbytes, lambda: f"retain_graph on model {self.id!r}")
        while self._graphs and (len(self._graphs) >= self.limits.max_graphs
                                or self._graph_bytes + nbytes > self.limits.max_graph_bytes):
            self._evict(next(iter(self._graphs)), "the per-model budget "
                        f"(max_graphs={self.limits.max_graphs}, "
                        f"max_graph_mb={_mib(self.limits.max_graph_bytes)}) was reached")
        self._graphs[forward_id] = _Graph(outputs[self.main_output], inputs, nbytes,
                                          time.monotonic(), outputs, shapes, sizes)
        self._graph_bytes += nbytes
        self.hooks.graphs(self.id, len(self._graphs), 0)
        return forward_id

    def _evict(self, forward_id: str, why: str) -> None:
        graph = self._graphs.pop(forward_id)
        self._graph_bytes -= graph.nbytes
        self.budget.release("graphs", graph.nbytes)
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

    def _take_graph(self, forward_id: str) -> tuple[_Graph, Reservation]:
        """The graph, its budget charge now the reservation of the Backward consuming it."""
        self._expire_graphs()
        graph = self._graphs.pop(forward_id, None)
        if graph is not None:
            self._graph_bytes -= graph.nbytes
            self.hooks.graphs(self.id, len(self._graphs), 0)
            return graph, self.budget.convert("graphs", graph.nbytes)
        why = self._evicted.get(forward_id)
        if why is not None:
            raise FailedPrecondition(f"forward_id {forward_id}: the graph was evicted because {why};"
                                     " run Forward again")
        raise NotFound(f"forward_id {forward_id!r}: no retained graph with this id on model "
                       f"{self.id!r} (each graph is consumed by one Backward)")

    @property
    def graph_ids(self) -> list[str]:
        """Ids of the retained graphs, oldest first."""
        return list(self._graphs)

    def drop_graphs(self) -> None:
        self._graphs.clear()
        self.budget.release("graphs", self._graph_bytes)
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
        sent = [*inputs, *grad_outputs, *(t for t in (target, grad_output) if t is not None)]
        with self.request_bytes(sent, "Backward"), self.mutating(), ExitStack() as held:
            return self.once(
                "Backward", request_id,
                lambda: (list(inputs), target, forward_id, grad_output, return_grads,
                         return_input_grads, step, return_output, list(grad_outputs)),
                lambda: self._backward(inputs, target, forward_id, grad_output, return_grads,
                                       return_input_grads, step, return_output, held,
                                       grad_outputs))

    def _backward(self, inputs: Sequence[torch.Tensor], target: torch.Tensor | None,
                  forward_id: str, grad_output: torch.Tensor | None, return_grads: bool,
                  return_input_grads: bool, step: bool, return_output: bool,
                  held: ExitStack, grad_outputs: Sequence[torch.Tensor] = ()) -> BackwardResult:
        """held: the call's budget reservations end with it."""
        if grad_outputs and (grad_output is not None or target is not None or not forward_id):
            raise InvalidArgument("grad_outputs: only with forward_id, and instead of "
                                  "grad_output and target")
        # Copies this call returns (grads, input grads, output) and the optimizer's temporaries.
        copies = ((self._trainable_bytes if return_grads else 0)
                  + (self._trainable_bytes if step else 0))
        y = self.prepare_target(target)
        args = {"input_grads": return_input_grads, "output": return_output, "timed": True}
        if forward_id:
            if inputs:
                raise InvalidArgument("inputs: give either inputs (fused) or forward_id, not both")
            if ((grad_output is None) == (target is None) and self.loss_fn.needs_target
                    and not grad_outputs):
                raise InvalidArgument("with forward_id give exactly one of target or grad_output")
            graph, reservation = self._take_graph(forward_id)
            # The graph's bytes stay reserved while backward runs through it: the gradients it
            # produces take about as much again (a heuristic; the graph was measured exactly).
            held.enter_context(reservation)
            copies += graph.nbytes + (nbytes_of(graph.outputs) if return_output else 0)
            held.enter_context(self.reserve_call(copies, "Backward(forward_id)"))
            shapes = graph.shapes
            tensors: list[torch.Tensor | None]
            if grad_outputs:
                if len(grad_outputs) != len(shapes):
                    raise InvalidArgument(
                        f"grad_outputs: {len(grad_outputs)} given; the model has {len(shapes)} "
                        f"output(s) ({', '.join(self.output_names)})")
                for i, (shape, g) in enumerate(zip(shapes, grad_outputs)):
                    if g.shape != shape:
                        raise InvalidArgument(f"grad_outputs[{i}]: shape {list(g.shape)} does "
                                              f"not match the output shape {list(shape)}")
                kind, tensors = "grad_outputs", list(grad_outputs)
            elif grad_output is not None:
                shape = shapes[self.main_output]
                if grad_output.shape != shape:
                    raise InvalidArgument(f"grad_output: shape {list(grad_output.shape)} does not "
                                          f"match the output shape {list(shape)}")
                kind, tensors = "grad_output", [grad_output]
            else:
                kind, tensors = "loss", [target]
            # Split as the forward was: each rank backpropagates its own shard's graph.
            work = Work(BACKWARD, {**args, "kind": kind, "forward_id": forward_id}, tensors,
                        graph.sizes, graph)
        else:
            if grad_output is not None:
                raise InvalidArgument("grad_output: only valid with forward_id")
            est = self.estimate_call(estimate.BACKWARD, inputs, False, y,
                                     requires_grad=return_input_grads)
            copies += ((self.prepared_bytes(inputs) if return_input_grads else 0)
                       + (est.output if return_output else 0))
            held.enter_context(self.reserve_call(est.peak + copies, "Backward", inputs))
            self.set_mode(False)
            work = Work(FUSED, {**args, "inputs": len(inputs), "divide": 1,
                                "finite_only": False}, [*inputs, target])
        done = self.parallel.run(self, work)
        result = BackwardResult(loss=done.loss, step=self.step_count)
        if done.loss is not None:
            self.hooks.loss(self.id, done.loss)
        if return_grads:
            result.grads = {n: _snapshot(p.grad) for n, p in self.module.named_parameters()
                            if p.grad is not None}
        if return_input_grads:
            result.input_grads = [_snapshot(g) for g in done.input_grads]
        if return_output:
            result.output = _snapshot(done.outputs[self.main_output])
            if self.output_names:
                result.outputs = [_snapshot(o) for o in done.outputs]
        if step:
            result.step = self._step(zero_grad=True)
        _synchronize(self.device)
        return result

    @staticmethod
    def differentiate(roots: Sequence[torch.Tensor],
                      grads: Sequence[torch.Tensor] | None = None) -> None:
        """torch.autograd.backward(roots, grads): the one backward pass of every path
        (Backward, Train's micro-steps, TrainStream), gradients accumulating in .grad.
        FailedPrecondition when nothing is differentiable (every parameter frozen and no input
        asked for), InvalidArgument when autograd refuses the graph."""
        if not roots or not all(r.requires_grad for r in roots):
            raise FailedPrecondition("the loss does not depend on any trainable parameter or "
                                     "input; nothing to differentiate")
        try:
            torch.autograd.backward(list(roots), None if grads is None else list(grads))
        except RuntimeError as exc:
            raise InvalidArgument(f"backward failed: {exc}") from None

    def step(self, keep_grad: bool = False, request_id: str = "") -> int:
        with self.mutating(), self.reserve_call(self._trainable_bytes, "Step"):
            return self.once("Step", request_id, lambda: (keep_grad,),
                             lambda: self._step(zero_grad=not keep_grad))

    def _step(self, zero_grad: bool, samples: int = 0) -> int:
        """Step and Backward(step=True): apply_step, timed and reported at once."""
        start = time.perf_counter()
        stats = self.apply_step(zero_grad=zero_grad)
        self._timed("optimizer_step", start)
        self.hooks.steps(self.id, 1, samples)
        if self.optimizer is not None:
            self.hooks.learning_rate(self.id, float(self.optimizer.param_groups[0]["lr"]))
        return stats.step

    @property
    def learning_rate(self) -> float:
        """The first parameter group's learning rate (0 without an optimizer)."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    def apply_step(self, *, zero_grad: bool = True, clip: float = 0.0,
                   schedule: LRScheduler | None = None, want_norm: bool = False) -> StepStats:
        """The one optimizer step of every path (Step, Backward(step=True), Train, TrainStream):
        clip_grad_norm_ (clip > 0), optimizer.step(), schedule.step(), zero_grad, count it.

        Caller holds the lock. The gradients are final when this is called (accumulated, and
        in a data-parallel run already reduced). grad_norm: the total norm before clipping,
        computed when clipping or asked (want_norm), else nan; lr: what this step used.
        """
        lr = self.learning_rate
        norm = self.optimizer_step(clip=clip, want_norm=want_norm, zero_grad=zero_grad)
        if schedule is not None and self.optimizer is not None:
            schedule.step()  # on rank 0; the next STEP carries the rates to every rank
        self.step_count += 1
        return StepStats(self.step_count, norm, lr)

    def zero_grad(self, request_id: str = "") -> None:
        with self.mutating():
            self.once("ZeroGrad", request_id, tuple, self.clear_grads)

    # ------------------------------------------------------------------ work the trainer runs
    # Each is one Work item: on every rank of a group, in the same order (core/parallel.py).

    def train_batch(self, inputs: Sequence[torch.Tensor], target: torch.Tensor | None,
                    divide: int = 1, stop_below: float | None = None) -> float:
        """Forward, loss and backward of (loss / divide) of one batch; the batch's loss.

        No backward when the loss is not finite (the caller skips or stops) or below
        stop_below (an objective reaching stop_loss). Caller holds the lock.
        """
        work = Work(FUSED, {"inputs": len(inputs), "input_grads": False, "output": False,
                            "divide": divide, "finite_only": True, "timed": False,
                            "stop_below": stop_below},
                    [*inputs, target])
        loss = self.parallel.run(self, work).loss
        assert loss is not None
        return loss

    def optimizer_step(self, clip: float = 0.0, want_norm: bool = False,
                       zero_grad: bool = True) -> float:
        """Clip (clip > 0), optimizer.step() and zero_grad(); the gradient norm when clipped
        or asked (else NaN). Caller holds the lock."""
        work = Work(STEP, {"clip": clip, "norm": want_norm, "zero": zero_grad})
        return self.parallel.run(self, work).norm

    def clear_grads(self) -> None:
        """module.zero_grad() (caller holds the lock)."""
        self.parallel.run(self, Work(ZERO_GRAD))

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
            copies: list[torch.Tensor] = [params[n] for n in chosen if n in params]
            copies += [buffers[n] for n in chosen if n in buffers]
            copies += [g for n in chosen if n in params and include_grads
                       and (g := params[n].grad) is not None]
            with self.reserve_call(nbytes_of(copies), "GetParameters"):
                values = {n: _snapshot(params[n]) for n in chosen if n in params}
                bufs = {n: _snapshot(buffers[n]) for n in chosen if n in buffers}
                grads = {n: _snapshot(g) for n in values
                         if include_grads and (g := params[n].grad) is not None}
                _synchronize(self.device)
            return values, grads, bufs

    def optimizer_state(self, names: Sequence[str] = ()
                        ) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
        """(each parameter's optimizer state by name, the param_groups without "params"): what
        optimizer.state_dict() holds, keyed by parameter name instead of index."""
        with self.lock:
            params = dict(self.module.named_parameters())
            unknown = [n for n in names if n not in params]
            if unknown:
                raise NotFound(f"names: unknown parameter(s) {unknown}; known: {list(params)}")
            if self.optimizer is None:
                return {}, []
            chosen = [n for n in (names or params) if params[n] in self.optimizer.state]
            entries = {n: self.optimizer.state[params[n]] for n in chosen}
            copies = [v for entry in entries.values() for v in entry.values()
                      if isinstance(v, torch.Tensor)]
            with self.reserve_call(nbytes_of(copies), "GetParameters"):
                state = {n: {key: _snapshot(v) if isinstance(v, torch.Tensor)
                             else torch.tensor(v) for key, v in entry.items()
                             if isinstance(v, (torch.Tensor, int, float))}
                         for n, entry in entries.items()}
                _synchronize(self.device)
            groups = [{k: _plain(v) for k, v in group.items() if k != "params"}
                      for group in self.optimizer.param_groups]
            return state, groups

    def set_parameters(self, values: Mapping[str, torch.Tensor], request_id: str = "") -> None:
        if not values:
            raise InvalidArgument("parameters: give at least one name -> tensor")
        with self.request_bytes(list(values.values()), "SetParameters"), self.mutating():
            self.once("SetParameters", request_id, lambda: (dict(values),),
                      lambda: self._set(values))

    def _set(self, values: Mapping[str, torch.Tensor]) -> None:
        """SetParameters' values on every rank (checked before any is written)."""
        self.parallel.run(self, Work(ASSIGN, {"names": list(values), "what": "parameters"},
                                     list(values.values())))

    def total_grad_norm(self) -> float:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads))
