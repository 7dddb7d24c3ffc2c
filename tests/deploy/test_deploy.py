"""Deployment files (docker/, deploy/): they parse, render, validate offline, and name only
commands, routes and metrics that exist.

Needs `kubectl` (for `kubectl kustomize`) and the dev extras (pyyaml, check-jsonschema,
kubernetes-validate). Without kubectl (on PATH or in the venv, where `make system-deps` downloads it)
the tests that render the manifests are skipped with the reason, reported by `pytest -ra`; with
SLEEPSERVE_REQUIRE_KUBECTL=1 (as in CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from kubernetes_validate.utils import SchemaNotFoundError

from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER, DEPLOY = ROOT / "docker", ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "sleepserve.json"
RULES = DEPLOY / "prometheus" / "sleepserve-rules.yaml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]

# Oldest Kubernetes the manifests promise to work on (HPA v2, policy/v1 PDB are GA since 1.23).
K8S_VERSION = "1.30.0"
# Subcommands of the `sleepserve` console script (design.md) and the unauthenticated probe routes.
SUBCOMMANDS = {"serve", "worker"}
PROBE_ROUTES = {"/health", "/ready"}
CRD_GROUPS = {"monitoring.coreos.com"}

KUBECTL_MISSING = (
    "kubectl is neither on PATH nor in the venv: the deploy tests render the kustomizations with "
    "`kubectl kustomize` (offline). `make system-deps` downloads it from dl.k8s.io, or see "
    "https://kubernetes.io/docs/tasks/tools/"
)

YAML_FILES = sorted(p for d in (DOCKER, DEPLOY) for p in d.rglob("*") if p.suffix in {".yaml", ".yml"})
OVERLAYS = sorted(p.parent for p in KUSTOMIZE.rglob("kustomization.yaml"))


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(kustomization: Path) -> list[dict]:
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if kubectl is None:
        if os.environ.get("SLEEPSERVE_REQUIRE_KUBECTL") == "1":
            pytest.fail(KUBECTL_MISSING)
        pytest.skip(KUBECTL_MISSING)
    proc = subprocess.run(
        [kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


@pytest.fixture(scope="module")
def metrics_text(tiny_checkpoint) -> str:
    """What a running server's GET /metrics returns (the app started in process, lifespan included)."""
    app = create_app(Settings(checkpoint=tiny_checkpoint(), store="memory"))
    with TestClient(app) as client:
        client.post(
            "/v1/completions", json={"model": app.state.server.model_name, "prompt": "hi", "max_tokens": 2}
        )
        response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def metric_families(metrics_text: str) -> dict[str, str]:
    """{family: type} from the `# TYPE` lines of the exposition (without prometheus_client's *_created
    gauges). A labelled metric has no samples until first used, but always has its TYPE line."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, flags=re.M))
    return {name: kind for name, kind in types.items() if not name.endswith("_created")}


def exposed_metric_names(metrics_text: str) -> set[str]:
    """Sample names the server exposes (a counter's family name already ends in _total)."""
    names = set()
    for family, kind in metric_families(metrics_text).items():
        names |= {family + s for s in (["_bucket", "_sum", "_count"] if kind == "histogram" else [""])}
    return names


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


# --- every YAML parses ------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    assert load_yaml(path), f"{path} is empty"


def test_yaml_files_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in YAML_FILES}
    assert {"docker/compose.yaml", "deploy/kubernetes/base/kustomization.yaml"} <= names


# --- Kubernetes -----------------------------------------------------------------------------


