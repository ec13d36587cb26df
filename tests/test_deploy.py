"""The deployment files (Dockerfile, deploy/): what can be checked without Docker, Prometheus or Grafana.

The dashboard's PromQL must name only metrics the server exposes (as `Metrics().render()` writes them), with
their own labels, and cover every metric family; the compose file, the Prometheus config and the Grafana
provisioning must agree with one another and name files that exist; the image's ENTRYPOINT must be a valid
`deltaserve serve` command line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from serving.cli import build_parser
from serving.cluster.metrics import REPLICA_LABEL
from serving.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "deltaserve.json"
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time


def load_yaml(path: Path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


# ---- metrics as exposed ----------------------------------------------------------------------------------
def exposed_metrics() -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(exposed sample name -> family, family -> type, family -> label names), from the rendered text.

    Families with labels and no child yet render only their # HELP/# TYPE lines, so names are derived from those.
    """
    metrics = Metrics()
    text = metrics.render().decode()
    kinds: dict[str, str] = {}
    for name, kind in re.findall(r"^# TYPE (deltaserve_\w+) (\w+)$", text, re.M):
        family = name.removesuffix("_total") if kind == "counter" else name
        kinds[family] = kind
    for family in [f for f in kinds if f.endswith("_created") and f.removesuffix("_created") in kinds]:
        del kinds[family]  # creation timestamps of counters and histograms, not families of their own
    names: dict[str, str] = {}
    for family, kind in kinds.items():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(kind, ("",))
        for suffix in suffixes:
            names[family + suffix] = family
    for sample in re.findall(r"^(deltaserve_\w+)[{ ]", text, re.M):  # every sample line names a known family
        assert any(sample == f or sample == f + s for f in kinds for s in SUFFIXES), sample
    labels = {family: set() for family in kinds}
    for collector in vars(metrics).values():
        name = getattr(collector, "_name", None)
        if name in labels:
            labels[name] = set(getattr(collector, "_labelnames", ()))
    for collector in vars(metrics.engine).values():  # the engine's, which a cluster's ingress labels per replica
        name = getattr(collector, "_name", None)
        if name in labels:
            labels[name] = set(getattr(collector, "_labelnames", ())) | {REPLICA_LABEL}
    assert labels["deltaserve_requests"] == {"route", "status", "model_kind"}, "label names not found"
    return names, kinds, labels


def dashboard_targets() -> list[tuple[str, dict]]:
    """(panel title, target) for every query of the dashboard, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", ""), t))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


# ---- dashboard -------------------------------------------------------------------------------------------
def test_dashboard_is_a_grafana_dashboard():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    datasource_uid = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]["uid"]
    assert variables["datasource"]["current"]["value"] == datasource_uid
    for title, t in dashboard_targets():
        assert t["datasource"]["uid"] in ("${datasource}", datasource_uid), title


def test_dashboard_queries_use_exposed_metrics_and_their_labels():
    names, kinds, labels = exposed_metrics()
    targets = dashboard_targets()
    assert len(targets) >= 20
    for title, t in targets:
        expr, where = t["expr"], f"{title!r}: {t['expr']}"
        used = re.findall(r"\b(deltaserve_\w+)", expr)
        assert used, where
        unknown = [n for n in used if n not in names]
        assert not unknown, f"{where}: not exposed: {unknown} (exposed: {sorted(names)})"
        families = {names[n] for n in used}
        for name, body in re.findall(r"\b(deltaserve_\w+)\{([^}]*)\}", expr):
            keys = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
            allowed = labels[names[name]] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            assert keys <= allowed, f"{where}: {name} has no label {sorted(keys - allowed)}"
        by_labels = {lbl.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lbl in group.split(",")}
        known = set().union(*(labels[f] for f in families)) | TARGET_LABELS | {"le"}
        assert by_labels <= known, f"{where}: grouping by unknown labels {sorted(by_labels - known)}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in by_labels, where
        # labels named in the legend must survive the aggregation
        if by_labels:
            kept = by_labels
        elif re.search(r"\b(sum|max|min|avg|count|histogram_quantile)\s*\(", expr):
            kept = set()
        else:
            kept = known
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
        assert legend <= kept, f"{where}: legend uses {sorted(legend - kept)}"


def dashboard_panels() -> list[dict]:
    out = []

    def walk(panels):
        for p in panels:
            out.append(p)
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def test_idle_dashboard_says_no_traffic_rather_than_nan():
    """While idle every rate is 0: a quantile of no observations and a ratio of 0 / 0 are NaN. Each such query
    drops NaN (a comparison is false for NaN) and its panel shows a text for 'no data' instead."""
    guarded = 0
    for panel in dashboard_panels():
        for t in panel.get("targets", []):
            expr, where = t["expr"], f"{panel['title']!r}: {t['expr']}"
            if "histogram_quantile(" in expr:
                assert re.search(r"\)\s*>=\s*0$", expr), f"{where}: an idle quantile is NaN"
            for denominator in re.split(r"\s/\s", expr)[1:]:
                assert re.match(r"\(.*>\s*0\)$", denominator.strip(), re.S), f"{where}: 0 / 0 when idle"
            if "histogram_quantile(" in expr or " / " in expr:
                guarded += 1
                assert panel["fieldConfig"]["defaults"].get("noValue"), f"{panel['title']!r} shows nothing when idle"
    assert guarded >= 17


def test_dashboard_covers_every_metric_family():
    names, kinds, _ = exposed_metrics()
    used = {
        names[n] for _, t in dashboard_targets() for n in re.findall(r"\b(deltaserve_\w+)", t["expr"]) if n in names
    }
    missing = sorted(set(kinds) - used)
    assert not missing, f"metric families without a panel: {missing}"


# ---- compose, Prometheus, Grafana provisioning -----------------------------------------------------------
def compose() -> dict:
    return load_yaml(DEPLOY / "docker-compose.yml")


def bind_mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of the service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        if parts[0].startswith((".", "/")):
            out[parts[1]] = parts[0]
    return out


def secret_mounts(service: dict) -> dict[str, str]:
    """container path -> secret name of the service's compose secrets (short syntax: under /run/secrets)."""
    out = {}
    for entry in service.get("secrets", []):
        name = entry if isinstance(entry, str) else entry["source"]
        target = entry.get("target", name) if isinstance(entry, dict) else name
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = name
    return out


