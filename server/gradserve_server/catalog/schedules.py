"""Learning-rate schedules built on torch.optim.lr_scheduler, stepped once per optimizer step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import optim
from torch.optim import lr_scheduler

from ..core.errors import InvalidArgument
from .kwargs import check_kwargs

LRScheduler = lr_scheduler.LRScheduler

# type -> (scheduler class, {spec name: torch argument name})
SCHEDULES: dict[str, tuple[type[LRScheduler], dict[str, str]]] = {
    "step": (lr_scheduler.StepLR, {"step_size": "step_size", "gamma": "gamma"}),
    "exponential": (lr_scheduler.ExponentialLR, {"gamma": "gamma"}),
    "cosine": (lr_scheduler.CosineAnnealingLR, {"t_max": "T_max", "eta_min": "eta_min"}),
    "linear": (lr_scheduler.LinearLR,
               {"start_factor": "start_factor", "end_factor": "end_factor",
                "total_iters": "total_iters"}),
}

# torch divides by these when it steps the schedule (a zero fails mid-run, not at construction).
_AT_LEAST_ONE = frozenset({"step_size", "T_max", "total_iters"})


def _check_numbers(kind: str, kwargs: Mapping[str, Any]) -> None:
    """Every schedule argument is a number; torch checks most of them only when stepping."""
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"options.schedule ({kind}).{key}: expected a number, "
                                  f"got {value!r}")
        if key in _AT_LEAST_ONE and not value >= 1:
            raise InvalidArgument(f"options.schedule ({kind}).{key}: must be >= 1, got {value!r}")


def build_schedule(
    optimizer: optim.Optimizer | None,
    kind: str,
    params: Mapping[str, Any],
    warmup_steps: int,
    warmup_start_factor: float,
    total_steps: int | None,
) -> LRScheduler | None:
    """The scheduler for a run, or None.

    cosine's t_max defaults to total_steps - warmup_steps: the steps the cosine schedule runs
    for after the warm-up, so that the rate reaches eta_min at the run's end. total_steps None
    (TrainStream: the length is unknown) makes t_max required.
    """
    kind = kind or "none"
    if kind != "none" and kind not in SCHEDULES:
        raise InvalidArgument(
            f"options.schedule.type: unknown schedule {kind!r}; allowed: "
            f"{['none', *sorted(SCHEDULES)]}"
        )
    if kind == "none" and params:
        raise InvalidArgument("options.schedule.params: schedule 'none' takes no parameters")
    if optimizer is None or (kind == "none" and warmup_steps == 0):
        return None
    schedules: list[LRScheduler] = []
    try:
        if warmup_steps:
            factor = warmup_start_factor or 0.1
            if not 0 < factor <= 1:  # LinearLR lets NaN through, which makes every lr NaN
                raise InvalidArgument("options.schedule.warmup_start_factor: expected a number "
                                      f"in (0, 1], got {factor!r}")
            schedules.append(lr_scheduler.LinearLR(
                optimizer, start_factor=factor, end_factor=1.0, total_iters=warmup_steps))
        if kind != "none":
            cls, names = SCHEDULES[kind]
            unknown = set(params) - set(names)
            if unknown:
                raise InvalidArgument(
                    f"options.schedule.params: unknown {sorted(unknown)} for {kind!r}; "
                    f"allowed: {sorted(names)}"
                )
            given = {names[k]: v for k, v in params.items()}
            if cls is lr_scheduler.CosineAnnealingLR and "T_max" not in given:
                if total_steps is None:
                    raise InvalidArgument("options.schedule (cosine).t_max: required here (a "
                                          "stream's length is unknown, so there is no default)")
                # Before the check: torch requires T_max.
                given["T_max"] = max(1, total_steps - warmup_steps)
            kwargs = check_kwargs(cls.__init__, given, f"options.schedule ({kind})",
                                  skip=("optimizer",))
            _check_numbers(kind, kwargs)
            schedules.append(cls(optimizer, **kwargs))
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise InvalidArgument(f"options.schedule: {exc}") from None
    if len(schedules) == 1:
        return schedules[0]
    return lr_scheduler.SequentialLR(optimizer, schedules, milestones=[warmup_steps])