def check_crd(doc: dict) -> None:
    """Structural checks for the Prometheus Operator kinds (not in kubernetes-validate's schemas)."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["apiVersion"]
    assert doc.get("metadata", {}).get("name"), f"{kind} without metadata.name"
    if kind == "ServiceMonitor":
        assert spec.get("selector", {}).get("matchLabels"), "ServiceMonitor needs spec.selector"
        assert spec.get("endpoints"), "ServiceMonitor needs spec.endpoints"
        for ep in spec["endpoints"]:
            assert ep.get("port") and ep.get("path") == "/metrics", ep
    elif kind == "PrometheusRule":
        check_rule_groups(spec.get("groups"))
    else:
        pytest.fail(f"unexpected CRD kind {kind}")


def check_rule_groups(groups: list) -> None:
    assert groups, "no rule groups"
    for group in groups:
        assert group.get("name") and group.get("rules"), group
        for rule in group["rules"]:
            assert rule.get("alert") and rule.get("expr"), rule
            assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, rule
            assert rule.get("annotations", {}).get("summary"), rule


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=lambda p: str(p.relative_to(KUSTOMIZE)))
def test_kustomization_renders_and_validates(kustomization: Path) -> None:
    docs = render(kustomization)
    assert docs, f"{kustomization} rendered nothing"
    errors = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            check_crd(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{where}: {path}: {e.message}")
        except SchemaNotFoundError:
            errors.append(f"{where}: no schema for {doc['apiVersion']} in Kubernetes {K8S_VERSION}")
    assert not errors, "invalid manifests:\n" + "\n".join(errors)


def server_container(docs: list[dict]) -> dict:
    return find(docs, "Deployment", "sleepserve-server")["spec"]["template"]["spec"]["containers"][0]


def test_base_server_probes_drain_and_resources() -> None:
    docs = render(KUSTOMIZE / "base")
    pod = find(docs, "Deployment", "sleepserve-server")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"] == ["serve"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c:
            assert c[probe]["httpGet"]["path"] in PROBE_ROUTES, probe
    # The preStop sleep and the SIGTERM drain both fit in the grace period.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) < pod["terminationGracePeriodSeconds"] - 30
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key]), key
    service = find(docs, "Service", "sleepserve")
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}


def test_base_worker_and_config() -> None:
    docs = render(KUSTOMIZE / "base")
    worker = find(docs, "Deployment", "sleepserve-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"] == ["worker"]
    config = find(docs, "ConfigMap", "sleepserve-config")["data"]
    assert all(k.startswith("SLEEPSERVE_") for k in config)
    assert config["SLEEPSERVE_STORE"].startswith("redis://")
    for c in (worker, server_container(docs)):
        refs = [e.get("configMapRef", {}).get("name") for e in c["envFrom"]]
        assert "sleepserve-config" in refs


def test_base_hpa_scales_on_requests_waiting() -> None:
    docs = render(KUSTOMIZE / "base")
    hpa = find(docs, "HorizontalPodAutoscaler", "sleepserve-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sleepserve-server"
    metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert metrics == ["sleepserve_requests_waiting"]
    # prometheus-adapter must serve that metric.
    adapter = load_yaml(KUSTOMIZE / "prometheus-adapter-values.yaml")[0]
    assert any(r["name"]["as"] == metrics[0] for r in adapter["rules"]["custom"])


def test_base_monitoring_matches_services() -> None:
    docs = render(KUSTOMIZE / "base")
    monitor = find(docs, "ServiceMonitor", "sleepserve")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    scraped = {
        (s["metadata"]["name"], p["name"])
        for s in services
        if selector.items() <= s["metadata"].get("labels", {}).items()
        for p in s["spec"]["ports"]
        if p["name"] in {ep["port"] for ep in monitor["spec"]["endpoints"]}
    }
    assert scraped == {("sleepserve", "http"), ("sleepserve-worker", "metrics")}
    rule = find(docs, "PrometheusRule", "sleepserve")
    assert rule["spec"]["groups"] == load_yaml(RULES)[0]["groups"], (
        "base PrometheusRule and deploy/prometheus/sleepserve-rules.yaml differ: keep them equal"
    )


def test_trial_overlay_runs_the_configured_redis() -> None:
    docs = render(KUSTOMIZE / "overlays" / "trial")
    host = find(docs, "ConfigMap", "sleepserve-config")["data"]["SLEEPSERVE_STORE"].split("/")[2]
    name, port = host.split(":")
    service = find(docs, "Service", name)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    redis = find(docs, "StatefulSet", name)["spec"]
    assert "--appendonly" in redis["template"]["spec"]["containers"][0]["args"]
    assert redis["volumeClaimTemplates"], "Redis needs a persistent volume"
    assert not [d for d in render(KUSTOMIZE / "base") if d["kind"] == "StatefulSet"], "base brings no Redis"


def test_gpu_overlay() -> None:
    docs = render(KUSTOMIZE / "overlays" / "gpu")
    for name in ("sleepserve-server", "sleepserve-worker"):
        pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert pod["nodeSelector"], name
        assert c["image"].endswith(":cuda"), c["image"]


# --- docker compose, Prometheus, Grafana ---------------------------------------------------


def compose() -> dict:
    return load_yaml(DOCKER / "compose.yaml")[0]


def test_compose_validates_against_compose_spec() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    assert exe.exists(), f"{exe} missing: install the dev extras (pip install -e '.[dev]')"
    proc = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"server", "worker", "redis", "prometheus", "grafana"}
    server, worker = services["server"], services["worker"]
    assert server["deploy"]["replicas"] == 2
    for svc, cmd in ((server, "serve"), (worker, "worker")):
        assert svc["command"] == [cmd]
        assert svc["build"]["context"] == ".."
        assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILES[0]
        assert svc["environment"]["SLEEPSERVE_STORE"] == "redis://redis:6379/0"
    probe = " ".join(server["healthcheck"]["test"])
    assert set(re.findall(r"127\.0\.0\.1:\d+(/\w*)", probe)) <= PROBE_ROUTES
    assert re.search(r"/(health|ready)\b", probe)
    assert "--appendonly" in services["redis"]["command"]
    # Every bind-mounted file exists.
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"compose mounts missing {src}"


def test_prometheus_scrapes_compose_services_and_loads_rules() -> None:
    prom = load_yaml(DOCKER / "prometheus.yml")[0]
    names = {n for job in prom["scrape_configs"] for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names == {"server", "worker"}
    mounts = dict(v.split(":")[:2][::-1] for v in compose()["services"]["prometheus"]["volumes"])
    for rule_file in prom["rule_files"]:
        assert (DOCKER / mounts[rule_file]).resolve() == RULES
    check_rule_groups(load_yaml(RULES)[0]["groups"])


def test_grafana_provisioning_points_at_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"])
    prov = DOCKER / mounts["/etc/grafana/provisioning"]
    (provider,) = load_yaml(prov / "dashboards" / "sleepserve.yaml")[0]["providers"]
    dashboards = [m for m in mounts if m.startswith(provider["options"]["path"] + "/")]
    assert [(DOCKER / mounts[m]).resolve() for m in dashboards] == [DASHBOARD]
    (source,) = load_yaml(prov / "datasources" / "prometheus.yaml")[0]["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://prometheus:")


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]), "duplicate panel ids"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


# --- names that must exist ------------------------------------------------------------------


def queried_metric_files() -> list[Path]:
    return [DASHBOARD, RULES, *KUSTOMIZE.rglob("*.yaml"), DOCKER / "prometheus.yml"]


def test_queried_metrics_exist(metrics_text: str) -> None:
    exposed = exposed_metric_names(metrics_text)
    missing = {}
    for path in queried_metric_files():
        for name in re.findall(r"\bsleepserve_[a-z0-9_]*[a-z0-9]", path.read_text()):
            if name not in exposed:
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"metrics queried but not exposed by server.metrics: {missing}"


def test_dashboard_covers_every_metric(metrics_text: str) -> None:
    text = DASHBOARD.read_text()
    missing = {family for family in metric_families(metrics_text) if family not in text}
    assert not missing, f"metrics missing from the dashboard: {missing}"


def test_alerts_cover_the_failure_modes() -> None:
    exprs = " ".join(r["expr"] for g in load_yaml(RULES)[0]["groups"] for r in g["rules"])
    for needle in (
        "rate(sleepserve_sleep_deadline_misses_total",
        "/ sum by (job, instance) (rate(sleepserve_sleep_passes_count",  # a miss rate, not any miss
        "histogram_quantile(0.99, sum by (job, le) (rate(sleepserve_decode_stall_seconds_bucket",
        "histogram_quantile(0.99, sum by (job, le) (rate(sleepserve_inter_token_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (job, le) (rate(sleepserve_output_handoff_seconds_bucket",
        "rate(sleepserve_store_errors_total",
    ):
        assert needle in exprs, needle


def pyproject_list(key: str) -> list[str]:
    """A one-line or multi-line string array of pyproject.toml (no tomllib on Python 3.10)."""
    match = re.search(rf"^{key} = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert match, f"pyproject.toml has no {key} = [...]"
    return re.findall(r'"([^"]+)"', match.group(1))


def console_scripts() -> set[str]:
    section = (ROOT / "pyproject.toml").read_text().partition("[project.scripts]")[2].split("\n[")[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_and_healthcheck(path: Path) -> None:
    ins = dockerfile_instructions(path)
    last = {op: rest for op, rest in ins}
    entrypoint, cmd = json.loads(last["ENTRYPOINT"]), json.loads(last["CMD"])
    assert entrypoint == ["sleepserve"] and entrypoint[0] in console_scripts()
    assert cmd == ["serve"]
    assert "USER" in last and last["USER"] not in {"root", "0"}, "image must not run as root"
    routes = set(re.findall(r"127\.0\.0\.1:%s(/\w*)", last["HEALTHCHECK"]))
    assert routes and routes <= PROBE_ROUTES, last["HEALTHCHECK"]


def test_subcommands_used_exist() -> None:
    used = {c for svc in ("server", "worker") for c in compose()["services"][svc]["command"]}
    for kustomization in OVERLAYS:
        for doc in render(kustomization):
            if doc["kind"] == "Deployment":
                used |= set(doc["spec"]["template"]["spec"]["containers"][0]["args"])
    assert used == SUBCOMMANDS
    cli = ROOT / "server" / "cli.py"  # target of [project.scripts] sleepserve = "server.cli:main"
    if cli.exists():
        for sub in SUBCOMMANDS:
            assert re.search(rf"[\"']{sub}[\"']", cli.read_text()), f"server/cli.py has no {sub!r}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_the_build_needs(path: Path) -> None:
    """COPY sources exist and survive .dockerignore, and every package of pyproject is copied."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = set()
    for op, rest in dockerfile_instructions(path):
        if op == "COPY" and not rest.startswith("--from"):
            copied |= set(rest.split()[:-1])
    for src in copied:
        assert (ROOT / src).exists(), f"{path.name} copies {src}, which is missing from the repo"
        assert src not in ignored, f"{path.name} copies {src}, which .dockerignore excludes"
    packages = {p.split(".")[0] for p in pyproject_list("packages")}
    assert packages <= copied, f"{path.name} does not copy packages {packages - copied}"
    assert "README.md" in copied, "pyproject's readme is needed by `pip install .`"


def test_image_checkpoint_is_shipped() -> None:
    """The images set SLEEPSERVE_CHECKPOINT to the copy of checkpoints/sleepy-mix."""
    ckpt = ROOT / "checkpoints" / "sleepy-mix"
    for name in ("model.safetensors", "config.json"):
        assert (ckpt / name).is_file(), f"{ckpt / name} missing: the images would ship no model"
    for path in DOCKERFILES:
        assert "SLEEPSERVE_CHECKPOINT=/opt/sleepserve/checkpoints/sleepy-mix" in path.read_text()