def test_compose_services_and_files():
    c = compose()
    services = c["services"]
    assert {"deltaserve", "prometheus", "grafana"} <= set(services)
    ds = services["deltaserve"]
    assert (DEPLOY / ds["build"]["context"] / ds["build"].get("dockerfile", "Dockerfile")).is_file()
    devices = ds["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(str(p).split(":")[-1] == "8000" for p in ds["ports"])
    assert any(str(v).endswith(":/data/registry") for v in ds["volumes"])
    if "command" in ds:
        build_parser().parse_args(["serve", *ds["command"]])
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert (DEPLOY / source).exists(), f"{name}: {source} (mounted at {target}) does not exist"
    for name, secret in c.get("secrets", {}).items():
        assert Path(secret["file"]).parts[0] not in ("..", "/"), f"secret {name} must live under deploy/"


def test_compose_variables_are_in_env_example():
    text = (DEPLOY / "docker-compose.yml").read_text()
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    variables = set(re.findall(r"\$\{(\w+)", uncommented))
    assert "DELTASERVE_ADMIN_KEY" in variables
    example = dict(
        line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert variables <= set(example), f"not in deploy/.env.example: {sorted(variables - set(example))}"
    assert all(v == "" for v in example.values()), ".env.example must not hold real secrets"


def test_prometheus_scrapes_metrics_with_the_admin_key():
    c = compose()
    prom = c["services"]["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert bind_mounts(prom)[config_path] == "./prometheus.yml"
    config = load_yaml(DEPLOY / "prometheus.yml")
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "deltaserve"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = targets[0].split(":")
    assert host in c["services"] and port == "8000"
    # the admin key: a bearer token read from the compose secret
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth
    # named relative to the config file, so that promtool checks deploy/prometheus.yml as the container runs it
    assert not auth["credentials_file"].startswith("/")
    in_container = str(Path(config_path).parent / auth["credentials_file"])
    mounted = secret_mounts(prom)
    assert in_container in mounted, f"{in_container} is not where compose mounts a secret ({sorted(mounted)})"
    assert c["secrets"][mounted[in_container]]["file"] == f"./{auth['credentials_file']}", "the same file outside"
    assert set(mounted.values()) <= set(c["secrets"])
    # the alert rules, mounted beside the config as it names them
    for rules in config["rule_files"]:
        assert bind_mounts(prom)[str(Path(config_path).parent / rules)] == f"./{rules}"


def test_grafana_provisioning():
    c = compose()
    mounts = bind_mounts(c["services"]["grafana"])
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasources[0]["type"] == "prometheus"
    assert re.match(r"https?://(\w+):9090", datasources[0]["url"]).group(1) in c["services"]
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/deltaserve.yml")["providers"][0]
    assert provider["type"] == "file"
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (DEPLOY / dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    for kind in ("datasources", "dashboards"):
        assert (DEPLOY / mounts[f"/etc/grafana/provisioning/{kind}"]).is_dir()


# ---- alert rules, and the configuration as promtool reads it ---------------------------------------------
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; scripts/setup.sh does it as root)")
    return path


def test_alert_rules_name_exposed_metrics():
    names, _, labels = exposed_metrics()
    groups = load_yaml(DEPLOY / "alerts.yml")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    expected = {"DeltaserveDown", "DeltaserveEngineDead", "DeltaserveHighErrorRatio", "DeltaserveQueueSaturated",
                "DeltaserveKVCacheNearlyFull", "DeltaserveSlowFirstToken", "DeltaserveCompressionFailures"}  # fmt: skip
    assert {r["alert"] for r in rules} == expected
    for rule in rules:
        used = re.findall(r"\b(deltaserve_\w+)", rule["expr"])
        assert all(n in names for n in used), f"{rule['alert']}: not exposed: {[n for n in used if n not in names]}"
        for name, body in re.findall(r"\b(deltaserve_\w+)\{([^}]*)\}", rule["expr"]):
            keys = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
            assert keys <= labels[names[name]] | TARGET_LABELS | {"le"}, f"{rule['alert']}: {name} {{{body}}}"
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["annotations"]["summary"]


def test_promtool_checks_the_config_as_the_readme_sets_it_up(tmp_path):
    tool = promtool()
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy, ignore=shutil.ignore_patterns("secrets"))
    run = subprocess.run([tool, "check", "config", "prometheus.yml"], cwd=deploy, capture_output=True, text=True)
    assert run.returncode != 0 and "secrets/admin_key" in run.stdout + run.stderr, "the key file is not checked"
    (deploy / "secrets").mkdir()
    (deploy / "secrets" / "admin_key").write_text("k" * 43 + "\n")  # as the README's grep | cut writes it
    run = subprocess.run([tool, "check", "config", "prometheus.yml"], cwd=deploy, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "7 rules found" in run.stdout, run.stdout  # the rule file is read through the config


def test_alert_rules_pass_their_unit_tests():
    tool = promtool()
    run = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY, capture_output=True, text=True)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "alerts_test.yml").read_text()))
    assert tested == {r["alert"] for g in load_yaml(DEPLOY / "alerts.yml")["groups"] for r in g["rules"]}


