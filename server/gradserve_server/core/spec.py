"""Model specs as plain data (decoded from the wire by transport, saved in checkpoints as JSON)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import torch

SOURCES = ("layers", "expression", "plugin", "exported")
FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSpec:
    """What to build (one of the SOURCES), how to score it and how to update it."""

    source: str
    layers: list[dict[str, Any]] = field(default_factory=list)  # [{"type", "kwargs"}]
    expression: str = ""
    inputs: list[str] = field(default_factory=list)
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)  # expression parameters
    plugin: str = ""
    plugin_kwargs: dict[str, Any] = field(default_factory=dict)
    exported: bytes = b""  # a torch.export archive (catalog/exported.py checks it)
    output_index: int = 0  # exported models: the output the loss applies to, by index
    output_name: str = ""  # ... or by name (wins when set)
    loss: str = "none"
    loss_reduction: str = "mean"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    optimizer_params: dict[str, Any] = field(default_factory=lambda: {"lr": 0.001})
    seed: int | None = None
    initial_parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form without tensors (checkpoints keep tensors in safetensors)."""
        return {
            "source": self.source, "layers": self.layers, "expression": self.expression,
            "inputs": self.inputs, "parameter_shapes": {
                k: list(v.shape) for k, v in self.parameters.items()},
            "plugin": self.plugin, "plugin_kwargs": self.plugin_kwargs, "loss": self.loss,
            "loss_reduction": self.loss_reduction, "loss_kwargs": self.loss_kwargs,
            "optimizer": self.optimizer, "optimizer_params": self.optimizer_params,
            "seed": self.seed, "frozen": self.frozen, "dtype": self.dtype,
            # The archive travels with the spec (base64): a checkpoint restores the same graph.
            "exported": base64.b64encode(self.exported).decode("ascii"),
            "output_index": self.output_index, "output_name": self.output_name,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        shapes = data.get("parameter_shapes", {})
        return cls(
            source=data["source"], layers=data["layers"], expression=data["expression"],
            inputs=data["inputs"],
            parameters={k: torch.zeros(v) for k, v in shapes.items()},
            plugin=data["plugin"], plugin_kwargs=data["plugin_kwargs"], loss=data["loss"],
            loss_reduction=data["loss_reduction"], loss_kwargs=data["loss_kwargs"],
            optimizer=data["optimizer"], optimizer_params=data["optimizer_params"],
            seed=data["seed"], frozen=data["frozen"], dtype=data["dtype"],
            exported=base64.b64decode(data.get("exported", "")),
            output_index=data.get("output_index", 0), output_name=data.get("output_name", ""),
        )
