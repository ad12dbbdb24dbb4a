"""Deployment files, checked without a cluster: Prometheus config and alert rules (promtool, with unit
tests of the alerts), Grafana provisioning and dashboard JSON (structure, variables, and that every
metric a query names is one diffrl or Ray exports), every Kubernetes manifest against its schema
(kubernetes-validate's for core kinds, deploy/k8s/schemas for KubeRay and PodMonitor), the RayService's
Serve config against Ray Serve's schema, the Ray cluster launcher config against Ray's, and the
recipes and commands the manifests run against diffrl's own config loaders."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMTOOL = shutil.which("promtool")
K8S_VERSION = "1.30.0"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus; "
                                    "make test installs it when run as root)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60,
                          check=False)


# --------------------------------------------------------------------------------- Prometheus
@needs_promtool
def test_prometheus_config_and_rules_are_valid():
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_rules_unit_tests_pass():
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    rules = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts_test.yml").read_text()))
    assert {"DiffrlLearnerStuck", "DiffrlRewardServerErrors", "DiffrlBacklogGrowing"} <= tested <= rules


# --------------------------------------------------------------------------------- Grafana
def exported_metric_names() -> set[str]:
    """Every metric name constant of diffrl's metric modules (histograms also as _bucket/_sum/_count)."""
    names = set()
    for module in ("learner/metrics.py", "actors/metrics.py", "reward_servers/metrics.py", "diffrl/monitoring.py"):
        for node in ast.walk(ast.parse((REPO / module).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"diffrl_[a-z0-9_]+", node.value):
                names |= {node.value, *(node.value + s for s in ("_bucket", "_sum", "_count"))}
    from diffrl.learner.algorithms.base import registry

    names |= {name for alg in registry().values() for name, _ in alg.gauges.values()}  # algorithms' own
    return names


def dashboards() -> list[tuple[Path, dict]]:
    paths = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert paths
    return [(p, json.loads(p.read_text())) for p in paths]


def test_dashboards_are_well_formed_and_query_only_exported_metrics():
    known = exported_metric_names()
    for path, dash in dashboards():
        assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids, cells = set(), []
        for panel in dash["panels"]:
            assert panel["id"] not in ids, f"{path.name}: duplicate panel id {panel['id']}"
            ids.add(panel["id"])
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
            cells += [(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                expr = target["expr"]
                for var in re.findall(r"\$(\w+)", expr):
                    assert var in variables or var.startswith("__"), f"{panel['title']}: undefined ${var}"
                for name in re.findall(r"\b(diffrl_[a-z0-9_]+)", expr):
                    assert name in known, f"{panel['title']}: {name} is not a metric diffrl exports"
        assert len(cells) == len(set(cells)), f"{path.name}: panels overlap"


def test_grafana_provisioning_matches_prometheus_and_dashboards():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # $__rate_interval is 4 x timeInterval: it must be the scrape interval
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    dash = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "diffrl.yml").read_text())
    (provider,) = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# --------------------------------------------------------------------------------- Kubernetes
def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(f"{path.name}: {d['kind']}/{d['metadata']['name']}", d)
                 for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def crd_validators():
    """jsonschema validators of deploy/k8s/schemas, resolving $refs into kubernetes-validate's definitions."""
    import jsonschema
    from referencing import Registry, Resource

    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    version = max(v for v in kv.utils.all_versions() if kv.utils.major_minor(v) <= kv.utils.major_minor(K8S_VERSION))
    defs = kv.utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(defs) @ Registry()
    validators = {}
    for path in (DEPLOY / "k8s" / "schemas").glob("*.json"):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        props = schema["properties"]
        key = (props["apiVersion"]["const"], props["kind"]["const"])
        validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


def test_every_kubernetes_manifest_validates_against_its_schema(crd_validators):
    kv = pytest.importorskip("kubernetes_validate")
    kinds = set()
    for where, doc in manifests():
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in crd_validators:
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validators[key].iter_errors(doc)]
            assert not errors, f"{where}:\n" + "\n".join(errors)
        else:
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except kv.ValidationError as err:
                raise AssertionError(f"{where}: {err}") from None
    assert {"RayJob", "RayService", "PodMonitor", "StatefulSet", "Deployment", "HorizontalPodAutoscaler",
            "Service"} <= kinds


