"""Alert rules (deploy/prometheus/rules.yml): promtool checks and unit tests, the metrics they read,
the PrometheusRule generated from them, and the dashboard's queries evaluated by promtool.

promtool is required in CI (require_tool) and skipped locally when missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import require_tool
from gradserve import Client
from gradserve.errors import FailedPreconditionError
from gradserve_server.app import GradServer
from gradserve_server.metrics import PHASES, STOP_REASONS
from test_metrics import exported_names, promql_metric_names, scrape

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULE_TESTS = PROMETHEUS / "rules.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gradserve.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool(shutil.which("promtool") is not None, "promtool (apt-get install -y prometheus)")
    return subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def run_promql_tests(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[
        str]:
    """promtool test rules on a generated file that loads rules.yml."""
    path = tmp_path / "generated.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                    "tests": tests}))
    return promtool("test", "rules", str(path))


# ---------------------------------------------------------------- promtool


def test_promtool_checks_the_rules() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert set(alerts()) == fires, "every alert needs a case where it fires"
    assert set(alerts()) == quiet, "every alert needs a case where it stays quiet"
    for case in cases:  # a firing case pins the annotations too: the templates render
        for expected in case.get("exp_alerts") or []:
            assert expected.get("exp_annotations"), case


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: a rule that lost its non-finite stop reason is caught."""
    broken = RULES.read_text().replace(
        'or (increase(gradserve_train_runs_total{stop_reason="non_finite"}[15m]) > 0)', "")
    assert broken != RULES.read_text()
    (tmp_path / "rules.yml").write_text(broken)
    (tmp_path / "rules.test.yml").write_text(RULE_TESTS.read_text())
    proc = promtool("test", "rules", str(tmp_path / "rules.test.yml"))
    assert proc.returncode != 0
    assert "a Train run stopped by a non-finite loss" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- the rules read real metrics


@pytest.fixture
def mserver(make_server: Callable[..., GradServer]) -> GradServer:
    return make_server(metrics_port=0)


@pytest.fixture
def mclient(mserver: GradServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{mserver.port}", timeout=30) as c:
        yield c


def test_rules_read_only_metrics_and_label_values_the_server_exports(
        mserver: GradServer, mclient: Client) -> None:
    X = torch.randn(16, 2)
    m = mclient.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01})
    list(m.train(X, X[:, :1], epochs=1, batch_size=8))
    exported = exported_names(scrape(mserver))
    # on a CPU server the device family has no samples; it is declared all the same
    exported.add("gradserve_device_memory_bytes")
    for name, rule in alerts().items():
        used = promql_metric_names(rule["expr"])
        assert used, name
        unknown = used - exported - {"up"}
        assert not unknown, f"{name} reads {sorted(unknown)}, which the server does not export"
    known = {"stop_reason": set(STOP_REASONS), "phase": set(PHASES),
             "kind": {"allocated", "reserved", "peak", "total"}}
    for name, rule in alerts().items():
        for label, value in re.findall(r'(\w+)="([^"]*)"', rule["expr"]):
            if label in known:
                assert value in known[label], f"{name}: {label}={value!r} is never exported"


def test_nan_alert_fires_for_a_train_stopped_by_a_non_finite_loss(
        mserver: GradServer, mclient: Client, tmp_path: Path) -> None:
    """The server's own exposition, before and after such a run, fed to the rule."""
    X = torch.randn(40, 2)
    y = X[:, :1] * 2
    X[25] = float("nan")
    m = mclient.create_model(layers=LINEAR, loss="mse", optimizer={"type": "sgd", "lr": 0.01},
                             model_id="diverges")

    def snapshot() -> dict[str, float]:
        families = scrape(mserver)
        counter = {s.labels["stop_reason"]: s.value for s in families["gradserve_train_runs"].samples
                   if s.name == "gradserve_train_runs_total"}
        loss = [s.value for s in families["gradserve_loss"].samples
                if s.labels.get("model") == m.id]
        return {"non_finite": counter["non_finite"], "loss": loss[0] if loss else 0.0}

    list(m.train(X[:20], y[:20], epochs=1, batch_size=10))  # a clean run first
    before = snapshot()
    with pytest.raises(FailedPreconditionError):
        list(m.train(X, y, epochs=1, batch_size=10))
    after = snapshot()
    assert after["non_finite"] == before["non_finite"] + 1

    def series(values: list[float]) -> str:
        return " ".join(repr(float(v)) for v in values)

    labels = 'job="gradserve", instance="gs-0:9464"'
    result = run_promql_tests(tmp_path, [{
        "interval": "1m",
        "input_series": [
            {"series": f'gradserve_loss{{{labels}, model="diverges"}}',
             "values": series([before["loss"]] * 3 + [after["loss"]] * 3)},
            {"series": f'gradserve_train_runs_total{{{labels}, stop_reason="non_finite"}}',
             "values": series([before["non_finite"]] * 3 + [after["non_finite"]] * 3)},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "GradserveLossNotFinite", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "GradserveLossNotFinite", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "job": "gradserve",
                               "instance": "gs-0:9464", "stop_reason": "non_finite"},
                "exp_annotations": {
                    "summary": "A Train run stopped on a non-finite loss on gs-0:9464",
                    "description": alerts()["GradserveLossNotFinite"]["annotations"][
                        "description"].replace("{{ if not $labels.model }}", "").replace(
                        "{{ end }}", ""),
                }}]},
        ],
    }])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- one source: rules.yml


