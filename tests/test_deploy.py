"""Checks of deploy/ and the Dockerfile: they parse, they agree with each other, the
Prometheus rules compute what they claim (promtool unit tests with hand-computed answers),
and the dashboard's queries use only the metric contract and return data from a real
Prometheus scraping contract-shaped metrics.

promtool / prometheus come from `apt-get install -y prometheus`, the Dockerfile parser from
the `dockerfile` package; a missing one fails the test under CI and skips it loudly elsewhere.
"""

from __future__ import annotations

import http.server
import math
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ranker.quality import QualitySums
from ranker.serving.settings import ServingSettings
from tests.promhelpers import (
    CONTRACT_COUNTERS,
    CONTRACT_GAUGES,
    CONTRACT_HISTOGRAMS,
    CONTRACT_LABELS,
    CONTRACT_SERIES,
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_DIR,
    REPO,
    RULES_DIR,
    api_get,
    dashboard_queries,
    fill_variables,
    free_port,
    grouping_labels,
    iter_panels,
    load_dashboard,
    metric_names,
    missing_dependency,
    panels_without_data,
    query,
    recorded_names,
    require_tool,
    rule_groups,
    selector_labels,
    series_labels,
    source_series,
    start_prometheus,
    wait_for_data,
)

PORT = 8000
HEALTH, READY = "/healthz", "/readyz"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
PROM_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _promtool(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups(RULES_DIR / "alerts.yml") for r in g["rules"]}


def test_rule_and_test_files_exist() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert PROM_TESTS, "deploy/prometheus/tests/ holds no promtool unit tests"


# ------------------------------------------------------------------ Prometheus


