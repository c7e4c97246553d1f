"""What a new user's first mistakes are told: a dropped training run, a model without a loss,
a missing optional package. Each message says what to do, not only what went wrong."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from gradserve import Client, InvalidArgumentError, UnavailableError
from gradserve.aio import AsyncClient
from gradserve_server.app import GradServer

ROOT = Path(__file__).resolve().parent.parent
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
X, Y = torch.randn(64, 2), torch.randn(64, 1)
LONG: dict[str, Any] = {"epochs": 10**6, "batch_size": 1}  # a run that cannot finish by itself during a test


# ------------------------------------------------------------------ a run nobody iterates


def test_dropped_train_run_warns_at_the_callers_line_and_is_cancelled(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse")
    with pytest.warns(RuntimeWarning, match=r"train run of model '.+' was never iterated, so it "
                      r"was cancelled.*call model\.fit\(\.\.\.\)") as caught:
        m.train(X, Y, **LONG)  # the README's old Datasets snippet: a bare statement
    assert caught[0].filename == __file__  # points at the statement that dropped it
    info = m.wait_idle(30)
    assert info.step < 10**6 and not info.training
    assert [e.kind for e in m.train(X, Y, epochs=1)][-1] == "done"  # the model takes a new run


def test_iterated_fitted_or_cancelled_runs_do_not_warn(client: Client) -> None:
    m = client.create_model(layers=LINEAR, loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(m.train(X, Y, epochs=1))
        m.fit(X, Y, epochs=1)
        for _ in m.train(X, Y, **LONG):
            break
        run = m.train(X, Y, **LONG)
        run.cancel()
        del run
        gc.collect()
    assert m.wait_idle(30).step >= 2


def test_dropped_async_train_run_warns_and_never_starts(server: GradServer) -> None:
    async def main() -> tuple[list[warnings.WarningMessage], int]:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            m = await client.create_model(layers=LINEAR, loss="mse")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m.train(X, Y, **LONG)
                gc.collect()
            await asyncio.sleep(0.5)  # a request that was still sent would start the run now
            info = await m.wait_idle(30)
            history = await m.fit(X, Y, epochs=1)  # not refused as "already training"
            assert history.summary is not None and history.summary.model_step == 1
            return list(caught), info.step

    caught, step = asyncio.run(main())
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        next(str(w.message) for w in caught)]
    assert "async for event in model.train(...)) or await model.fit(...)" in str(
        caught[0].message)
    assert caught[0].filename == __file__
    assert step == 0  # cancelled before its request left: nothing ran


def test_iterated_async_runs_do_not_warn(server: GradServer) -> None:
    async def main() -> int:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            m = await client.create_model(layers=LINEAR, loss="mse")
            async for _ in m.train(X, Y, epochs=1):
                pass
            await m.fit(X, Y, epochs=1)
            async with m.train(X, Y, **LONG) as run:
                async for _ in run:
                    break
            return (await m.wait_idle(30)).step

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncio.run(main()) >= 2


# ------------------------------------------------------------------ the first calls' errors


def test_backward_or_train_with_a_target_on_a_model_without_loss_says_pass_loss(
        client: Client) -> None:
    m = client.create_model(layers=LINEAR)  # no loss=: loss 'none', the output is the loss
    hint = r"created without a loss .*create it with one, e\.g\. create_model\(\.\.\., loss='mse'\)"
    with pytest.raises(InvalidArgumentError, match=hint):
        m.backward(X, Y)
    with pytest.raises(InvalidArgumentError, match=hint):
        list(m.train(X, Y, epochs=1))
    assert m.refresh().step == 0
    assert (m.info.loss, m.info.optimizer) == ("none", "sgd")  # the documented defaults


@pytest.mark.parametrize(("spec", "hint"), [
    ({"loss": "MSE"}, "unknown loss 'MSE' (did you mean 'mse'?)"),
    ({"loss": "CrossEntropyLoss"}, "(did you mean 'cross_entropy'?)"),
    ({"optimizer": {"type": "Adam"}}, "unknown optimizer 'Adam' (did you mean 'adam'?)"),
    ({"layers": [{"type": "linear", "in_features": 2, "out_features": 1}]},
     "unknown layer type (did you mean 'Linear'?)"),
    ({"layers": [{"type": "Linear", "in": 2, "out_features": 1}]},
     "unknown or forbidden argument 'in' (did you mean 'in_features'?)"),
])
def test_a_near_miss_of_a_catalog_name_gets_a_suggestion(client: Client, spec: dict[str, object],
                                                        hint: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        client.create_model(**{"layers": LINEAR, **spec})  # type: ignore[arg-type]
    assert hint in err.value.details
    assert client.health() == "SERVING"


def test_no_server_at_the_address_says_start_one() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=5, retries=0) as client, \
            pytest.raises(UnavailableError, match="is gradserve-server running at that address"):
        client.health()


# ------------------------------------------------------------------ optional packages


def run_without(modules: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter where importing `modules` fails, as if not installed."""
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", f"import sys\n{block}{code}"], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_gradserve_nn_without_torch_names_the_pinned_version(tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pin = next(r for r in project["optional-dependencies"]["server"] if r.startswith("torch"))
    done = run_without(["torch"], "import gradserve.nn", tmp_path)
    assert f"gradserve.nn needs torch: pip install '{pin}'" in done.stderr


def test_json_specs_need_no_yaml_and_yaml_says_how_to_get_it(server: GradServer,
                                                               tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text('{"layers": [{"type": "Linear", "in_features": 2, '
                                        '"out_features": 1}], "loss": "mse"}')
    (tmp_path / "spec.yaml").write_text("loss: mse\n")
    cli = ("from gradserve.cli import main\n"
           f"sys.exit(main(['--address', '127.0.0.1:{server.port}', 'create', 'spec.json', "
           "'--id', 'from-json']))")
    done = run_without(["yaml"], cli, tmp_path)
    assert done.returncode == 0, done.stderr
    done = run_without(["yaml"], cli.replace("spec.json", "spec.yaml"), tmp_path)
    assert done.returncode == 2
    assert "(the 'server' extra includes it): from a clone of gradserve, pip install '.[cli]'" \
        in done.stderr
    done = run_without(["matplotlib"], "from gradserve.history import History\n"
                       "History().plot()", tmp_path)
    assert "needs matplotlib: from a clone of gradserve, pip install '.[plot]'" in done.stderr