def _gen_prometheusrule() -> Any:
    spec = importlib.util.spec_from_file_location("gen_prometheusrule",
                                                  PROMETHEUS / "gen_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    gen = _gen_prometheusrule()
    assert PROMETHEUS_RULE.read_text() == gen.render(), (
        "deploy/k8s/monitoring/prometheusrule.yaml is stale: "
        "run python deploy/prometheus/gen_prometheusrule.py")
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_prometheusrule_check_fails_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    gen = _gen_prometheusrule()
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(gen.render().replace("severity: critical", "severity: page"))
    monkeypatch.setattr(gen, "TARGET", stale)
    assert gen.main(["gen", "--check"]) == 1
    assert gen.main(["gen"]) == 0 and gen.main(["gen", "--check"]) == 0


def test_compose_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [PROMETHEUS / f for f in config["rule_files"]] == [RULES]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    config_dir = "/etc/prometheus"
    assert f"./prometheus/rules.yml:{config_dir}/{config['rule_files'][0]}:ro" in volumes
    proc = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_docs_point_at_the_rules_and_name_every_alert() -> None:
    text = METRICS_DOC.read_text()
    assert "deploy/prometheus/rules.yml" in text
    for name in alerts():
        assert f"`{name}`" in text, f"docs/metrics.md does not name the alert {name}"
    documented = set(re.findall(r"`(Gradserve[A-Za-z]+)`", text))
    assert documented <= set(alerts()), f"docs name alerts that do not exist: {documented}"


# ---------------------------------------------------------------- the dashboard, evaluated


def dashboard_expr(title: str) -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in board["panels"] if p.get("title") == title]
    return [t["expr"] for t in panel["targets"]]


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus sees it with job=gradserve picked."""
    return expr.replace("$__rate_interval", "5m").replace("$job", "gradserve")


def test_error_ratio_shows_zero_without_errors_and_matches_the_alert(tmp_path: Path) -> None:
    (expr,) = dashboard_expr("RPC error ratio")
    codes = re.search(r'code!~"([^"]+)"', expr)
    rule_codes = re.search(r'code!~"([^"]+)"', alerts()["GradserveHighErrorRatio"]["expr"])
    assert codes and rule_codes and codes.group(1) == rule_codes.group(1)
    ok = "gradserve_rpc_duration_seconds_count{job=\"gradserve\", instance=\"a\", code=\"OK\", method=\"Forward\"}"
    internal = ok.replace('code="OK"', 'code="INTERNAL"')
    other_job = internal.replace('job="gradserve"', 'job="other"')
    promql = as_promql(expr)
    result = run_promql_tests(tmp_path, [
        {"interval": "1m",  # only successful calls: 0, not "No data"
         "input_series": [{"series": ok, "values": "0+10x10"}],
         "promql_expr_test": [{"expr": promql, "eval_time": "10m",
                               "exp_samples": [{"labels": "{}", "value": 0}]}]},
        {"interval": "1m",  # no calls at all: 0 as well
         "input_series": [{"series": 'up{job="gradserve", instance="a"}', "values": "1x10"}],
         "promql_expr_test": [{"expr": promql, "eval_time": "10m",
                               "exp_samples": [{"labels": "{}", "value": 0}]}]},
        {"interval": "1m",  # a quarter failed; another job's errors do not count
         "input_series": [{"series": ok, "values": "0+30x10"},
                          {"series": internal, "values": "0+10x10"},
                          {"series": other_job, "values": "0+1000x10"}],
         "promql_expr_test": [{"expr": promql, "eval_time": "10m",
                               "exp_samples": [{"labels": "{}", "value": 0.25}]}]},
    ])
    assert result.returncode == 0, result.stdout + result.stderr


def test_process_panels_show_only_gradserve_jobs(tmp_path: Path) -> None:
    exprs = dashboard_expr("Process memory and CPU")
    assert exprs
    tests = []
    for expr in exprs:
        name = "process_cpu_seconds_total" if "cpu" in expr else "process_resident_memory_bytes"
        tests.append({
            "interval": "1m",
            "input_series": [
                {"series": f'{name}{{job="gradserve", instance="gs-0:9464"}}', "values": "0+60x10"},
                {"series": f'{name}{{job="prometheus", instance="localhost:9090"}}',
                 "values": "0+60x10"},
            ],
            "promql_expr_test": [{"expr": as_promql(expr), "eval_time": "10m", "exp_samples": [
                {"labels": (f'{name}{{job="gradserve", instance="gs-0:9464"}}'
                            if "rate(" not in expr else '{job="gradserve", instance="gs-0:9464"}'),
                 "value": 1 if "rate(" in expr else 600}]}],
        })
    result = run_promql_tests(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr
