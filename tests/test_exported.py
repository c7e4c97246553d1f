"""Exported models equal the local module: bit-identical on CPU, in train and eval mode.

Four architectures no layer list can express (a residual MLP, a Transformer encoder with dropout,
a two-input two-output model, a CNN with BatchNorm), each through fused Backward, retained
Forward + Backward(grad_output), Train with shuffle and a checkpoint round trip. Each module is
exported once per test session (export is the slow part) and uploaded per test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from gradserve import Client
from gradserve.cli import main
from gradserve.export import export_module
from gradserve_server.app import GradServer
from torch import nn

F = nn.functional


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int = 6, width: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width),
                                                  nn.GELU()) for _ in range(2))
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.item = nn.Sequential(nn.Linear(3, 8), nn.Tanh())

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        eu, ev = self.user(u), self.item(v)
        return {"embedding": torch.cat([eu, ev], -1), "score": (eu * ev).sum(-1)}


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(h, 1))


@dataclass(frozen=True)
class Case:
    factory: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]   # per input, without the batch dimension
    loss: str
    loss_output: str | None = None         # the output the loss applies to (dicts: its key)
    classes: int = 0                       # cross-entropy targets; 0: regression on the output

    def inputs(self, n: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(n, *s, generator=g) for s in self.shapes)

    def target(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 100)
        if self.classes:
            return torch.randint(0, self.classes, (n,), generator=g)
        return torch.randn(n, generator=g)

    def main(self, out: Any) -> torch.Tensor:
        return out[self.loss_output] if isinstance(out, dict) else out

    def loss_fn(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        out = self.main(out)
        return F.cross_entropy(out, y) if self.loss == "cross_entropy" else F.mse_loss(out, y)


CASES = {
    "residual_mlp": Case(ResidualMLP, ((6,),), "cross_entropy", classes=3),
    "transformer": Case(TinyTransformer, ((7, 5),), "cross_entropy", classes=3),
    "two_tower": Case(TwoTower, ((4,), (3,)), "mse", loss_output="score"),
    "cnn_batchnorm": Case(SmallCNN, ((1, 8, 8),), "cross_entropy", classes=3),
}
SEED = 0
OPTIMIZER = {"type": "adam", "lr": 0.01}


@cache
def archive(name: str) -> bytes:
    """The case's module exported once (train and eval programs) with the model seed."""
    case = CASES[name]
    return export_module(case.factory, case.inputs(4, 0), seed=SEED)


def local(case: Case) -> nn.Module:
    """What create_model(module=factory, seed=SEED) starts from: torch.manual_seed, then build.

    The remote model's own random stream (dropout) starts at torch.manual_seed(SEED): building
    an exported model draws nothing. Locally that is a reseed after building; from then on
    the test's local calls draw from the global generator in the same order as the remote ones
    draw from the model's stream (the in-process server never touches the global generator).
    """
    torch.manual_seed(SEED)
    net = case.factory()
    torch.manual_seed(SEED)
    return net


def create(client: Client, name: str, **extra: Any) -> Any:
    case = CASES[name]
    return client.create_model(exported=archive(name), loss=case.loss, optimizer=OPTIMIZER,
                               seed=SEED, loss_output=case.loss_output, **extra)


def as_tuple(out: Any, names: Sequence[str] = ()) -> tuple[torch.Tensor, ...]:
    if isinstance(out, dict):
        return tuple(out[n] for n in names)
    return out if isinstance(out, tuple) else (out,)


def assert_state_equal(remote: Any, net: nn.Module) -> None:
    values = remote.parameters(buffers=True)
    state = net.state_dict()
    assert sorted(values) == sorted(state)
    for name, value in state.items():
        assert torch.equal(values[name], value), name


params = pytest.mark.parametrize("name", list(CASES))


# ------------------------------------------------------------------------------------ parity


@params
def test_model_has_the_modules_names_and_values(client: Client, name: str) -> None:
    m = create(client, name)
    net = local(CASES[name])
    assert m.info.spec.WhichOneof("source") == "exported"
    assert not m.info.spec.exported.archive  # the archive stays out of ModelInfo
    assert [p.name for p in m.info.parameters] == list(net.state_dict())
    assert_state_equal(m, net)