def test_readme_deploy_steps_make_the_key_readable_to_prometheus():
    """The Prometheus container runs as nobody: under a umask of 077 the key file must be chmod 644."""
    readme = (ROOT / "README.md").read_text()
    steps = readme[readme.index("cd deploy && cp .env.example .env"):]
    steps = steps[: steps.index("docker compose up")]
    assert "chmod 644 secrets/admin_key" in steps


# ---- Dockerfile ------------------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", "", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_is_a_valid_serve_command(capsys):
    instructions = dockerfile()
    entrypoint = json.loads(next(a for i, a in instructions if i == "ENTRYPOINT"))
    assert entrypoint[:2] == ["deltaserve", "serve"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    accepted = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    flags = [a for a in entrypoint if a.startswith("--")]
    assert flags and set(flags) <= accepted, f"not accepted by `deltaserve serve`: {set(flags) - accepted}"
    args = build_parser().parse_args(entrypoint[1:])
    assert args.command == "serve" and args.host == "0.0.0.0" and str(args.registry) == "/data/registry"


def test_dockerfile_image():
    instructions = dockerfile()
    args = {i: [a for j, a in instructions if j == i] for i in {i for i, _ in instructions}}
    assert "8000" in args["EXPOSE"][0].split()
    assert args["USER"] and args["USER"][-1] not in ("root", "0")
    assert "/data/registry" in args["VOLUME"][0]
    assert any("TORCH_VERSION=2.13.0" in a for a in args["ARG"])
    health = args["HEALTHCHECK"][0]
    assert "/health" in health
    cmd = json.loads(health[health.index("CMD") + 3 :])
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "HEALTHCHECK", "exec")
    # everything COPYed exists and is not excluded by .dockerignore
    ignored = {
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {".venv", ".git"} <= ignored
    for a in args["COPY"]:
        for source in a.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source not in ignored, f"{source} is COPYed but excluded by .dockerignore"
