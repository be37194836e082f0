"""Helpers for tests that use the real Prometheus tools and the deploy/ files.

- ``require_tool`` finds ``promtool`` / ``prometheus``: missing under CI (env ``CI`` set) is a
  test failure, missing on a developer machine a loud skip.
- ``dashboard_queries`` pulls every PromQL expression out of the Grafana dashboard with the
  Grafana variables filled in, ready to send to a Prometheus.
- ``start_prometheus`` runs a real ``prometheus`` on a free loopback port that scrapes one
  target every second and evaluates deploy/prometheus/rules every second; ``query`` and
  ``wait_for_data`` ask it questions over HTTP.

Example (a test with a server on 127.0.0.1:8000; `from tests.promhelpers import ...`)::

    with start_prometheus("127.0.0.1:8000", tmp_path) as prom:
        wait_for_data(prom.url, 'up{job="ranker"} == 1')
        for q in dashboard_queries(task="ctr"):
            assert query(prom.url, q.expr), q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ranker.json"

# The metric contract of the server's /metrics: dashboards and rules may use only these.
CONTRACT_COUNTERS = (
    "ranker_requests_total",
    "ranker_task_requests_total",
    "ranker_task_items_total",
    "ranker_task_score_bin_total",
    "ranker_feature_missing_total",
    "ranker_invalid_requests_total",
    "ranker_requests_shed_total",
    # POST /feedback: delayed labels of served scores (ranker/serving/feedback.py)
    "ranker_feedback_events_total",
    "ranker_feedback_invalid_requests_total",
    "ranker_feedback_requests_total",
    "ranker_feedback_labelled_total",
    "ranker_feedback_label_total",
    "ranker_feedback_score_total",
    "ranker_feedback_logloss_nats_total",
    "ranker_feedback_squared_error_total",
    "ranker_feedback_score_bin_total",
    "ranker_feedback_negatives_below_total",
)
CONTRACT_HISTOGRAMS = (
    "ranker_request_duration_seconds",
    "ranker_encoder_duration_seconds",
    "ranker_task_head_duration_seconds",
    "ranker_task_score",
    "ranker_request_stage_duration_seconds",  # beyond the list: parse/featurize/encode
)
CONTRACT_GAUGES = (
    "ranker_task_score_reference",
    "ranker_task_drift_psi",
    "ranker_model_info",
    "ranker_ready",
    "ranker_task_validation_calibration",
    "ranker_task_validation_ne",
    "ranker_task_validation_rmse",
)
# the label names of each contract metric (histograms: of the base name; _bucket adds le), as
# the server exports them (tests/test_serving.py checks a real /metrics against this table)
_TV = ("task", "model_version")
CONTRACT_LABELS: dict[str, tuple[str, ...]] = {
    "ranker_requests_total": ("status",),
    "ranker_task_requests_total": ("task",),
    "ranker_task_items_total": ("task",),
    "ranker_task_score_bin_total": ("task", "bin"),
    "ranker_feature_missing_total": ("feature",),
    "ranker_invalid_requests_total": ("reason",),
    "ranker_requests_shed_total": (),
    "ranker_feedback_events_total": ("task", "outcome"),
    "ranker_feedback_invalid_requests_total": ("reason",),
    "ranker_feedback_requests_total": ("status",),
    "ranker_feedback_labelled_total": _TV,
    "ranker_feedback_label_total": _TV,
    "ranker_feedback_score_total": _TV,
    "ranker_feedback_logloss_nats_total": _TV,
    "ranker_feedback_squared_error_total": _TV,
    "ranker_feedback_score_bin_total": (*_TV, "label", "bin"),
    "ranker_feedback_negatives_below_total": (*_TV, "bin"),
    "ranker_request_duration_seconds": (),
    "ranker_encoder_duration_seconds": (),
    "ranker_task_head_duration_seconds": ("task",),
    "ranker_task_score": ("task",),
    "ranker_request_stage_duration_seconds": ("stage",),
    "ranker_task_score_reference": ("task", "bin"),
    "ranker_task_drift_psi": ("task",),
    "ranker_model_info": ("version", "architecture"),
    "ranker_ready": (),
    "ranker_task_validation_calibration": ("task",),
    "ranker_task_validation_ne": ("task",),
    "ranker_task_validation_rmse": ("task",),
}
TARGET_LABELS = frozenset({"job", "instance"})  # what Prometheus adds to every scraped series
# series only binary tasks have, and only regression tasks have: a dashboard query selecting
# them may be empty for a task of the other type
BINARY_ONLY = frozenset(
    {"ranker_feedback_logloss_nats_total", "ranker_feedback_score_bin_total", "ranker_feedback_negatives_below_total",
     "ranker_task_validation_calibration", "ranker_task_validation_ne"}
)  # fmt: skip
REGRESSION_ONLY = frozenset({"ranker_feedback_squared_error_total", "ranker_task_validation_rmse"})
# every series name a query may select: histograms as their _bucket/_sum/_count series
CONTRACT_SERIES = frozenset(
    [*CONTRACT_COUNTERS, *CONTRACT_GAUGES]
    + [f"{h}{suffix}" for h in CONTRACT_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_dependency(what: str, install: str) -> None:
    """Fail under CI, skip loudly elsewhere: CI must never pass by skipping the check."""
    msg = f"{what} is not available; install it with: {install}"
    if _ci():
        pytest.fail(f"{msg} (CI is set: CI must install it, see .ci/run)", pytrace=False)
    # a skip reason is hidden by `pytest -q`; a warning shows in the summary
    warnings.warn(f"SKIPPED deploy check: {msg}", stacklevel=2)
    pytest.skip(f"!!! {msg} !!!")


def require_tool(name: str) -> str:
    """The path of a Prometheus binary (``promtool``, ``prometheus``) on PATH."""
    path = shutil.which(name)
    if path is None:
        missing_dependency(f"`{name}`", "apt-get install -y prometheus")
    return str(path)


# ---------------------------------------------------------------- PromQL text


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    "and or unless bool offset by without on ignoring group_left group_right inf nan".split()
)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a lexer, not a parser: promtool checks syntax)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = _LABEL_LIST.sub(" ", s)  # by (...), on (...), group_left (...)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        tok, start, rest = m.group(), m.start(), s[m.end() :].lstrip()
        if start and (s[start - 1].isdigit() or s[start - 1] == "."):
            continue  # the exponent of a number such as 1e-4
        if rest.startswith("(") or tok.lower() in _KEYWORDS:
            continue  # a function, an aggregation or a keyword
        names.add(tok)
    return names


def series_labels(name: str) -> frozenset[str]:
    """The label names a series can carry: a contract series' own and the target's; a recorded
    series', by the naming convention, its level (``task_bin:...`` -> task, bin) and the target's
    (a level's labels are all it keeps, or fewer: ``job`` itself is a target label)."""
    if name == "up":
        return TARGET_LABELS
    if ":" in name:
        return frozenset(name.split(":")[0].split("_")) | TARGET_LABELS
    base = name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in CONTRACT_LABELS:
            base = name.removesuffix(suffix)
    extra = {"le"} if name.endswith("_bucket") else set()
    return frozenset(CONTRACT_LABELS[base]) | extra | TARGET_LABELS


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def selector_labels(expr: str) -> set[tuple[str, str]]:
    """(metric, label) of every label matcher in ``expr`` (``x{task="a"}`` -> ("x", "task"))."""
    s = _STRING.sub('""', expr)
    return {(m[1], lab) for m in _SELECTOR.finditer(s) for lab in _MATCHER.findall(m[2])}


def grouping_labels(expr: str) -> set[str]:
    """Label names in the ``by``/``without``/``on``/``ignoring``/``group_*`` lists of ``expr``."""
    s = _STRING.sub('""', expr)
    return {lab.strip() for m in _LABEL_LIST.finditer(s) for lab in m.group()[m.group().index("(") + 1 : -1].split(",") if lab.strip()}


def rule_groups(path: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["groups"]


def recorded_names(rules_dir: Path = RULES_DIR) -> set[str]:
    """Every series name written by a recording rule under ``rules_dir``."""
    return {
        rule["record"]
        for path in sorted(rules_dir.glob("*.yml"))
        for group in rule_groups(path)
        for rule in group["rules"]
        if "record" in rule
    }


def source_series(names: set[str], rules_dir: Path = RULES_DIR) -> set[str]:
    """``names`` with every recording rule among them replaced, recursively, by the series
    its expression reads: what a query rests on in the server's /metrics."""
    exprs = {
        rule["record"]: rule["expr"]
        for path in sorted(rules_dir.glob("*.yml"))
        for group in rule_groups(path)
        for rule in group["rules"]
        if "record" in rule
    }
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in exprs:
            todo += [n for n in metric_names(exprs.pop(name))]
        else:
            out.add(name)
    return out


def applies_to(expr: str, task_type: str) -> bool:
    """False when ``expr`` rests on series only the other task type has (so it may be empty
    for a task of ``task_type``: NE of a regression task, RMSE of a binary one)."""
    other = REGRESSION_ONLY if task_type == "binary" else BINARY_ONLY
    return not source_series(metric_names(expr)) & other


# ---------------------------------------------------------------- dashboard


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # panel title, or "annotation: NAME"
    ref: str  # the target's refId
    expr: str  # PromQL with the Grafana variables filled in
    instant: bool


_GRAFANA_INTERVALS = re.compile(
    r"\$\{(__rate_interval|__interval|__range)\}|\$(__rate_interval|__interval|__range)\b"
)


def fill_variables(expr: str, task: str, interval: str = "1m") -> str:
    """Substitute what Grafana would: ``$task`` and the interval variables."""
    out = _GRAFANA_INTERVALS.sub(interval, expr)
    out = re.sub(r"\$\{task(?::[a-z]+)?\}|\$task\b|\[\[task\]\]", task, out)
    if "$" in out or "[[" in out:
        raise ValueError(f"unknown Grafana variable left in {out!r}")
    return out


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def dashboard_queries(
    task: str, interval: str = "1m", path: Path = DASHBOARD, annotations: bool = True
) -> list[PanelQuery]:
    """Every PromQL expression of the dashboard's panels (and annotations), filled in."""
    dash = load_dashboard(path)
    out = []
    for panel in iter_panels(dash["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(
                    PanelQuery(
                        panel=panel.get("title", "?").replace("$task", task),
                        ref=target.get("refId", "?"),
                        expr=fill_variables(target["expr"], task, interval),
                        instant=bool(target.get("instant")) and not target.get("range", False),
                    )
                )
    if annotations:
        for ann in dash.get("annotations", {}).get("list", []):
            if ann.get("expr"):
                out.append(
                    PanelQuery(
                        f"annotation: {ann['name']}",
                        "-",
                        fill_variables(ann["expr"], task, interval),
                        False,
                    )
                )
    return out


# ---------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningPrometheus:
    url: str  # e.g. http://127.0.0.1:40123
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RunningPrometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(
    workdir: Path,
    target: str | list[str],
    *,
    job: str = "ranker",
    metrics_path: str = "/metrics",
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    rule_files: list[Path] | None = None,
) -> Path:
    """A prometheus.yml scraping ``target`` (host:port, or a list of them) and loading the
    project's rules. The rules are loaded from copies in ``workdir`` without the groups' own
    ``interval`` (the 24h quality group runs once a minute in production): every group then runs
    at ``evaluation_interval``, so a test sees each recorded series within seconds. The promtool
    unit tests read the files themselves, intervals included."""
    rules = rule_files if rule_files is not None else sorted(RULES_DIR.glob("*.yml"))
    copies = []
    for i, src in enumerate(rules):
        doc = yaml.safe_load(src.read_text())
        for group in doc.get("groups") or []:
            group.pop("interval", None)
        copies.append(workdir / f"rules-{i}-{src.name}")
        copies[-1].write_text(yaml.safe_dump(doc, sort_keys=False))
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(p.resolve()) for p in copies],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": metrics_path,
                "static_configs": [{"targets": [target] if isinstance(target, str) else list(target)}],
            }
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(
    target: str | list[str],
    workdir: Path,
    *,
    port: int | None = None,
    job: str = "ranker",
    metrics_path: str = "/metrics",
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    rule_files: list[Path] | None = None,
    timeout: float = 30.0,
) -> RunningPrometheus:
    """Start ``prometheus`` in ``workdir`` and return once it answers /-/ready.

    ``target`` is the host:port (or a list of them) to scrape as job ``job``; pass ``port`` to choose the
    listen port (e.g. to let Prometheus scrape itself). Use as a context manager or call
    ``stop()``.
    """
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir,
        target,
        job=job,
        metrics_path=metrics_path,
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
        rule_files=rule_files,
    )
    port = port or free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    log.close()
    prom = RunningPrometheus(f"http://127.0.0.1:{port}", proc, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{prom.log[-3000:]}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return prom
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    prom.stop()
    raise TimeoutError(f"prometheus not ready after {timeout}s:\n{prom.log[-3000:]}")


def api_get(base_url: str, path: str, params: dict[str, str] | None = None) -> Any:
    """GET a Prometheus HTTP API path; returns ``data`` or raises with Prometheus's error."""
    url = f"{base_url}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error as JSON
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query: the list of ``{"metric": {...}, "value": [t, "v"]}`` results."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api_get(base_url, "/api/v1/query", params)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def wait_for_data(base_url: str, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll ``expr`` until it returns at least one series."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(base_url, expr)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no data for {expr!r} after {timeout}s")
        time.sleep(0.5)


def panels_without_data(base_url: str, task_types: dict[str, str], timeout: float = 30.0) -> list[str]:
    """The dashboard queries (for each task, those that apply to its type) still returning no
    series after up to ``timeout`` seconds of polling; empty once every one has data. Rule
    groups run at their own phase within the evaluation interval, so one group's series can lag
    another's by an evaluation: a single look right after waiting for one series may miss one."""
    deadline = time.monotonic() + timeout
    while True:
        empty = [
            f"{q.panel} / {q.ref}: {q.expr}"
            for task, ttype in task_types.items()
            for q in dashboard_queries(task=task)
            if applies_to(q.expr, ttype) and not query(base_url, q.expr)
        ]
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(1)