@params
def test_fused_backward_matches_local(client: Client, name: str) -> None:
    case = CASES[name]
    m = create(client, name)
    net = local(case)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    names = m.info.outputs
    for step in range(3):
        xs, y = case.inputs(8, step), case.target(8, step)
        r = m.backward(xs, y, return_grads=True, return_output=True, step=True)
        out = net(*xs)
        loss = case.loss_fn(out, y)
        loss.backward()
        assert r.loss == loss.item()
        for got, want in zip(as_tuple(r.output), as_tuple(out, names), strict=True):
            assert torch.equal(got, want.detach())
        for pname, p in net.named_parameters():
            assert torch.equal(r.grads[pname], p.grad), pname
        opt.step()
        opt.zero_grad()
    assert_state_equal(m, net)


@params
def test_retained_forward_then_backward_grad_output_matches_local(client: Client,
                                                                  name: str) -> None:
    case = CASES[name]
    m = create(client, name)
    net = local(case)
    xs = case.inputs(6, 1)
    f = m.forward(*xs, retain_graph=True)
    local_xs = [x.clone().requires_grad_() for x in xs]
    outs = as_tuple(net(*local_xs), m.info.outputs)
    remote_outs = as_tuple(f.output)
    assert len(remote_outs) == len(outs)
    for got, want in zip(remote_outs, outs):
        assert torch.equal(got, want.detach())
    g = torch.Generator().manual_seed(5)
    grads = tuple(torch.randn(o.shape, generator=g) for o in outs)
    r = m.backward(forward_id=f.forward_id, grad_output=grads if len(grads) > 1 else grads[0],
                   return_grads=True, return_input_grads=True)
    assert r.loss is None
    torch.autograd.backward(outs, grads)
    for pname, p in net.named_parameters():
        assert torch.equal(r.grads[pname], p.grad), pname
    for got, x in zip(r.input_grads, local_xs, strict=True):
        assert torch.equal(got, x.grad)


@params
def test_train_with_shuffle_matches_local_loop(client: Client, name: str) -> None:
    case = CASES[name]
    m = create(client, name)
    net = local(case)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    X, Y = case.inputs(24, 7), case.target(24, 7)
    history = m.fit(X if len(X) > 1 else X[0], Y, epochs=2, batch_size=8, shuffle=True, seed=3)
    losses = []
    for epoch in range(2):  # the loop Train documents (server/gradserve_server/core/trainer.py)
        order = torch.randperm(24, generator=torch.Generator().manual_seed(3 + epoch))
        for start in range(0, 24, 8):
            idx = order[start:start + 8]
            loss = case.loss_fn(net(*(x[idx] for x in X)), Y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert history.summary is not None and history.summary.steps == 6
    assert history.summary.final_loss == sum(losses[3:]) / 3
    assert_state_equal(m, net)


@params
def test_eval_mode_matches_local_eval(client: Client, name: str) -> None:
    """Dropout off and BatchNorm on running statistics, like net.eval(); nothing is updated."""
    case = CASES[name]
    m = create(client, name)
    net = local(case)
    xs = case.inputs(5, 2)
    # A train-mode step first, so that BatchNorm's running statistics are not the initial ones.
    m.backward(xs, case.target(5, 2), step=True)
    case.loss_fn(net(*xs), case.target(5, 2)).backward()
    torch.optim.Adam(net.parameters(), lr=0.01).step()
    net.eval()
    # The exported graph is the one traced with autograd on: compare with the same path (under
    # no_grad eager attention may take a fused fast path that rounds differently).
    want = as_tuple(net(*xs), m.info.outputs)
    for _ in range(2):  # twice: eval mode must not touch the running statistics
        got = as_tuple(m.forward(*xs, eval_mode=True))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b.detach())
    assert_state_equal(m, net)


@params
def test_checkpoint_round_trip_restores_graph_and_state(
        make_server: Callable[..., GradServer], tmp_path: Path, name: str) -> None:
    case = CASES[name]
    first = make_server(state_dir=str(tmp_path))
    net = local(case)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    xs, y = case.inputs(8, 3), case.target(8, 3)
    with Client(f"127.0.0.1:{first.port}") as c:
        m = create(c, name, model_id="ckpt")
        m.backward(xs, y, step=True)
        m.save_checkpoint()
        info = m.info
    first.stop()
    case.loss_fn(net(*xs), y).backward()
    opt.step()
    opt.zero_grad()
    second = make_server(state_dir=str(tmp_path))  # restores "ckpt" from the state dir
    with Client(f"127.0.0.1:{second.port}") as c:
        restored = c.model("ckpt")
        assert restored.info.step == 1
        assert restored.info.spec.WhichOneof("source") == "exported"
        assert (restored.info.inputs, restored.info.outputs) == (info.inputs, info.outputs)
        assert_state_equal(restored, net)
        # The restored graph trains on exactly as the original would (optimizer state too).
        r = restored.backward(xs, y, step=True)
        loss = case.loss_fn(net(*xs), y)
        loss.backward()
        opt.step()
        assert r.loss == loss.item()
        assert_state_equal(restored, net)