def test_crd_schemas_reject_what_kuberay_would(crd_validators):
    """The CRD subsets are strict where they model: a typo, a wrong type, a bad pod template fail."""
    (job,) = [d for _, d in manifests() if d["kind"] == "RayJob"]
    validate = crd_validators[("ray.io/v1", "RayJob")]
    assert validate.is_valid(job)
    bad = json.loads(json.dumps(job))
    bad["spec"]["shutdownAfterJobFinish"] = True
    assert not validate.is_valid(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["submissionMode"] = "HttpMode"
    assert not validate.is_valid(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert not validate.is_valid(bad)


def test_manifests_run_valid_diffrl_commands_and_recipes(monkeypatch):
    """The RayJob's entrypoint recipe loads as a TrainConfig whose metrics ports are the ports the pods
    declare; reward Deployments' commands parse and load through `diffrl reward serve`'s config."""
    import diffrl.reward_servers.cli
    from diffrl.cli import build_parser
    from diffrl.config import load_config
    from diffrl.schema import TrainConfig

    docs = {where: d for where, d in manifests()}
    (job,) = [d for d in docs.values() if d["kind"] == "RayJob"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["diffrl", "train"] and "ray.address=auto" in entry
    recipe = entry[2].replace("/home/ray/diffrl/", "")
    cfg = load_config(TrainConfig, REPO / recipe, [e for e in entry[3:]])
    ports = {p["name"]: p["containerPort"]
             for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
             for c in g["template"]["spec"]["containers"] for p in c["ports"]}
    assert ports["learner-metrics"] == cfg.placement.metrics_port and ports["sampler-metrics"] == cfg.sampler.metrics_port
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["DIFFRL_METRICS_HOST"] == "0.0.0.0"

    served = []
    monkeypatch.setattr(diffrl.reward_servers.cli, "serve", lambda name, cfg, *a, **k: served.append((name, cfg)) or 0)
    deployments = [d for d in docs.values() if d["kind"] == "Deployment"]
    for dep in deployments:
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        assert command[0] == "diffrl"
        args = build_parser().parse_args(command[1:])
        assert args.func(args) == 0
        serve_cfg = served[-1][1]
        assert serve_cfg.host == "0.0.0.0" and serve_cfg.port == container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    rewards = {name for name, _ in served}
    assert {r.name for r in cfg.rewards} <= rewards
    hpa_targets = {d["spec"]["scaleTargetRef"]["name"] for d in docs.values() if d["kind"] == "HorizontalPodAutoscaler"}
    assert hpa_targets == {d["metadata"]["name"] for d in deployments}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic v1-style fields inside ray.serve
def test_rayservice_serve_config_matches_ray_serve_schema():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    from diffrl.config import load_config
    from diffrl.reward_servers.cli import serve_schema
    from diffrl.reward_servers.serve import dict_to_overrides

    (svc,) = [d for _, d in manifests() if d["kind"] == "RayService"]
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.model_validate(serve_cfg)
    assert [a.name for a in parsed.applications] == ["shapes", "ocr"]
    def fields(model) -> set[str]:  # pydantic ignores unknown keys: check them here
        return set(model.model_fields)

    assert set(serve_cfg) <= fields(ServeDeploySchema)
    for app in serve_cfg["applications"]:
        assert set(app) <= fields(ServeApplicationSchema), app["name"]
        for dep in app["deployments"]:
            assert set(dep) <= fields(DeploymentSchema), dep["name"]
            assert set(dep["autoscaling_config"]) <= fields(AutoscalingConfig), dep["name"]
        args = dict(app["args"])
        name = args.pop("name")
        load_config(serve_schema(name), None, dict_to_overrides(args))  # the replica's own config check


# --------------------------------------------------------------------------------- Ray
def test_ray_cluster_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert "DIFFRL_METRICS_HOST=0.0.0.0" in " ".join(cfg["worker_start_ray_commands"])
    env = yaml.safe_load((DEPLOY / "ray" / "runtime_env.yaml").read_text())
    assert set(env) == {"env_vars", "excludes"} and env["env_vars"]["DIFFRL_METRICS_HOST"] == "0.0.0.0"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own check of the fields
    # the package folders stay out of the working_dir (on a worker's sys.path they would shadow
    # proto-plus and the installed diffrl)
    assert {f"/{name}/" for name in ("diffrl", "actors", "learner", "models", "proto", "reward_servers")} <= \
        set(env["excludes"])
