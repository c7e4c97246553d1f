"""The local reference: every gradserve call as plain PyTorch, written from docs/models.md alone.

Each method is the local equivalent docs/models.md documents ("Semantics", "Model specs", "Train"):
nothing here imports the server, and nothing reads the server's code. A model's random stream is
torch's global generator as local code would leave it (`torch.manual_seed(seed)`, then building
the model, then every training-mode call in order); since the test process shares torch's
global generator with the in-process server, each model keeps that state and swaps it in around
its own calls, which is what the same code running alone would see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

# docs/models.md "Expressions": the text evaluated as Python with these names bound.
EXPRESSION_NAMES: dict[str, Any] = {
    "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
    "log": torch.log, "log1p": torch.log1p, "sin": torch.sin, "cos": torch.cos,
    "tan": torch.tan, "abs": torch.abs, "sqrt": torch.sqrt, "square": torch.square,
    "sum": torch.sum, "mean": torch.mean, "matmul": torch.matmul,
    "softplus": nn.functional.softplus, "clamp": torch.clamp, "maximum": torch.maximum,
    "minimum": torch.minimum, "pi": math.pi, "e": math.e,
}
# docs/models.md "Losses": each name is the torch.nn loss of that name.
LOSSES: dict[str, type[nn.Module]] = {
    "mse": nn.MSELoss, "l1": nn.L1Loss, "smooth_l1": nn.SmoothL1Loss, "huber": nn.HuberLoss,
    "cross_entropy": nn.CrossEntropyLoss, "nll": nn.NLLLoss, "bce": nn.BCELoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
ELEMENTWISE = frozenset({"mse", "l1", "smooth_l1", "huber", "bce", "bce_with_logits"})
TENSOR_ARGS = frozenset({"weight", "pos_weight"})
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad,
}
SCHEDULES: dict[str, tuple[Any, dict[str, str]]] = {
    "step": (lr_scheduler.StepLR, {"step_size": "step_size", "gamma": "gamma"}),
    "exponential": (lr_scheduler.ExponentialLR, {"gamma": "gamma"}),
    "cosine": (lr_scheduler.CosineAnnealingLR, {"t_max": "T_max", "eta_min": "eta_min"}),
    "linear": (lr_scheduler.LinearLR, {"start_factor": "start_factor",
                                       "end_factor": "end_factor", "total_iters": "total_iters"}),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


class Failed(Exception):
    """The local code raised: the server must refuse the same call."""


class Expression(nn.Module):
    """An expression model: its text as Python over docs/models.md's names."""

    def __init__(self, text: str, inputs: Sequence[str], params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.text, self.input_names = text, list(inputs)
        self.code = compile(text, "<expression>", "eval")
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, *xs: torch.Tensor) -> Any:
        env = {**EXPRESSION_NAMES, **dict(self.named_parameters()),
               **dict(zip(self.input_names, xs))}
        return eval(self.code, {"__builtins__": {}}, env)


class Layers(nn.Sequential):
    """docs/models.md: a layers model is model[0](*inputs), then every later layer on the output."""

    def forward(self, *xs: Any) -> Any:
        out = self[0](*xs)
        for layer in list(self)[1:]:
            out = layer(out)
        return out


def as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """docs/models.md: a Python number or list sent to a model is torch.tensor(value, dtype=model dtype)
    when it holds floats, torch.tensor(value) when only integers; tensors keep their dtype."""
    if isinstance(value, torch.Tensor):
        return value
    t = torch.tensor(value)
    return torch.tensor(value, dtype=dtype) if t.is_floating_point() else t


@dataclass
class Spec:
    """What the test asks the server to build (create_model's arguments) and how local code
    builds the same: `local` returns the module (called after torch.manual_seed(seed))."""

    create: dict[str, Any]
    local: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], list[torch.Tensor]]
    target: Callable[[torch.Generator, torch.Tensor], torch.Tensor | None]
    # Exported models: the stream is reseeded after building (docs/exported.md).
    reseed: bool = False
    description: str = ""


@dataclass
class Event:
    kind: str
    step: int
    epoch: int
    batch_loss: float
    epoch_loss: float
    learning_rate: float
    grad_norm: float
    val_loss: float | None
    run_step: int
    total_steps: int
    summary: dict[str, Any] | None = None


