"""The operations files shipped with the product (conf/, packaged as proxy/data):
the Prometheus alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), the systemd unit passes `systemd-analyze verify`, and
every query of the Grafana dashboard is valid PromQL naming only metrics the
proxy defines (tests/integration/test_operations.py matches them against a
running serve's /metrics too)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import data

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "conf" / "prometheus" / "mfa-proxy-rules.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "mfa-proxy-rules.test.yml"
UNIT = REPO / "conf" / "systemd" / "mfa-proxy.service"
DASHBOARD = REPO / "conf" / "grafana" / "mfa-proxy.json"
METRIC = re.compile(r"\bmfa_proxy_[a-z0-9_]+")
# Grafana's variables, as a query sees them once Grafana has filled them in
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m",
                     "$instance": ".*"}


def tool(name: str) -> str:
    """scripts/test installs it (Debian's prometheus, systemd): missing is a failure."""
    path = shutil.which(name)
    assert path, f"{name} is not installed (scripts/test installs it)"
    return path


def test_the_files_are_package_data() -> None:
    for name in data.SHIPPED:
        assert data.shipped_text(name) == (REPO / "conf" / name).read_text()


def test_promtool_checks_the_alert_rules() -> None:
    done = subprocess.run([tool("promtool"), "check", "rules", str(RULES)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_alert_rules() -> None:
    done = subprocess.run([tool("promtool"), "test", "rules", str(RULE_TESTS)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"(?m)^\s+- alert: (\w+)", RULES.read_text()))
    tested = set(re.findall(r"(?m)^\s+alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts and alerts <= tested, alerts - tested


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for key in ("User=mfa-proxy", "ExecReload=/bin/kill -HUP $MAINPID", "ProtectSystem=strict",
                "ReadWritePaths=/var/lib/mfa-proxy", "NoNewPrivileges=yes", "PrivateTmp=yes",
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"):
        assert f"\n{key}\n" in text, key
    # verify checks that ExecStart's program exists: point it at this install's
    unit = tmp_path / "mfa-proxy.service"
    here = Path(sys.executable).with_name("mfa-proxy")
    unit.write_text(text.replace("/opt/mfa-proxy/bin/mfa-proxy", str(here)))
    done = subprocess.run([tool("systemd-analyze"), "verify", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    ours = [line for line in (done.stdout + done.stderr).splitlines()
            if "mfa-proxy.service" in line]
    assert done.returncode == 0 and ours == [], done.stdout + done.stderr


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def filled(query: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        query = query.replace(name, value)
    return query


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query as a recording rule: promtool parses it."""
    exprs = [filled(q) for q in dashboard_queries() if not q.startswith("label_values(")]
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    done = subprocess.run([tool("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def exported_names(exposition: str) -> set[str]:
    """Every sample name /metrics can carry, from its # TYPE lines."""
    names: set[str] = set()
    for name, kind in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", exposition):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif kind == "counter":
            names.add(name.removesuffix("_total") + "_created")
    return names


def test_dashboard_and_rules_name_only_metrics_the_proxy_defines() -> None:
    from prometheus_client import generate_latest

    from proxy.metrics import Metrics

    exported = exported_names(generate_latest(Metrics().registry).decode())
    used = {m for q in dashboard_queries() for m in METRIC.findall(q)}
    used |= set(METRIC.findall(RULES.read_text()))
    assert used - exported == set()
    # the dashboard shows what the issue asks for
    for family in ("mfa_proxy_requests_total", "mfa_proxy_lockouts_total",
                   "mfa_proxy_directory_seconds_bucket", "mfa_proxy_directory_errors_total",
                   "mfa_proxy_radius_dropped_total", "mfa_proxy_decision_seconds_bucket",
                   "mfa_proxy_users", "mfa_proxy_users_enrollment_ending",
                   "mfa_proxy_mail_sent_total", "mfa_proxy_mail_failed_total",
                   "mfa_proxy_mail_queue"):
        assert any(family in q for q in dashboard_queries()), family


@pytest.mark.parametrize("name", data.SHIPPED)
def test_shipped_files_have_no_tabs_and_end_with_a_newline(name: str) -> None:
    text = data.shipped_text(name)
    assert text.endswith("\n") and "\t" not in text


def test_the_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    """No container engine on the test machines: the image is not built here
    (tests/integration/test_packaging.py runs its install steps in a clean venv)."""
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"(?m)^FROM ", text)
    assert len(stages) >= 2
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"(?m)^USER mfa-proxy$", final)
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert "VOLUME /var/lib/mfa-proxy" in final
    assert "gcc" not in final and "build-essential" not in final


def test_the_integration_guides_toml_snippets_parse_and_use_known_sections() -> None:
    import tomllib

    pages = sorted((REPO / "docs" / "integrations").glob("*.md"))
    assert len(pages) >= 11
    index = (REPO / "docs" / "integrations" / "README.md").read_text()
    for page in pages:
        if page.name != "README.md":
            assert f"]({page.name})" in index, page.name
        for block in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S):
            doc = tomllib.loads(block)
            if "servers" in doc:  # Grafana's own ldap.toml
                continue
            assert set(doc) <= {"radius", "ldap", "portal", "directory", "policy"}, page.name
