"""Prometheus metrics: names, types, labels and values read back from /metrics; the dashboard."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from gradserve import Client, NotFoundError, ResourceExhaustedError
from gradserve_server.app import GradServer
from gradserve_server.core.hooks import Hooks
from gradserve_server.core.limits import Limits
from gradserve_server.core.spec import ModelSpec
from gradserve_server.core.store import ModelStore
from gradserve_server.metrics import PHASES, STOP_REASONS, Metrics
from gradserve_server.settings import DEFAULT_BUCKETS, Settings
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gradserve.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]
Families = dict[str, Any]

# name (as the parser reports it) -> (type, label names of its samples, "le" aside)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "gradserve_rpc_duration_seconds": ("histogram", {"method", "code"}),
    "gradserve_step_duration_seconds": ("histogram", {"model", "phase"}),
    "gradserve_loss": ("gauge", {"model"}),
    "gradserve_grad_norm": ("gauge", {"model"}),
    "gradserve_learning_rate": ("gauge", {"model"}),
    "gradserve_steps": ("counter", {"model"}),
    "gradserve_samples": ("counter", {"model"}),
    "gradserve_models": ("gauge", set()),
    "gradserve_models_limit": ("gauge", set()),
    "gradserve_retained_graphs": ("gauge", {"model"}),
    "gradserve_graph_evictions": ("counter", {"model"}),
    "gradserve_train_runs_active": ("gauge", set()),
    "gradserve_train_runs": ("counter", {"stop_reason"}),
    "gradserve_dataset_bytes": ("gauge", set()),
    "gradserve_checkpoint_saves": ("counter", {"trigger", "result"}),
    "gradserve_checkpoints_quarantined": ("counter", {"reason"}),
    "gradserve_memory_budget_bytes": ("gauge", {"kind"}),
    "gradserve_memory_budget_limit_bytes": ("gauge", set()),
    "gradserve_device_memory_bytes": ("gauge", {"device", "kind"}),
    "gradserve_build_info": ("gauge", {"version", "torch"}),
    "gradserve_world_size": ("gauge", set()),
    # the default process collectors
    "process_cpu_seconds": ("counter", set()),
    "process_resident_memory_bytes": ("gauge", set()),
    "python_gc_collections": ("counter", {"generation"}),
    "python_info": ("gauge", {"implementation", "major", "minor", "patchlevel", "version"}),
}


def scrape_text(server: GradServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        return reply.read().decode()


def scrape(server: GradServer) -> Families:
    return {f.name: f for f in text_string_to_metric_families(scrape_text(server))}


def samples(families: Families, name: str, **labels: str) -> list[Sample]:
    """Samples named `name` (exposition name, e.g. gradserve_steps_total) matching labels."""
    family = name
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            family = name.removesuffix(suffix)
    if family not in families:
        return []
    return [s for s in families[family].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(families: Families, name: str, **labels: str) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return float(found[0].value)


def poll(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Call check until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, generator=g)
    return X, X @ torch.tensor([[2.0], [-3.4]]) + 4.2


@pytest.fixture
def mserver(make_server: Callable[..., GradServer]) -> GradServer:
    return make_server(metrics_port=0)


@pytest.fixture
def mclient(mserver: GradServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{mserver.port}", timeout=30) as c:
        yield c


# ---------------------------------------------------------------------- exposition


def test_every_metric_has_its_type_and_labels(mserver: GradServer, mclient: Client) -> None:
    X, y = data()
    m = mclient.create_model(model_id="m", layers=LINEAR, loss="mse",
                             optimizer={"type": "sgd", "lr": 0.05}, seed=0)
    fwd = m.forward(X[:4], retain_graph=True)
    m.backward(forward_id=fwd.forward_id, target=y[:4])       # backward phase
    m.backward(X[:4], y[:4])                                     # fused: forward + backward
    m.step()                                                      # optimizer_step
    m.forward(X[:2], retain_graph=True)                          # stays retained
    info = mclient.upload_dataset(X, y)
    events = list(m.train(dataset=info.dataset_id, epochs=2, batch_size=8))  # train_step
    with pytest.raises(NotFoundError):
        mclient.model("missing")

    families = scrape(mserver)
    for name, (kind, labels) in EXPECTED.items():
        assert name in families, f"{name} is not exported"
        assert families[name].type == kind, f"{name}: {families[name].type}, expected {kind}"
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == labels, f"{s.name}: labels {sorted(s.labels)}"
    for name in families:
        if name.startswith("gradserve_"):  # _created: the client library's creation times
            assert name.removesuffix("_created") in EXPECTED, f"{name} is not tested"

    phases = {s.labels["phase"] for s in samples(families, "gradserve_step_duration_seconds_count",
                                                 model="m")}
    assert phases == set(PHASES) - {"communication"}  # a torchrun group's (test_distributed)
    le = [s.labels["le"] for s in samples(families, "gradserve_step_duration_seconds_bucket",
                                          model="m", phase="train_step")]
    assert [float(x) for x in le] == [*DEFAULT_BUCKETS, float("inf")]
    assert DEFAULT_BUCKETS[0] == 0.0001 and DEFAULT_BUCKETS[-1] == 60.0  # 100 us .. 60 s
    # 4 batches x 2 epochs in Train, one Step, one Backward(step=False) does not step
    steps = m.refresh().step
    assert steps == 9
    assert value(families, "gradserve_steps_total", model="m") == steps
    assert value(families, "gradserve_samples_total", model="m") == 2 * len(X)
    assert value(families, "gradserve_step_duration_seconds_count", model="m",
                 phase="train_step") == 8
    assert value(families, "gradserve_learning_rate", model="m") == 0.05
    done = events[-1]
    assert value(families, "gradserve_grad_norm", model="m") == done.grad_norm
    assert done.grad_norm > 0
    assert value(families, "gradserve_retained_graphs", model="m") == 1
    assert value(families, "gradserve_graph_evictions_total", model="m") == 0
    assert value(families, "gradserve_models") == 1
    assert value(families, "gradserve_models_limit") == Settings().max_models
    assert value(families, "gradserve_train_runs_active") == 0
    runs = samples(families, "gradserve_train_runs_total")
    assert {s.labels["stop_reason"]: s.value for s in runs} == {
        reason: (1 if reason == "completed" else 0) for reason in STOP_REASONS}
    assert value(families, "gradserve_dataset_bytes") == info.num_bytes > 0
    assert value(families, "gradserve_rpc_duration_seconds_count", method="Backward",
                 code="OK") == 2
    assert value(families, "gradserve_rpc_duration_seconds_count", method="GetModel",
                 code="NOT_FOUND") == 1
    assert value(families, "gradserve_rpc_duration_seconds_count", method="Train",
                 code="OK") == 1
    assert samples(families, "gradserve_device_memory_bytes") == []  # CPU: no CUDA samples


def test_default_metrics_port_is_9464() -> None:
    assert Settings().metrics_port == 9464
    assert Settings.load([], {}).metrics_port == 9464
    assert Settings.load(["--metrics-port", "0"], {}).metrics_port == 0


def test_step_buckets_are_configurable(make_server: Callable[..., GradServer]) -> None:
    server = make_server(metrics_port=0, step_buckets="0.5,0.001,2")
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        m = client.create_model(model_id="b", layers=LINEAR)
        m.forward(torch.zeros(1, 2))
    buckets = samples(scrape(server), "gradserve_step_duration_seconds_bucket", model="b",
                      phase="forward")
    assert [s.labels["le"] for s in buckets] == ["0.001", "0.5", "2.0", "+Inf"]
    assert buckets[-1].value == 1


# ---------------------------------------------------------------------- values


def test_loss_gauge_equals_what_the_sdk_saw(mserver: GradServer, mclient: Client) -> None:
    X, y = data()
    m = mclient.create_model(model_id="l", layers=LINEAR, loss="mse",
                             optimizer={"type": "sgd", "lr": 0.05}, seed=0)
    result = m.backward(X, y)
    assert value(scrape(mserver), "gradserve_loss", model="l") == result.loss
    m.zero_grad()
    # Progress events and several epochs: the gauge must end on the run's final loss.
    events = list(m.train(X, y, epochs=3, batch_size=5, shuffle=True, accumulation_steps=2,
                          log_every_steps=1))
    summary = events[-1].summary
    assert summary is not None
    assert summary.final_loss != events[-2].batch_loss  # the epoch mean, not the last batch
    assert value(scrape(mserver), "gradserve_loss", model="l") == summary.final_loss


def test_samples_count_every_batch_with_gradient_accumulation(
        mserver: GradServer, mclient: Client) -> None:
    X, y = data(32)
    m = mclient.create_model(model_id="acc", layers=LINEAR, loss="mse",
                             optimizer={"type": "sgd", "lr": 0.01})
    summary = list(m.train(X, y, epochs=1, batch_size=8, accumulation_steps=2))[-1].summary
    assert summary is not None and summary.steps == 2
    families = scrape(mserver)
    assert value(families, "gradserve_steps_total", model="acc") == 2
    assert value(families, "gradserve_samples_total", model="acc") == 32


def test_train_stream_sets_loss_lr_and_grad_norm(mserver: GradServer, mclient: Client) -> None:
    X, y = data(16)
    m = mclient.create_model(model_id="s", layers=LINEAR, loss="mse",
                             optimizer={"type": "adam", "lr": 0.02})
    results = list(m.train_stream([(X[:8], y[:8]), (X[8:], y[8:])]))
    families = scrape(mserver)
    assert value(families, "gradserve_loss", model="s") == results[-1].loss
    assert value(families, "gradserve_grad_norm", model="s") == results[-1].grad_norm > 0
    assert value(families, "gradserve_learning_rate", model="s") == results[-1].learning_rate
    assert value(families, "gradserve_samples_total", model="s") == 16
    assert value(families, "gradserve_step_duration_seconds_count", model="s",
                 phase="train_step") == 2


def test_cancelled_train_is_counted_as_cancelled(mserver: GradServer, mclient: Client) -> None:
    X, y = data()
    m = mclient.create_model(model_id="c", layers=LINEAR, loss="mse",
                             optimizer={"type": "sgd", "lr": 0.01})
    run = m.train(X, y, max_steps=10**9, batch_size=4, log_every_steps=1)
    for _event in run:
        break  # leaving the loop cancels the run
    poll(lambda: samples(scrape(mserver), "gradserve_rpc_duration_seconds_count",
                         method="Train", code="CANCELLED"), "a CANCELLED Train observation")
    families = scrape(mserver)
    assert samples(families, "gradserve_rpc_duration_seconds_count", method="Train",
                   code="OK") == []
    poll(lambda: value(scrape(mserver), "gradserve_train_runs_active") == 0, "the run to end")
    poll(lambda: value(scrape(mserver), "gradserve_train_runs_total", stop_reason="cancelled") == 1,
         "the run to be counted as cancelled")


# ---------------------------------------------------------------------- bounded labels


def _model_series(families: Families, model: str) -> list[str]:
    return [s.name for f in families.values() for s in f.samples if s.labels.get("model") == model]


def test_delete_removes_every_series_of_the_model(mserver: GradServer, mclient: Client) -> None:
    X, y = data()
    for model_id in ("keep", "gone"):
        m = mclient.create_model(model_id=model_id, layers=LINEAR, loss="mse",
                                 optimizer={"type": "sgd", "lr": 0.01})
        list(m.train(X, y, epochs=1, batch_size=8))
        m.forward(X[:1], retain_graph=True)
    families = scrape(mserver)
    assert value(families, "gradserve_models") == 2
    before = _model_series(families, "gone")
    assert {"gradserve_loss", "gradserve_steps_total", "gradserve_learning_rate",
            "gradserve_step_duration_seconds_count"} <= set(before)

    mclient.delete_model("gone")
    families = scrape(mserver)
    assert _model_series(families, "gone") == []
    assert sorted(_model_series(families, "keep")) == sorted(before)
    assert value(families, "gradserve_models") == 1


def test_max_models_caps_the_model_label(make_server: Callable[..., GradServer]) -> None:
    server = make_server(metrics_port=0, max_models=2)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        for model_id in ("a", "b"):
            client.create_model(model_id=model_id, layers=LINEAR)
        with pytest.raises(ResourceExhaustedError):
            client.create_model(model_id="c", layers=LINEAR)
    families = scrape(server)
    assert value(families, "gradserve_models") == value(families, "gradserve_models_limit") == 2
    models = {s.labels["model"] for f in families.values() for s in f.samples
              if "model" in s.labels}
    assert models == {"a", "b"}


def test_hooks_after_removal_do_not_recreate_series() -> None:
    metrics = Metrics(DEFAULT_BUCKETS, 4)
    metrics.model_added("m")
    metrics.loss("m", 1.0)
    metrics.model_removed("m")
    metrics.loss("m", 2.0)
    metrics.grad_norm("m", 1.0)
    metrics.learning_rate("m", 0.1)
    metrics.steps("m", 1, 8)
    metrics.graphs("m", 1, 1)
    metrics.phase_seconds("m", "forward", 0.01)
    exposed = [s for f in metrics.registry.collect() for s in f.samples if "model" in s.labels]
    assert exposed == []
    assert metrics.registry.get_sample_value("gradserve_models") == 0


class _Paused:
    """Wraps a metric so that labels() stops until released: a hook caught mid-write."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self.entered = threading.Event()
        self.release = threading.Event()

    def labels(self, *args: Any) -> Any:
        self.entered.set()
        assert self.release.wait(10)
        return self._metric.labels(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def test_hook_racing_a_delete_cannot_recreate_the_series() -> None:
    metrics = Metrics(DEFAULT_BUCKETS, 4)
    metrics.model_added("m")
    paused = _Paused(metrics.loss_gauge)
    metrics.loss_gauge = paused  # type: ignore[assignment]
    hook = threading.Thread(target=metrics.loss, args=("m", 3.0))
    hook.start()
    assert paused.entered.wait(10)  # the hook has checked the model is live and is writing
    remove = threading.Thread(target=metrics.model_removed, args=("m",))
    remove.start()
    remove.join(0.3)  # an unguarded remove finishes here, before the hook's write lands
    paused.release.set()
    hook.join(10)
    remove.join(10)
    assert not hook.is_alive() and not remove.is_alive()
    assert metrics.registry.get_sample_value("gradserve_loss", {"model": "m"}) is None


class _Recorder(Hooks):
    """Records model_added/model_removed; the first model_added waits until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def model_added(self, model_id: str) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.calls.append(("added", model_id))

    def model_removed(self, model_id: str) -> None:
        self.calls.append(("removed", model_id))


def test_store_reports_add_before_a_concurrent_delete() -> None:
    hooks = _Recorder()
    store = ModelStore(torch.device("cpu"), Limits(), hooks)
    spec = ModelSpec(source="layers",
                     layers=[{"type": "Linear", "kwargs": {"in_features": 2, "out_features": 1}}])
    create = threading.Thread(target=store.create, args=(spec, "m"))
    create.start()
    assert hooks.entered.wait(30)  # the model is in the store; its add is being reported
    delete = threading.Thread(target=store.delete, args=("m",))
    delete.start()
    delete.join(0.3)  # an unordered delete reports its remove here, before the add
    hooks.release.set()
    create.join(30)
    delete.join(30)
    assert hooks.calls == [("added", "m"), ("removed", "m")]
    assert len(store) == 0


@pytest.mark.gpu
def test_device_memory_on_cuda(make_server: Callable[..., GradServer]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    server = make_server(metrics_port=0, device="cuda")
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        m = client.create_model(layers=[{"type": "Linear", "in_features": 256,
                                         "out_features": 256}], loss="mse")
        m.backward(torch.randn(64, 256), torch.randn(64, 256))
    families = scrape(server)
    dev = f"cuda:{torch.cuda.current_device()}"
    memory = {kind: value(families, "gradserve_device_memory_bytes", device=dev, kind=kind)
              for kind in ("allocated", "reserved", "peak", "total")}
    assert 0 < memory["allocated"] <= memory["peak"]
    assert memory["allocated"] <= memory["reserved"] <= memory["total"]
    assert memory["total"] == torch.cuda.get_device_properties(dev).total_memory


# ---------------------------------------------------------------------- the dashboard

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                 "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, labels, words."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)          # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)                     # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                    # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)                   # dashboard variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    board = json.loads(DASHBOARD.read_text())
    panels = list(board["panels"])
    for panel in board["panels"]:
        panels.extend(panel.get("panels", []))
    out: list[tuple[str, str]] = []
    for panel in panels:
        if panel.get("type") == "row":
            continue
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no query"
        out.extend((panel["title"], t["expr"]) for t in panel["targets"])
    return out


def exported_names(families: Families) -> set[str]:
    names = {s.name for f in families.values() for s in f.samples}
    return names | {f.name for f in families.values() if f.type == "gauge"}


def test_promql_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(gradserve_step_duration_seconds_'
            'bucket{model=~"$model", phase="train_step"}[$__rate_interval]))) / on(model) '
            'group_left sum(x_total offset 5m) > bool 1e3')
    assert promql_metric_names(expr) == {"gradserve_step_duration_seconds_bucket", "x_total"}


def docs_promql() -> list[str]:
    """The expressions in docs/metrics.md's promql code blocks, one per block."""
    return [" ".join(block.split()) for block in
            re.findall(r"```promql\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)]


def test_docs_describe_exactly_the_exported_metrics(mserver: GradServer, mclient: Client
                                                    ) -> None:
    m = mclient.create_model(layers=LINEAR, loss="mse")
    m.backward(torch.zeros(1, 2), torch.zeros(1, 1))
    exported = exported_names(scrape(mserver))
    text = DOCS.read_text()
    rows = set(re.findall(r"^\| `(gradserve_\w+)` \| (\w+) \|", text, flags=re.MULTILINE))
    documented = {name: kind for name, kind in rows}
    assert set(documented) == {name + ("_total" if kind == "counter" else "")
                               for name, (kind, _) in EXPECTED.items()
                               if name.startswith("gradserve_")}
    for name, kind in documented.items():
        assert EXPECTED[name.removesuffix("_total")][0] == kind, name
    for name in re.findall(r"\bgradserve_[a-z]\w*", text):
        assert (name in exported or name in documented), f"docs mention {name}, not exported"
    assert docs_promql(), "no promql examples"
    for expr in docs_promql():
        unknown = {n for n in promql_metric_names(expr) if n != "up"} - exported
        assert not unknown, f"docs query {expr!r} uses {sorted(unknown)}"


def test_dashboard_queries_only_exported_metrics(mserver: GradServer, mclient: Client) -> None:
    X, y = data()
    m = mclient.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
    list(m.train(X, y, epochs=1, batch_size=8))
    exported = exported_names(scrape(mserver))
    exprs = dashboard_exprs()
    used: set[str] = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"panel {title!r} queries {sorted(missing)}, not exported"
        used |= names
    joined = "\n".join(e for _, e in exprs)
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\(\s*{quantile}\s*,[^\n]*"
                         r"gradserve_step_duration_seconds_bucket", joined), quantile
    assert {"gradserve_loss", "gradserve_rpc_duration_seconds_count", "gradserve_samples_total",
            "gradserve_device_memory_bytes"} <= used
    assert re.search(r'gradserve_rpc_duration_seconds_count\{code!~?"OK', joined)  # errors


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    yaml = pytest.importorskip("yaml")
    board = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    variable = next(v for v in board["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == source["uid"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "gradserve.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert board["uid"] and board["title"]