@dataclass
class _Graph:
    outputs: list[torch.Tensor]
    leaves: list[torch.Tensor]


@dataclass
class Reference:
    """One model, as local code holds it."""

    spec: Spec
    order: list[str] = field(default_factory=list)  # parameter order (ModelInfo's)
    module: nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer | None = field(init=False)
    step_count: int = 0
    graphs: dict[str, _Graph] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.spec.create
        self.dtype = DTYPES[c.get("dtype", "float32")]
        seed = c["seed"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.spec.local()
            if self.spec.reseed:
                torch.manual_seed(seed)
            self.rng = torch.get_rng_state()
        self.module = module.to(dtype=self.dtype)
        self.module.train()
        with torch.no_grad():
            for name, value in (c.get("initial_parameters") or {}).items():
                self.module.state_dict(keep_vars=True)[name].copy_(as_tensor(value, self.dtype))
        for name in c.get("frozen", ()):
            dict(self.module.named_parameters())[name].requires_grad_(False)
        opt = dict(c.get("optimizer") or {"type": "sgd", "lr": 0.001})
        cls = OPTIMIZERS[opt.pop("type", "sgd")]
        if "betas" in opt:
            opt["betas"] = tuple(opt["betas"])
        params = list(self.module.parameters())
        self.optimizer = cls(params, **opt) if params else None
        loss = c.get("loss")
        cfg = {"type": loss} if isinstance(loss, str) else dict(loss or {"type": "none"})
        self.loss_name = cfg.pop("type")
        self.reduction = cfg.pop("reduction", "mean")
        self.loss_kwargs = {k: (torch.tensor(v, dtype=self.dtype) if k in TENSOR_ARGS else v)
                            for k, v in cfg.items()}
        if self.loss_name != "none":
            cls_ = LOSSES[self.loss_name]
            self.loss_fn: nn.Module | None = cls_(reduction=self.reduction, **self.loss_kwargs)
            self.loss_sum: nn.Module | None = cls_(reduction="sum", **self.loss_kwargs)
        else:
            self.loss_fn = self.loss_sum = None

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def stream(self) -> Iterator[None]:
        """This model's draws from torch's global generator, as if it were alone."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            try:
                yield
            finally:
                self.rng = torch.get_rng_state()

    def outputs(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """module(*xs) as a list of outputs (a dict's values, a tuple's items)."""
        try:
            if self.module.training:
                with self.stream():
                    out = self.module(*xs)
            else:
                out = self.module(*xs)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise Failed(f"forward: {exc}") from exc
        if isinstance(out, dict):
            return list(out.values())
        if isinstance(out, (tuple, list)):
            return list(out)
        if not isinstance(out, torch.Tensor):
            raise Failed(f"the model returned {type(out).__name__}")
        return [out]

    @property
    def main(self) -> int:
        """The output the loss applies to (TwoHeads: "score", its first)."""
        return 0

    def cast(self, xs: Sequence[torch.Tensor], grad: bool
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """docs/models.md: floating inputs are x.to(model dtype) inside autograd; ints pass as they are.
        Returns (what the model gets, the leaves that require grad)."""
        out, leaves = [], []
        for x in xs:
            if x.is_floating_point():
                if grad:
                    x = x.detach().requires_grad_(True)
                    leaves.append(x)
                x = x.to(self.dtype)
            out.append(x)
        return out, leaves

    def target(self, y: torch.Tensor | None) -> torch.Tensor | None:
        if y is None:
            return None
        if y.is_floating_point():
            return y.to(self.dtype)
        return y if self.loss_name in ELEMENTWISE else y.long()

    def loss(self, out: torch.Tensor, y: torch.Tensor | None, summed: bool = False
             ) -> torch.Tensor:
        if self.loss_fn is None:
            if y is not None or out.numel() != 1:
                raise Failed("loss none: a scalar output and no target")
            return out.reshape(())
        if y is None:
            raise Failed("the loss needs a target")
        if self.loss_name in ELEMENTWISE and out.shape != y.shape:
            raise Failed("docs/models.md: elementwise losses need the output's shape")
        try:
            return (self.loss_sum if summed else self.loss_fn)(out, y)  # type: ignore[misc]
        except (RuntimeError, ValueError, IndexError) as exc:
            raise Failed(f"loss: {exc}") from exc

    def count(self, out: torch.Tensor, t: torch.Tensor | None) -> float:
        """docs/models.md "Validation": what reduction "mean" divides a batch's summed loss by."""
        if self.loss_fn is None or t is None:
            return 1.0
        if self.loss_name in ELEMENTWISE:
            return float(out.numel())
        if t.is_floating_point():
            return float(out.numel() // out.shape[1 if out.dim() > 1 else 0])
        kept = t[t != self.loss_kwargs.get("ignore_index", -100)]
        weight = self.loss_kwargs.get("weight")
        if not isinstance(weight, torch.Tensor):
            return float(kept.numel())
        return float(weight.double()[kept].sum())

    def grad_norm(self, clip: float) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if clip > 0:
            return float(nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
        grads = [p.grad for p in params if p.grad is not None]
        return float(nn.utils.get_total_norm(grads)) if grads else 0.0

    def optimizer_step(self, clip: float = 0.0, scheduler: Any = None,
                       zero_grad: bool = True) -> tuple[float, float]:
        """(grad norm before clipping, the lr used): clip, step, schedule, zero_grad."""
        norm = self.grad_norm(clip)
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0
        if self.optimizer is not None:
            self.optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if zero_grad:
                self.optimizer.zero_grad()
        self.step_count += 1
        return norm, lr

    # ------------------------------------------------------------------ the calls

    def forward(self, xs: Sequence[torch.Tensor], eval_mode: bool, retain: str = ""
                ) -> list[torch.Tensor]:
        """docs/models.md Forward: no_grad unless retain_graph; training mode unless eval_mode."""
        self.module.train(not eval_mode)
        try:
            if not retain:
                with torch.no_grad():
                    cast, _ = self.cast(xs, grad=False)
                    return [o.detach() for o in self.outputs(cast)]
            cast, leaves = self.cast(xs, grad=True)
            outs = self.outputs(cast)
            if not any(o.requires_grad for o in outs):
                raise Failed("nothing to differentiate")
            self.graphs[retain] = _Graph(outs, leaves)
            return [o.detach() for o in outs]
        finally:
            self.module.train()

    def backward(self, xs: Sequence[torch.Tensor] | None, y: torch.Tensor | None, *,
                 forward_id: str = "", grad_output: torch.Tensor | None = None,
                 step: bool = False, input_grads: bool = False) -> dict[str, Any]:
        """docs/models.md Backward: fused (forward, loss, backward) or of a retained forward; inputs
        require grad when their gradients are asked for (a retained forward's always do)."""
        if forward_id:
            graph = self.graphs.pop(forward_id)
            outs, leaves = graph.outputs, graph.leaves
        else:
            cast, leaves = self.cast(xs or [], grad=input_grads)
            outs = self.outputs(cast)
        out = outs[self.main]
        loss_value = None
        if grad_output is not None:
            root, g = out, grad_output.to(out.dtype)
        else:
            root, g = self.loss(out, self.target(y)), None
            loss_value = float(root.detach())
        if not root.requires_grad:
            raise Failed("nothing to differentiate")
        try:
            torch.autograd.backward([root], None if g is None else [g])
        except RuntimeError as exc:
            raise Failed(f"backward: {exc}") from exc
        result = {
            "loss": loss_value,
            "grads": {n: p.grad.clone() for n, p in self.module.named_parameters()
                      if p.grad is not None},
            "input_grads": [x.grad.clone() if x.grad is not None else torch.zeros_like(x)
                            for x in leaves],
            "outputs": [o.detach() for o in outs],
        }
        if step:
            self.optimizer_step()
        result["step"] = self.step_count
        return result

    def step(self, keep_grad: bool = False) -> int:
        self.optimizer_step(zero_grad=not keep_grad)
        return self.step_count

    def zero_grad(self) -> None:
        self.module.zero_grad()

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        state = self.module.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, value in values.items():
                state[name].copy_(as_tensor(value, self.dtype))

    def drop_graphs(self) -> None:
        """A model loaded from a checkpoint keeps no retained graphs (docs/durability.md)."""
        self.graphs.clear()

    # ------------------------------------------------------------------ Train

    def schedule(self, spec: Mapping[str, Any] | None, total: int | None) -> Any:
        """docs/models.md "Schedules": warm-up LinearLR, the schedule, joined by SequentialLR."""
        if spec is None or self.optimizer is None:
            return None
        cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
        kind = cfg.pop("type", "none")
        warmup = int(cfg.pop("warmup_steps", 0))
        factor = float(cfg.pop("warmup_start_factor", 0.0)) or 0.1
        opt = self.optimizer
        parts = []
        if warmup:
            parts.append(lr_scheduler.LinearLR(opt, start_factor=factor, end_factor=1.0,
                                               total_iters=warmup))
        if kind != "none":
            cls, names = SCHEDULES[kind]
            kwargs = {names[k]: v for k, v in cfg.items()}
            if kind == "cosine" and "T_max" not in kwargs:
                assert total is not None
                kwargs["T_max"] = max(1, total - warmup)
            parts.append(cls(opt, **kwargs))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return lr_scheduler.SequentialLR(opt, list[lr_scheduler.LRScheduler](parts),
                                         milestones=[warmup])

    def train(self, X: Sequence[torch.Tensor] | None, y: torch.Tensor | None,
              validation: tuple[Sequence[torch.Tensor], torch.Tensor | None] | None,
              o: Mapping[str, Any]) -> list[Event]:
        """docs/models.md "The loop, exactly", as written there."""
        epochs, max_steps = o.get("epochs", 0), o.get("max_steps", 0)
        if not epochs and not max_steps:
            epochs = 1
        accumulation, clip = o.get("accumulation_steps", 1), o.get("clip_grad_norm", 0.0)
        stop_loss, every = o.get("stop_loss"), o.get("log_every_steps", 0)
        skip = o.get("skip_nonfinite", False)
        objective = X is None
        for what, pair in (("data", (X, y)), ("validation", validation)):
            xs, t = pair if pair is not None else (None, None)
            if xs is not None or t is not None:  # docs/models.md: one sample dimension for all tensors
                tensors = [*(xs or []), *([t] if t is not None else [])]
                if any(u.dim() == 0 for u in tensors) or len({u.shape[0] for u in tensors}) != 1:
                    raise Failed(f"{what}: tensors disagree on the number of samples")
            if validation is None:
                break
        if objective:
            starts: list[int] = list(range(max_steps * accumulation))
            n = bs = 0
        else:
            n = X[0].shape[0] if X else y.shape[0]  # type: ignore[union-attr]
            bs = o.get("batch_size", 0) or n
            starts = [s for s in range(0, n, bs) if not (o.get("drop_last") and s + bs > n)]
        per_epoch = max(1, math.ceil(len(starts) / accumulation))
        epochs = 1 if objective else (epochs or math.ceil(max_steps / per_epoch))
        total = min(epochs * per_epoch, max_steps or epochs * per_epoch)
        self.module.train()
        self.module.zero_grad()
        scheduler = self.schedule(o.get("schedule"), total)
        events: list[Event] = []
        steps = skipped = epochs_done = 0
        last_loss = epoch_loss = norm = lr = math.nan
        reason = ""

        def event(kind: str, epoch: int, val: float | None = None,
                  summary: dict[str, Any] | None = None) -> Event:
            return Event(kind, self.step_count, epoch, last_loss, epoch_loss, lr, norm, val,
                         steps, total, summary)

        for epoch in range(epochs):
            if objective:
                batches: list[Any] = starts
            elif o.get("shuffle"):
                order = torch.randperm(n, generator=torch.Generator().manual_seed(
                    o.get("seed", 0) + epoch))
                batches = [order[s:s + bs] for s in starts]
            else:
                batches = [slice(s, s + bs) for s in starts]
            losses: list[float] = []
            pending = 0
            for i, idx in enumerate(batches):
                last = i == len(batches) - 1
                if objective:
                    loss = self.loss(self.outputs([])[self.main], None)
                else:
                    cast, _ = self.cast([x[idx] for x in X], grad=False)  # type: ignore[union-attr]
                    out = self.outputs(cast)[self.main]
                    loss = self.loss(out, self.target(None if y is None else y[idx]))
                value = loss.item()
                if math.isfinite(value):
                    if objective and stop_loss is not None and value < stop_loss:
                        last_loss = value
                        losses.append(value)
                        reason = "stop_loss"
                        break
                    if not loss.requires_grad:
                        raise Failed("nothing to differentiate")
                    (loss / accumulation if accumulation > 1 else loss).backward()
                    losses.append(value)
                    last_loss = value
                    pending += 1
                elif skip:
                    skipped += 1
                else:
                    reason = "non_finite"
                    break
                if pending and (pending == accumulation or last):
                    norm, lr = self.optimizer_step(clip, scheduler)
                    pending = 0
                    steps += 1
                    if every and steps % every == 0:
                        epoch_loss = math.fsum(losses) / len(losses)
                        events.append(event("progress", epoch))
                    if max_steps and steps >= max_steps:
                        reason = "max_steps"
                        break
            if losses:
                epoch_loss = math.fsum(losses) / len(losses)
            if reason == "non_finite" or not losses:
                break
            epochs_done += 1
            val = (self.validate(*validation, o.get("batch_size", 0)) if validation is not None
                   else None)
            events.append(event("epoch_end", epoch, val))
            if reason:
                break
            if stop_loss is not None and epoch_loss < stop_loss:
                reason = "stop_loss"
                break
        final = last_loss if objective or math.isnan(epoch_loss) else epoch_loss
        summary = {"steps": steps, "epochs": epochs_done, "final_loss": final,
                   "stop_reason": reason or "completed", "skipped_batches": skipped,
                   "model_step": self.step_count}
        events.append(event("done", max(0, epochs_done - 1), summary=summary))
        return events

    def validate(self, Xv: Sequence[torch.Tensor], yv: torch.Tensor | None, bs: int) -> float:
        """docs/models.md "Validation": summed losses over summed counts, in eval mode."""
        n = Xv[0].shape[0] if Xv else yv.shape[0]  # type: ignore[union-attr]
        bs = bs or n
        sums, counts = [], []
        self.module.eval()
        try:
            with torch.no_grad():
                for s in range(0, n, bs):
                    cast, _ = self.cast([x[s:s + bs] for x in Xv], grad=False)
                    out = self.outputs(cast)[self.main]
                    t = self.target(None if yv is None else yv[s:s + bs])
                    sums.append(float(self.loss(out, t, summed=True)))
                    counts.append(self.count(out, t))
        finally:
            self.module.train()
        if self.reduction != "mean" or self.loss_fn is None:
            return math.fsum(sums)
        denominator = math.fsum(counts)
        return math.fsum(sums) / denominator if denominator else math.nan

    def train_stream(self, batches: Sequence[tuple[Sequence[torch.Tensor], torch.Tensor | None]],
                     clip: float, schedule: Mapping[str, Any] | None, skip: bool
                     ) -> list[Any]:
        """docs/models.md "Caller-driven training": one step per batch; each result (step, loss,
        grad_norm, lr, skipped), and "failed" where the stream ends with FAILED_PRECONDITION
        (a non-finite loss without skip_nonfinite, nothing to differentiate)."""
        self.module.train()
        self.module.zero_grad()
        scheduler = self.schedule(schedule, None)
        results: list[Any] = []
        for xs, y in batches:
            cast, _ = self.cast(xs, grad=False)
            loss = self.loss(self.outputs(cast)[self.main], self.target(y))
            value = loss.item()
            if not math.isfinite(value):
                if not skip:
                    return [*results, "failed"]
                lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0
                results.append((self.step_count, value, math.nan, lr, True))
                continue
            if not loss.requires_grad:
                return [*results, "failed"]
            loss.backward()
            norm, lr = self.optimizer_step(clip, scheduler)
            results.append((self.step_count, value, norm, lr, False))
        return results

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """Parameters, buffers, gradients and optimizer state by name (what the invariant
        compares)."""
        params = dict(self.module.named_parameters())
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        groups: list[dict[str, Any]] = []
        if self.optimizer is not None:
            for name, p in params.items():
                if p in self.optimizer.state:
                    opt_state[name] = {
                        k: v if isinstance(v, torch.Tensor) else torch.tensor(v)
                        for k, v in self.optimizer.state[p].items()
                        if isinstance(v, (torch.Tensor, int, float))}
            groups = [{k: v for k, v in g.items() if k != "params"}
                      for g in self.optimizer.param_groups]
        return {
            "parameters": {n: p.detach() for n, p in params.items()},
            "buffers": {n: b for n, b in self.module.named_buffers()},
            "grads": {n: p.grad for n, p in params.items() if p.grad is not None},
            "optimizer": opt_state, "groups": groups, "step": self.step_count,
        }
