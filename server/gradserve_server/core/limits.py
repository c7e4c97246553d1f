"""Resource limits the core enforces (built from Settings at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

# Tensors one request field may hold: positional ones (a model's inputs, grad_outputs, a batch,
# a dataset header) and named ones (parameters by name). Each decoded tensor costs about 500 bytes
# and a few microseconds that no other limit sees: two million empty inputs in a 14 MB Forward
# took 1 GB and 25 s before the model refused the count.
MAX_TENSORS = 1024
MAX_NAMED_TENSORS = 65536


@dataclass(frozen=True)
class Limits:
    max_models: int = 256
    max_parameters: int = 500_000_000          # elements per model
    max_request_bytes: int = 512 * 1024 * 1024  # tensor bytes in one request
    max_graphs: int = 64                        # retained forward graphs per model
    max_graph_bytes: int = 1024 * 1024 * 1024   # bytes of retained graphs per model
    graph_ttl_s: float = 300.0                  # a retained graph unused this long is evicted
    max_train_runs: int = 8                     # concurrent Train/TrainStream runs
    max_dataset_bytes: int = 8 * 1024 * 1024 * 1024  # all uploaded datasets together
    request_id_window: int = 1024               # remembered request ids per model
    request_id_window_bytes: int = 16 * 1024 * 1024  # replies kept for retries, per model
    max_memory_bytes: int = 0                   # the server-wide memory budget (0: none)
    max_compute_bytes: int = 0                  # estimated allocations of one call (0: budget)
    memory_source: str = ""                     # where max_memory_bytes came from (start log)
    max_exported_bytes: int = 64 * 1024 * 1024  # bytes of one torch.export archive
    max_exported_nodes: int = 10_000            # graph nodes of one exported program
    exported_ops: tuple[str, ...] = ()          # ATen operators added to the allow-list