def test_promtool_check_config() -> None:
    out = _promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    # the rule_files glob must reach both files, or the alerts would silently not load
    assert "2 rule files found" in out.stdout + out.stderr


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(rules: Path) -> None:
    out = _promtool("check", "rules", rules)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("unit", PROM_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(unit: Path) -> None:
    out = _promtool("test", "rules", unit, cwd=unit.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_rule_file_and_alert_is_unit_tested() -> None:
    tested_files: set[Path] = set()
    firing: set[str] = set()
    quiet: set[str] = set()
    checked_records: set[str] = set()
    for unit in PROM_TESTS:
        doc = _yaml(unit)
        tested_files |= {(unit.parent / f).resolve() for f in doc["rule_files"]}
        for case in doc["tests"]:
            for a in case.get("alert_rule_test", []):
                (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
            for q in case.get("promql_expr_test", []):
                checked_records |= metric_names(q["expr"])
    assert tested_files >= {p.resolve() for p in RULE_FILES}
    # each alert is seen firing and seen quiet (before its `for:` has run out, or healthy)
    assert firing == set(_alerts()), "alerts never asserted firing"
    assert quiet == set(_alerts()), "alerts never asserted quiet"
    assert checked_records == recorded_names(), "recording rules without an expected value"


def test_alert_thresholds() -> None:
    alerts = _alerts()
    expected = {
        "RankerScoreDriftWarning": ("task:ranker_task_score:psi1h > 0.1 and on (task) task:ranker_task_score_bin:increase1h >= 1000", "15m", "warning"),
        "RankerScoreDriftCritical": ("task:ranker_task_score:psi1h > 0.25 and on (task) task:ranker_task_score_bin:increase1h >= 1000", "15m", "critical"),
        "RankerModelNotReady": ("ranker_ready == 0", None, "critical"),
        "RankerScrapeDown": ('up{job="ranker"} == 0', None, "critical"),
    }
    for name, (expr, for_, severity) in expected.items():
        assert alerts[name]["expr"].strip() == expr
        assert for_ is None or alerts[name]["for"] == for_
        assert alerts[name]["labels"]["severity"] == severity
    assert (
        "task:ranker_task_head_duration_seconds:p99_5m" in alerts["RankerHeadLatencyHigh"]["expr"]
    )
    assert "5xx" in alerts["RankerHigh5xxRatio"]["expr"]
    for rule in alerts.values():  # every alert points at its section of the README
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert anchor in _readme_anchors(), anchor


def _readme_anchors() -> set[str]:
    """GitHub's heading anchors of deploy/README.md."""
    heads = re.findall(r"^#+\s+(.*)$", (DEPLOY / "README.md").read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_rules_use_only_contract_metrics() -> None:
    allowed = CONTRACT_SERIES | recorded_names() | {"up"}
    for path in RULE_FILES:
        for group in rule_groups(path):
            for rule in group["rules"]:
                unknown = metric_names(rule["expr"]) - allowed
                assert not unknown, (
                    f"{path.name} {rule.get('record') or rule.get('alert')}: {unknown}"
                )


def _every_query() -> list[tuple[str, str]]:
    """(where, expr) of every rule and every dashboard query."""
    rules = [(f"{p.name} {r.get('record') or r.get('alert')}", r["expr"]) for p in RULE_FILES for g in rule_groups(p) for r in g["rules"]]
    return rules + [(f"dashboard {q.panel} {q.ref}", q.expr) for q in dashboard_queries(task="ctr")]


def test_rules_and_dashboard_use_only_labels_their_series_have() -> None:
    """A matcher names a label of the series it selects, and a by/on/... list only labels of
    the series the expression reads (contract series: CONTRACT_LABELS; recorded ones: their
    level), so a misspelt or missing label cannot pass as an empty or merged result."""
    assert set(CONTRACT_LABELS) == {*CONTRACT_COUNTERS, *CONTRACT_HISTOGRAMS, *CONTRACT_GAUGES}
    for where, expr in _every_query():
        for name, label in selector_labels(expr):
            assert label in series_labels(name), f"{where}: {name} has no label {label!r}"
        have = set().union(*(series_labels(n) for n in metric_names(expr)))
        assert grouping_labels(expr) <= have, f"{where}: {grouping_labels(expr) - have} on none of {metric_names(expr)}"


def test_label_checks_catch_a_wrong_label() -> None:
    assert selector_labels('sum by (task) (rate(ranker_task_items_total{taks="ctr"}[5m]))') == {("ranker_task_items_total", "taks")}
    assert "taks" not in series_labels("ranker_task_items_total")
    assert grouping_labels("sum by (job, stage) (rate(ranker_requests_total[5m]))") - series_labels("ranker_requests_total") == {"stage"}


def test_psi_rule_sums_replicas_and_floors_shares() -> None:
    rules = {
        r.get("record"): r["expr"]
        for g in rule_groups(RULES_DIR / "recording.yml")
        for r in g["rules"]
    }
    assert "sum by (task, bin)" in rules["task_bin:ranker_task_score_bin:increase1h"]
    assert "clamp_min" in rules["task_bin:ranker_task_score_bin:share1h"]
    assert "1e-4" in rules["task_bin:ranker_task_score_bin:share1h"]
    assert "clamp_min" in rules["task_bin:ranker_task_score_reference:share"]
    assert "ln(" in rules["task:ranker_task_score:psi1h"]


def test_prometheus_config_scrapes_the_compose_service() -> None:
    cfg = _yaml(PROMETHEUS_DIR / "prometheus.yml")
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ranker")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"ranker:{PORT}"]
    assert "ranker" in _yaml(COMPOSE)["services"]
    globbed = {p for pattern in cfg["rule_files"] for p in PROMETHEUS_DIR.glob(pattern)}
    assert globbed == set(RULE_FILES)


# ------------------------------------------------------------------ metric-name lexer


def test_metric_names_lexer() -> None:
    expr = (
        'sum by (task, le) (rate(ranker_task_head_duration_seconds_bucket{task=~"a|b"}[5m])) '
        "/ on (task) group_left () clamp_min(task:x:rate5m offset 5m, 1e-4) > bool 0 "
        'and on (task) absent(up{job="ranker"}) or vector(1) unless ln(foo_total[1h:1m])'
    )
    assert metric_names(expr) == {
        "ranker_task_head_duration_seconds_bucket",
        "task:x:rate5m",
        "up",
        "foo_total",
    }
    assert metric_names("histogram_quantile(0.99, sum(rate(x_bucket[1m])) by (le))") == {"x_bucket"}


def test_fill_variables() -> None:
    out = fill_variables(
        'rate(x{task=~"$task"}[$__rate_interval]) + y{t="${task}"}[$__range]', "ctr"
    )
    assert out == 'rate(x{task=~"ctr"}[1m]) + y{t="ctr"}[1m]'
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        fill_variables('x{a="$other"}', "ctr")


# ------------------------------------------------------------------ Dockerfile

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


@pytest.fixture(scope="module")
def docker_commands() -> tuple[Any, ...]:
    try:
        import dockerfile  # the official (Go) Dockerfile parser
    except ImportError:
        missing_dependency("the `dockerfile` package", ".venv/bin/pip install dockerfile")
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def _final_stage(commands: tuple[Any, ...]) -> list[Any]:
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return list(commands[last_from:])


def _one(commands: list[Any], cmd: str) -> Any:
    found = [c for c in commands if c.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd} in the final stage, found {len(found)}"
    return found[0]


def test_dockerfile_instructions(docker_commands: tuple[Any, ...]) -> None:
    assert docker_commands, "empty Dockerfile"
    assert {c.cmd for c in docker_commands} <= INSTRUCTIONS, {
        c.cmd for c in docker_commands
    } - INSTRUCTIONS
    assert docker_commands[0].cmd in ("ARG", "FROM")
    froms = [c for c in docker_commands if c.cmd == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    stages = [c.value[2] for c in froms if len(c.value) == 3 and c.value[1].upper() == "AS"]
    # COPY --from names an earlier stage
    for c in docker_commands:
        for flag in c.flags:
            if flag.startswith("--from="):
                assert flag.removeprefix("--from=") in stages, c.original
    # the base is a slim Python 3.11
    base_arg = next(
        c for c in docker_commands if c.cmd == "ARG" and c.value[0].startswith("PYTHON_IMAGE=")
    )
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11(\.\d+)?-slim(-\w+)?", base_arg.value[0])
    # the final stage runs as a non-root user
    users = [c.value[0] for c in _final_stage(docker_commands) if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_torch_variant_and_pin(docker_commands: tuple[Any, ...]) -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    args = dict(
        c.value[0].split("=", 1) for c in docker_commands if c.cmd == "ARG" and "=" in c.value[0]
    )
    assert args["TORCH_VARIANT"] == "cpu"
    install = next(
        c.value[0] for c in docker_commands if c.cmd == "RUN" and "torch==" in c.value[0]
    )
    assert "${TORCH_VERSION}" in install and "download.pytorch.org/whl/${TORCH_VARIANT}" in install
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    # the image's torch must satisfy pyproject, or `pip install .` would replace it
    assert torch.specifier.contains(args["TORCH_VERSION"]), (args["TORCH_VERSION"], str(torch))


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _in_build_context(rel: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = rel.strip("/").split("/")
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


def test_dockerignore_semantics() -> None:
    assert _in_build_context("pyproject.toml") and _in_build_context("ranker/serving/app.py")
    for rel in (".venv/bin/python", ".git/HEAD", "runs/b/model.safetensors", "tests/test_deploy.py",
                "ranker/model/__pycache__/x.cpython-311.pyc", "deploy/k8s/service.yaml"):  # fmt: skip
        assert not _in_build_context(rel), rel


def test_dockerfile_copy_sources_exist_in_the_build_context(
    docker_commands: tuple[Any, ...],
) -> None:
    copies = [
        c
        for c in docker_commands
        if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from=") for f in c.flags)
    ]
    assert copies
    for c in copies:
        for src in c.value[:-1]:
            path = REPO / src
            assert path.exists(), (
                f"Dockerfile line {c.start_line}: {src} does not exist in the repo"
            )
            files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
            assert files, f"{src}: nothing to copy"
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if "__pycache__" not in rel:
                    assert _in_build_context(rel), (
                        f"{rel} is excluded by .dockerignore but COPY needs it"
                    )


def _entrypoint(commands: tuple[Any, ...]) -> list[str]:
    final = _final_stage(commands)
    entry, cmd = _one(final, "ENTRYPOINT"), _one(final, "CMD")
    assert entry.json and cmd.json, "ENTRYPOINT and CMD must use the exec (JSON) form"
    return [*entry.value, *cmd.value]


def _run_entrypoint(
    argv: list[str], tmp_path: Path, env: dict[str, str], extra: list[str]
) -> list[str]:
    """Run the image's start command with a stand-in `ranker` that prints its argv."""
    fake = tmp_path / "bin" / "ranker"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    full_env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", **env}
    out = subprocess.run(
        [*argv, *extra], env=full_env, capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.splitlines()


def test_dockerfile_starts_ranker_serve(docker_commands: tuple[Any, ...], tmp_path: Path) -> None:
    argv = _entrypoint(docker_commands)
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not on this machine")
    serve = ["serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", str(PORT)]
    assert _run_entrypoint(argv, tmp_path, {}, []) == serve
    assert _run_entrypoint(argv, tmp_path, {"RANKER_BUNDLE": "/models/b 1"}, []) == [
        "serve", "--bundle", "/models/b 1", "--host", "0.0.0.0", "--port", str(PORT),
    ]  # fmt: skip
    assert _run_entrypoint(argv, tmp_path, {"RANKER_PORT": "9100", "RANKER_HOST": "::"}, []) == [
        "serve", "--bundle", "/bundle", "--host", "::", "--port", "9100",
    ]  # fmt: skip
    # `docker run IMAGE --device cuda` and k8s `args:` append to the command
    assert _run_entrypoint(argv, tmp_path, {}, ["--device", "cuda"]) == [*serve, "--device", "cuda"]
    final = _final_stage(docker_commands)
    assert [c.value for c in final if c.cmd == "EXPOSE"] == [(str(PORT),)]
    env = _one(final, "ENV").value  # (key, value, key, value, ...)
    assert dict(zip(env[::2], env[1::2], strict=True))["RANKER_BUNDLE"] == "/bundle"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status if self.path == HEALTH else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_dockerfile_healthcheck_hits_healthz(docker_commands: tuple[Any, ...]) -> None:
    """The check probes /healthz on the port the entrypoint serves on: RANKER_PORT (here a
    stand-in server's free port), else the image's default."""
    hc = _one(_final_stage(docker_commands), "HEALTHCHECK")
    assert hc.json and hc.value[0] == "CMD" and hc.value[1] == "python"
    assert f"{HEALTH}' %" in hc.value[-1]
    assert f"os.environ.get('RANKER_PORT', '{PORT}')" in hc.value[-1]  # the entrypoint's default port
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    argv = [sys.executable, *hc.value[2:]]
    env = {k: v for k, v in os.environ.items() if k != "RANKER_PORT"}
    try:
        for status, healthy in ((200, True), (503, False)):
            _Health.status = status
            rc = subprocess.run(argv, capture_output=True, timeout=30, env={**env, "RANKER_PORT": str(port)}).returncode
            assert (rc == 0) == healthy, (status, rc)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ docker-compose


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for a compose service's volumes (short or long syntax)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        out[target] = source
    return out


def test_compose_stack() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"ranker", "prometheus", "grafana"}
    ranker = services["ranker"]
    context = (DEPLOY / ranker["build"]["context"]).resolve()
    assert context == REPO and (context / ranker["build"].get("dockerfile", "Dockerfile")).is_file()
    assert f"{PORT}:{PORT}" in [str(p) for p in ranker["ports"]]
    bundle = ranker["environment"]["RANKER_BUNDLE"]
    assert bundle in _mounts(ranker), "RANKER_BUNDLE must point at the mounted bundle"
    # third-party images are pinned to a version
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), image
    # prometheus reads this repo's config and rules
    prom_mounts = _mounts(services["prometheus"])
    config_flag = next(
        a for a in services["prometheus"]["command"] if a.startswith("--config.file=")
    )
    config_in_container = Path(config_flag.split("=", 1)[1])
    host_dir = (DEPLOY / prom_mounts[str(config_in_container.parent)]).resolve()
    assert host_dir == PROMETHEUS_DIR and (host_dir / config_in_container.name).is_file()
    # grafana provisioning and dashboards come from deploy/grafana
    graf_mounts = _mounts(services["grafana"])
    assert (
        DEPLOY / graf_mounts["/etc/grafana/provisioning"]
    ).resolve() == DEPLOY / "grafana" / "provisioning"
    providers = [p for f in DASHBOARD_PROVIDERS.glob("*.yml") for p in _yaml(f)["providers"]]
    assert providers
    for p in providers:
        target = p["options"]["path"]
        assert (DEPLOY / graf_mounts[target]).resolve() == DASHBOARD.parent
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home == f"{providers[0]['options']['path']}/{DASHBOARD.name}"


def _provisioned_datasource() -> dict[str, Any]:
    sources = [d for f in DATASOURCES.glob("*.yml") for d in _yaml(f)["datasources"]]
    prom = [d for d in sources if d["type"] == "prometheus"]
    assert len(prom) == 1
    return prom[0]


def test_grafana_datasource_points_at_compose_prometheus() -> None:
    ds = _provisioned_datasource()
    assert ds["uid"] and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in _yaml(COMPOSE)["services"]


# ------------------------------------------------------------------ Kubernetes


def _k8s(name: str) -> dict[str, Any]:
    return _yaml(K8S / name)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_k8s_deployment(name: str, docker_commands: tuple[Any, ...]) -> None:
    dep = _k8s(name)
    assert dep["kind"] == "Deployment"
    template = dep["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    notes = template["metadata"]["annotations"]
    assert notes == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }
    c = _container(dep)
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    assert c["readinessProbe"]["httpGet"]["path"] == READY
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTH
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in c:
            assert _resolve_port(c, c[probe]["httpGet"]["port"]) == PORT
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["RANKER_BUNDLE"] == mounts["bundle"]
    assert "bundle" in {v["name"] for v in template["spec"]["volumes"]}
    # the pod's user is the image's user
    image_user = [c.value[0] for c in _final_stage(docker_commands) if c.cmd == "USER"][-1]
    assert str(template["spec"]["securityContext"]["runAsUser"]) == image_user.split(":")[0]
    # host-side threads fit the CPU limit, whatever CPU count the node reports
    s = ServingSettings.from_env(env)
    assert s.torch_threads is not None and s.workers * s.concurrency * s.intra_op_threads <= int(c["resources"]["limits"]["cpu"])
    # the bodies waiting for a request thread (each up to max_body_bytes) fit in half the memory
    # limit, the rest left to the model copies: past the limit the pod is OOM-killed, not shedding
    memory = c["resources"]["limits"]["memory"]
    limit = int(memory[:-2]) * {"Mi": 2**20, "Gi": 2**30}[memory[-2:]]
    assert s.workers * s.max_queue * s.max_body_bytes <= limit // 2, (s.max_queue, memory)
    # secrets come from a Secret, never inline
    secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert set(secret) == {"RANKER_FEEDBACK_TOKEN"} and secret["RANKER_FEEDBACK_TOKEN"]["name"] == "ranker-feedback"
    assert template["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # the pod leaves the Service's endpoints before the server closes its port
    wait = c["lifecycle"]["preStop"]["exec"]["command"]
    assert wait[0] == "sleep" and 0 < int(wait[1]) < template["spec"]["terminationGracePeriodSeconds"] - 5


def test_k8s_cpu_deployment_runs_a_worker_per_cpu() -> None:
    """The CPU pods run one worker process per CPU of their limit (settings the server accepts),
    with a writable /tmp for the workers' metric files under a read-only root."""
    c = _container(_k8s("deployment.yaml"))
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    s = ServingSettings.from_env(env)
    assert s.workers == int(c["resources"]["limits"]["cpu"]) > 1
    # one request per worker and one torch thread each, whatever CPU count the node reports
    assert s.concurrency == 1 and s.torch_threads == 1 and s.intra_op_threads == 1
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["tmp"] == "/tmp"


def test_k8s_gpu_and_cpu_differ_only_where_they_should() -> None:
    cpu, gpu = _container(_k8s("deployment.yaml")), _container(_k8s("deployment-gpu.yaml"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device cuda" in " ".join(gpu.get("args", []))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert "cuda" not in " ".join(cpu.get("args", []) + cpu.get("command", []))
    # two deployments must not claim each other's pods
    sel = [
        _k8s(n)["spec"]["selector"]["matchLabels"]
        for n in ("deployment.yaml", "deployment-gpu.yaml")
    ]
    assert sel[0] != sel[1]


def test_k8s_service_reaches_both_deployments() -> None:
    svc = _k8s("service.yaml")
    assert svc["kind"] == "Service"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        dep = _k8s(name)
        assert (
            svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
        assert _resolve_port(_container(dep), port["targetPort"]) == PORT


# ------------------------------------------------------------------ Grafana dashboard


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    (task_var,) = [v for v in dash["templating"]["list"] if v["name"] == "task"]
    q = task_var["query"]
    assert (
        q["query"] if isinstance(q, dict) else q
    ) == "label_values(ranker_task_requests_total, task)"
    assert task_var["multi"] and task_var["includeAll"]
    # per-task panels: a row repeated by task, and every query below it filters on $task
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    repeated = [
        i for i, p in enumerate(dash["panels"]) if p["type"] == "row" and p.get("repeat") == "task"
    ]
    assert len(repeated) == 1 and len(rows) >= 2
    per_task = dash["panels"][repeated[0] + 1 :]
    assert len(per_task) >= 5
    for panel in per_task:
        assert panel["type"] != "row"
        for t in panel["targets"]:
            assert "$task" in t["expr"], (panel["title"], t["expr"])
    # the PSI panel draws the alert thresholds
    (psi,) = [p for p in per_task if "PSI" in p["title"]]
    steps = [s["value"] for s in psi["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 0.1, 0.25]
    assert psi["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
    # model versions as annotations
    exprs = [a.get("expr", "") for a in dash["annotations"]["list"]]
    assert any("ranker_model_info" in e for e in exprs)
    ids = [p["id"] for p in iter_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_every_panel_has_targets() -> None:
    for panel in iter_panels(load_dashboard()["panels"]):
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
            assert all(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]


def _datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for v in node.values():
            yield from _datasource_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _datasource_refs(v)


def test_dashboard_datasource_uid_matches_provisioning() -> None:
    uid = _provisioned_datasource()["uid"]
    refs = [r for r in _datasource_refs(load_dashboard()) if r.get("type") != "grafana"]
    assert refs and all(r == {"type": "prometheus", "uid": uid} for r in refs), {
        str(r) for r in refs
    }


def test_dashboard_queries_use_only_the_contract() -> None:
    allowed = CONTRACT_SERIES | recorded_names()
    used: set[str] = set()
    for q in dashboard_queries(task="ctr"):
        names = metric_names(q.expr)
        assert names, f"{q.panel} {q.ref}: selects no metric"
        assert names <= allowed, f"{q.panel} {q.ref}: unknown {names - allowed}"
        used |= names
    # and the dashboard shows every metric the server exposes, directly or through a
    # recording rule it plots
    histograms = {n.rsplit("_", 1)[0] for n in CONTRACT_SERIES if n.endswith("_bucket")}
    used = source_series(used)
    shown = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    contract = {
        n for n in CONTRACT_SERIES if not n.endswith(("_bucket", "_sum", "_count"))
    } | histograms
    assert contract <= shown, contract - shown


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule expressions with the real PromQL parser
    rules = [
        {"record": f"dashboard:q{i}", "expr": q.expr}
        for i, q in enumerate(dashboard_queries(task="ctr"))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _promtool("check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ a real Prometheus


def test_start_prometheus_scrapes_itself_and_loads_the_rules(tmp_path: Path) -> None:
    port = free_port()
    with start_prometheus(f"127.0.0.1:{port}", tmp_path, port=port) as prom:
        (up,) = wait_for_data(prom.url, 'up{job="ranker"} == 1')
        assert up["metric"]["instance"] == f"127.0.0.1:{port}"
        expected = recorded_names() | set(_alerts())
        rules: dict[str, Any] = {}
        for _ in range(60):  # every rule evaluated without error, after the first scrape
            groups = api_get(prom.url, "/api/v1/rules")["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            healthy = all(r["health"] == "ok" for r in rules.values())
            if healthy and rules.get("RankerTargetsMissing", {}).get("state") == "inactive":
                break
            time.sleep(0.25)
        assert set(rules) == expected
        assert all(r["health"] == "ok" for r in rules.values()), [
            r for r in rules.values() if r["health"] != "ok"
        ]
        # a target exists, so the no-target alert clears
        assert rules["RankerTargetsMissing"]["state"] == "inactive"


# A stand-in for `ranker serve`'s /metrics: the contract with known proportions. Every
# scrape advances the counters by one "minute" of traffic, so shares are exact.
FAKE_REFERENCE = {"ctr": (0.1, 0.2, 0.3, 0.4), "cvr": (0.25, 0.25, 0.25, 0.25)}
FAKE_BIN_RATE = {"ctr": (400, 400, 400, 800), "cvr": (500, 500, 1000, 0)}  # past the drift alerts' 1,000 items an hour from the first scrapes
# feedback a scrape, per task: labelled events by label and reference bin, sums of scores and
# log loss, as a replica serving model version v1 would count them
FAKE_POSITIVES, FAKE_NEGATIVES = (1, 2, 3, 4), (4, 3, 2, 1)
FAKE_SCORE_SUM, FAKE_LOGLOSS_SUM = 10.5, 12.0


def _psi(observed: tuple[int, ...], reference: tuple[float, ...], floor: float = 1e-4) -> float:
    total = sum(observed)
    p = [max(o / total, floor) for o in observed]
    q = [max(r, floor) for r in reference]
    return sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True))


class _FakeRanker:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self.lock:
            self.n += 1
            n = self.n
        tasks = list(FAKE_REFERENCE)

        def counter(name: str, labels: list[str], rows: list[tuple[list[str], float]]) -> Any:
            m = CounterMetricFamily(name, name, labels=labels)
            for values, v in rows:
                m.add_metric(values, v)
            return m

        def gauge(name: str, labels: list[str], rows: list[tuple[list[str], float]]) -> Any:
            m = GaugeMetricFamily(name, name, labels=labels)
            for values, v in rows:
                m.add_metric(values, v)
            return m

        def histogram(
            name: str, labels: list[str], rows: list[list[str]], edges: tuple[float, ...]
        ) -> Any:
            m = HistogramMetricFamily(name, name, labels=labels)
            for values in rows:  # n observations a scrape, spread over the buckets
                cum = [(str(e), n * (i + 1)) for i, e in enumerate(edges)] + [
                    ("+Inf", n * len(edges))
                ]
                m.add_metric(values, buckets=cum, sum_value=0.4 * n * len(edges))
            return m

        yield counter(
            "ranker_requests_total",
            ["status"],
            [(["2xx"], 95 * n), (["4xx"], 3 * n), (["5xx"], 2 * n), (["client_closed"], n)],
        )
        yield histogram("ranker_request_duration_seconds", [], [[]], (0.01, 0.05, 0.25))
        yield histogram("ranker_encoder_duration_seconds", [], [[]], (0.005, 0.01))
        yield histogram(
            "ranker_request_stage_duration_seconds",
            ["stage"],
            [["parse"], ["featurize"], ["encode"]],
            (0.0005, 0.001),
        )
        yield counter("ranker_task_requests_total", ["task"], [([t], 60 * n) for t in tasks])
        yield counter("ranker_task_items_total", ["task"], [([t], 600 * n) for t in tasks])
        yield histogram(
            "ranker_task_head_duration_seconds", ["task"], [[t] for t in tasks], (0.001, 0.01, 0.1)
        )
        yield histogram("ranker_task_score", ["task"], [[t] for t in tasks], (0.25, 0.5, 0.75))
        yield counter(
            "ranker_task_score_bin_total",
            ["task", "bin"],
            [([t, str(b)], c * n) for t in tasks for b, c in enumerate(FAKE_BIN_RATE[t])],
        )
        yield gauge(
            "ranker_task_score_reference",
            ["task", "bin"],
            [([t, str(b)], q) for t in tasks for b, q in enumerate(FAKE_REFERENCE[t])],
        )
        yield gauge("ranker_task_drift_psi", ["task"], [([t], 0.05) for t in tasks])
        yield counter("ranker_feature_missing_total", ["feature"], [(["age"], n)])
        yield counter("ranker_invalid_requests_total", ["reason"], [(["bad_type"], n)])
        yield counter("ranker_requests_shed_total", [], [([], n)])
        yield gauge("ranker_model_info", ["version", "architecture"], [(["v1", "mmoe"], 1)])
        yield gauge("ranker_ready", [], [([], 1)])
        # POST /feedback sums (binary tasks only: no RMSE series)
        tv = ["task", "model_version"]
        pos, neg = FAKE_POSITIVES, FAKE_NEGATIVES
        below = [sum(neg[:b]) for b in range(len(neg))]
        yield counter(
            "ranker_feedback_events_total",
            ["task", "outcome"],
            [([t, "accepted"], (sum(pos) + sum(neg)) * n) for t in tasks] + [([t, "bad_label"], n) for t in tasks],
        )
        yield counter("ranker_feedback_invalid_requests_total", ["reason"], [(["bad_json"], n)])
        yield counter("ranker_feedback_requests_total", ["status"], [(["2xx"], 20 * n), (["4xx"], n), (["5xx"], n), (["client_closed"], 0)])
        yield counter("ranker_feedback_labelled_total", tv, [([t, "v1"], (sum(pos) + sum(neg)) * n) for t in tasks])
        yield counter("ranker_feedback_label_total", tv, [([t, "v1"], sum(pos) * n) for t in tasks])
        yield counter("ranker_feedback_score_total", tv, [([t, "v1"], FAKE_SCORE_SUM * n) for t in tasks])
        yield counter("ranker_feedback_logloss_nats_total", tv, [([t, "v1"], FAKE_LOGLOSS_SUM * n) for t in tasks])
        yield counter(
            "ranker_feedback_score_bin_total",
            [*tv, "label", "bin"],
            [([t, "v1", y, str(b)], c * n) for t in tasks for y, cs in (("1", pos), ("0", neg)) for b, c in enumerate(cs)],
        )
        yield counter(
            "ranker_feedback_negatives_below_total",
            [*tv, "bin"],
            [([t, "v1", str(b)], c * n) for t in tasks for b, c in enumerate(below)],
        )
        yield gauge("ranker_task_validation_calibration", ["task"], [([t], 1.0) for t in tasks])
        yield gauge("ranker_task_validation_ne", ["task"], [([t], 0.9) for t in tasks])


def test_dashboard_and_rules_on_contract_metrics(tmp_path: Path) -> None:
    """Every dashboard query returns data and the PromQL PSI equals a Python PSI."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(_FakeRanker())
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with start_prometheus(f"127.0.0.1:{port}", tmp_path / "prom") as prom:
            wait_for_data(prom.url, "count(task:ranker_task_score:psi1h) == 2")
            wait_for_data(prom.url, "sum(rate(ranker_requests_total[1m])) > 0")
            wait_for_data(prom.url, 'ALERTS{alertname="RankerScoreDriftCritical"}')
            wait_for_data(prom.url, "count(task:ranker_feedback_auc:1h) == 2")
            empty = panels_without_data(prom.url, dict.fromkeys(FAKE_REFERENCE, "binary"))  # RMSE panels may be empty
            assert not empty, "queries without data:\n" + "\n".join(empty)
            psi = {
                r["metric"]["task"]: float(r["value"][1])
                for r in query(prom.url, "task:ranker_task_score:psi1h")
            }
            expected = {t: _psi(FAKE_BIN_RATE[t], FAKE_REFERENCE[t]) for t in FAKE_REFERENCE}
            assert psi == pytest.approx(expected, rel=1e-6)
            # the feedback rules give what ranker.quality computes from the same sums (one
            # target: every series is extrapolated alike, so the ratios are exact)
            sums = QualitySums("binary", [0.25, 0.5, 0.75])
            sums.count, sums.label_sum = sum(FAKE_POSITIVES) + sum(FAKE_NEGATIVES), sum(FAKE_POSITIVES)
            sums.score_sum, sums.log_loss_sum = FAKE_SCORE_SUM, FAKE_LOGLOSS_SUM
            sums.positives, sums.negatives = np.array(FAKE_POSITIVES, float), np.array(FAKE_NEGATIVES, float)
            want = sums.figures()
            for rule, key in (("calibration:ratio_1h", "calibration"), ("ne:1h", "ne"), ("auc:1h", "auc_binned")):
                got = {r["metric"]["task"]: float(r["value"][1]) for r in query(prom.url, f"task:ranker_feedback_{rule}")}
                assert got == pytest.approx({t: want[key] for t in FAKE_REFERENCE}, rel=1e-9), rule
            # cvr (PSI 2.13) is already pending as critical; ctr (0.11) only as a warning
            alerts = api_get(prom.url, "/api/v1/alerts")["alerts"]
            pending = {(a["labels"]["alertname"], a["labels"].get("task")) for a in alerts}
            assert ("RankerScoreDriftCritical", "cvr") in pending
            assert ("RankerScoreDriftWarning", "ctr") in pending
            assert ("RankerScoreDriftCritical", "ctr") not in pending
    finally:
        server.shutdown()
        server.server_close()
