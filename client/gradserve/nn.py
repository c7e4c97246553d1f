"""RemoteModule: a server-side model as a layer of a local torch network.

    remote = RemoteModule(client.create_model(layers=[...], optimizer={"type": "sgd", "lr": 0.1}))
    net = torch.nn.Sequential(encoder, remote, head)
    loss = loss_fn(net(x), y)
    loss.backward()          # the server backprops the upstream gradient; input grads come back
    local_opt.step(); remote.step()

Forward runs on the server with retain_graph (one Forward RPC); local backward sends the upstream
gradient with Backward(forward_id, grad_output) (one Backward RPC) and returns the gradient with
respect to the inputs into the local graph. Parameter gradients accumulate on the server, as in
PyTorch, until remote.step() or remote.zero_grad().
"""

from __future__ import annotations

from typing import Any

try:
    import torch
except ImportError:  # pragma: no cover - the SDK works without torch; this module does not
    from ._install import torch_hint

    raise ImportError(f"gradserve.nn needs torch: {torch_hint()}") from None

from .model import RemoteModel
from .results import ForwardResult


class RemoteModule(torch.nn.Module):
    """A RemoteModel (from the sync Client) usable inside local autograd.

    Under torch.no_grad(), or when nothing needs a gradient, forward is a plain Forward (no graph
    kept on the server). Otherwise the server keeps the graph until the matching backward; graphs
    never backpropagated (an output that is thrown away) are evicted by the server's
    max_graphs / graph_ttl_s limits. A second backward through the same output (local
    retain_graph=True, e.g. torch.autograd.gradcheck) re-runs the forward on the server with the
    saved inputs, so it sees the parameters as they are then.

    self.training (train()/eval()) selects the server's train or eval mode for Forward.
    """

    def __init__(self, model: RemoteModel) -> None:
        super().__init__()
        if not isinstance(model, RemoteModel):
            raise TypeError("RemoteModule needs a model from the sync Client: autograd calls "
                            "forward and backward synchronously")
        self.model = model
        # Makes the output require grad when only the server's parameters need gradients (no
        # local input requires grad); it is not a Parameter, so local optimizers never see it.
        self._anchor = torch.empty(0, requires_grad=True)

    def extra_repr(self) -> str:
        return f"model_id={self.model.id!r}"

    @property
    def _trainable(self) -> bool:
        return any(p.trainable for p in self.model.info.parameters)

    def forward(self, *inputs: Any) -> torch.Tensor:
        xs = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in inputs)
        needs_grad = torch.is_grad_enabled() and (
            self._trainable or any(x.requires_grad for x in xs))
        if not needs_grad:
            return _place(self.model.forward(*xs, eval_mode=not self.training), xs)
        out: torch.Tensor = _RemoteFunction.apply(self, self._anchor, *xs)
        return out

    def step(self, keep_grad: bool = False) -> int:
        """The server's optimizer.step() (then zero grads unless keep_grad); the step count."""
        return int(self.model.step(keep_grad))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the server-side gradients (and any local ones, as nn.Module does)."""
        super().zero_grad(set_to_none)
        self.model.zero_grad()

    def remote_parameters(self) -> dict[str, Any]:
        """The server's parameters by state_dict name."""
        return dict(self.model.parameters())

    def remote_grads(self) -> dict[str, Any]:
        """The server's accumulated parameter gradients by name."""
        return dict(self.model.grads())


def _place(out: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The decoded output on the device of the first input (decoding gives CPU tensors)."""
    out = torch.as_tensor(out)
    device = inputs[0].device if inputs else out.device
    return out.to(device)


class _RemoteFunction(torch.autograd.Function):
    """Forward: Forward(retain_graph). Backward: Backward(forward_id, grad_output)."""

    @staticmethod
    def forward(ctx: Any, module: RemoteModule, anchor: torch.Tensor,
                *inputs: torch.Tensor) -> torch.Tensor:
        result: ForwardResult = module.model.forward(*inputs, retain_graph=True,
                                                     eval_mode=not module.training)
        ctx.module = module
        ctx.forward_id = result.forward_id
        ctx.eval_mode = not module.training
        ctx.floating = [x.is_floating_point() for x in inputs]
        ctx.save_for_backward(*inputs)
        return _place(result.output, inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        module: RemoteModule = ctx.module
        inputs = ctx.saved_tensors
        wanted = any(need and fl for need, fl in zip(ctx.needs_input_grad[2:], ctx.floating))
        forward_id = ctx.forward_id
        if not forward_id:
            # The server graph was consumed by an earlier backward through this output: rebuild.
            forward_id = module.model.forward(*inputs, retain_graph=True,
                                              eval_mode=ctx.eval_mode).forward_id
        ctx.forward_id = ""
        result = module.model.backward(forward_id=forward_id, grad_output=grad_output,
                                       return_input_grads=wanted)
        grads: list[Any] = [None, None]
        returned = iter(result.input_grads)
        for x, fl, need in zip(inputs, ctx.floating, ctx.needs_input_grad[2:]):
            g = next(returned, None) if (wanted and fl) else None
            grads.append(torch.as_tensor(g).to(device=x.device, dtype=x.dtype)
                         if (g is not None and need) else None)
        return tuple(grads)


__all__ = ["RemoteModule"]