# ------------------------------------------------------------------------------------ the SDK


def test_create_model_from_module_exports_it(client: Client) -> None:
    """create_model(module=...): the docs/models.md example; a module instance keeps its own values."""
    torch.manual_seed(42)
    net = ResidualMLP()
    x = torch.randn(8, 6)
    m = client.create_model(module=net, example_inputs=(x,), loss="cross_entropy",
                            optimizer={"type": "sgd", "lr": 0.1})
    assert net.training  # the SDK restored the module's mode after exporting both
    assert_state_equal(m, net)
    assert torch.equal(m.forward(x), net(x).detach())


def test_module_factory_with_seed_builds_like_local_code(client: Client) -> None:
    m = client.create_model(module=SmallCNN, example_inputs=torch.randn(2, 1, 8, 8), seed=5)
    torch.manual_seed(5)
    assert_state_equal(m, SmallCNN())


def test_create_model_from_exported_program(client: Client) -> None:
    """exported=ExportedProgram: one program, used in train and eval mode alike."""
    torch.manual_seed(1)
    net = TwoTower()
    u, v = torch.randn(3, 4), torch.randn(3, 3)
    program = torch.export.export(net, (u, v))
    m = client.create_model(exported=program, loss="mse", loss_output=1)
    assert m.info.inputs == ("u", "v") and m.info.outputs == ("embedding", "score")
    out = m.forward(u, v)
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.equal(out[1], net(u, v)["score"].detach())
    r = m.backward((u, v), torch.zeros(3))
    assert r.loss == F.mse_loss(net(u, v)["score"], torch.zeros(3)).item()


def test_loss_output_must_name_an_output(client: Client) -> None:
    from gradserve.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="output_name: 'nope' is not an output"):
        client.create_model(exported=archive("two_tower"), loss="mse", loss_output="nope")
    with pytest.raises(InvalidArgumentError, match="output_index: 2 is out of range"):
        client.create_model(exported=archive("two_tower"), loss="mse", loss_output=2)


def test_grad_outputs_must_match_the_outputs(client: Client) -> None:
    from gradserve.errors import InvalidArgumentError

    m = create(client, "two_tower")
    u, v = CASES["two_tower"].inputs(2, 0)
    f = m.forward(u, v, retain_graph=True)
    with pytest.raises(InvalidArgumentError, match="grad_outputs: 1 given; the model has 2"):
        m.backward(forward_id=f.forward_id, grad_output=(torch.ones(2, 16),))
    # grad_output alone applies to the loss output ("score") only.
    f = m.forward(u, v, retain_graph=True)
    r = m.backward(forward_id=f.forward_id, grad_output=torch.ones(2), return_grads=True)
    net = local(CASES["two_tower"])
    net(u, v)["score"].backward(torch.ones(2))
    for pname, p in net.named_parameters():
        assert torch.equal(r.grads[pname], p.grad), pname


def test_cli_creates_model_from_pt2_file(server: GradServer, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(archive("residual_mlp"))
    spec = tmp_path / "spec.json"
    spec.write_text('{"loss": "cross_entropy", "optimizer": {"type": "sgd", "lr": 0.1}}')
    address = f"127.0.0.1:{server.port}"
    assert main(["--address", address, "create", "--exported", str(path), "--id", "res"]) == 0
    assert main(["--address", address, "create", str(spec), "--exported", str(path),
                 "--id", "res2"]) == 0
    with Client(address) as c:
        assert c.model("res").info.spec.WhichOneof("source") == "exported"
        assert c.model("res2").info.loss == "cross_entropy"
        assert_state_equal(c.model("res"), local(CASES["residual_mlp"]))


def test_sdk_imports_torch_only_for_modules() -> None:
    """`import gradserve` and create_model(exported=bytes) work where torch is not installed."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import gradserve, gradserve._ops as o\n"
            "op = o.create_model(exported=b'PK..', loss='mse')\n"
            "assert op.request.spec.exported.archive == b'PK..'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
