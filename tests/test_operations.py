"""Operations against one short real training run, submitted the documented way: a local Ray head
(`ray start --head` with the dashboard's job API), `deploy/ray/submit.sh` (= `ray job submit
--working-dir . --runtime-env deploy/ray/runtime_env.yaml -- diffrl train ... ray.address=auto`) with
a tiny random model, a real Prometheus (Debian package) configured from deploy/prometheus/prometheus.yml
(scrape interval shortened to 1 s) that finds the run through the targets file the driver writes and
Ray through Ray's service-discovery file, and `diffrl status` while the run is live and after it ends.

While the job runs, every PromQL expression of deploy/grafana/dashboards/*.json is queried over the
Prometheus HTTP API until it has returned data at least once (but for the rows of one algorithm, such as
SDPO's, which a CRD run does not fill: their series are checked in that algorithm's learner test)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from dashboards import dashboard_queries

from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3
from diffrl.status import FINISHED, RUNNING, collect_status, format_status
from diffrl.utils import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PROMETHEUS = shutil.which("prometheus")
RUN_NAME = "ops"
TRAIN_SECONDS = 20


def prometheus_config(out: Path, runs_dir: Path, ray_temp: Path) -> Path:
    """deploy/prometheus/prometheus.yml with a 1 s scrape interval and its file_sd paths pointed at this
    test's run folder and Ray temp folder."""
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(REPO / "deploy" / "prometheus" / f) for f in cfg["rule_files"]]
    files = {"diffrl": [str(runs_dir / "prometheus" / "*.json")],
             "ray": [str(ray_temp / "prom_metrics_service_discovery*.json")]}
    assert {job["job_name"] for job in cfg["scrape_configs"]} == set(files)
    for job in cfg["scrape_configs"]:
        job["file_sd_configs"] = [{"files": files[job["job_name"]], "refresh_interval": "1s"}]
    path = out / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Prometheus:
    def __init__(self, config: Path, data: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        with open(data.parent / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=10.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (data.parent / "prometheus.log").read_text()[-3000:]
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus not ready")

    def query(self, expr: str) -> list:
        resp = self.client.post("/api/v1/query", data={"query": expr})
        body = resp.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RayHead:
    """`ray start --head --block` in its own process group, every port chosen free (other Rays may run
    on this machine), stopped by signalling that group (never `ray stop`, which stops every Ray here)."""

    def __init__(self, temp_dir: Path, env: dict[str, str], log: Path):
        dash = free_port()
        ports = {"--port": free_port(), "--dashboard-port": dash, "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--ray-client-server-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
        # the autoscaler's and dashboard's own metrics ports are fixed by default (44217, 44227)
        env = dict(env, AUTOSCALER_METRIC_PORT=str(free_port()), DASHBOARD_METRIC_PORT=str(free_port()))
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["ray", "start", "--head", "--block", f"--temp-dir={temp_dir}", "--num-cpus=4", "--disable-usage-stats",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", *(f"{k}={v}" for k, v in ports.items())],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{dash}"
        self.log = log

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/api/version", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard not up:\n{self.log.read_text()[-3000:]}")

    def job(self, submission_id: str) -> dict:
        return httpx.get(f"{self.url}/api/jobs/{submission_id}", timeout=10).json()

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    pipe = build_tiny_sd3(TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16),
                          root / "work")
    pipe.save_pretrained(str(root / "model"))
    runs = root / "runs"
    ray_temp = Path(tempfile.mkdtemp(prefix="dro-", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("RAY_ADDRESS", None)
    env.pop("REDIS_URL", None)
    head = RayHead(ray_temp, env, root / "ray-head.log")
    sid = f"diffrl-ops-{os.getpid()}"
    prom = None
    result = {"root": root, "run_dir": runs / RUN_NAME, "runs": runs, "ok": {}, "status_live": None,
              "prometheus": None, "rules": None}
    try:
        head.wait_ready()
        if PROMETHEUS:
            prom = Prometheus(prometheus_config(root, runs, ray_temp), root / "prometheus-data")
        queries = dashboard_queries()
        overrides = [
            # 20 s of training (Prometheus' discovery applies new targets every 5 s), evaluations before and after
            f"model.path={root / 'model'}", f"run.output_dir={runs}", f"run.name={RUN_NAME}", "run.max_steps=10000",
            f"run.max_seconds={TRAIN_SECONDS}", "run.eval_every=10000", "run.progress=false", "eval.max_prompts=2",
            "eval.num_steps=2",
            "sampler.num_samplers=2", "sampler.k=4", "sampler.groups_per_round=1", "sampler.max_pending_groups=2",
            "sampler.sampling.num_steps=2", "learner.groups_per_step=2", "learner.checkpoint_every=50",
            "learner.crd.num_noise_levels=2", "learner.crd.num_sampling_steps=2"]
        submit_env = dict(env, RAY_ADDRESS=head.url, SUBMISSION_ID=sid, NO_WAIT="1")
        deadline = time.monotonic() + 90
        while True:  # the job API answers "No available agent" for a few seconds after start-up
            out = subprocess.run(["deploy/ray/submit.sh", "deploy/configs/shapes-cpu.yaml", *overrides], cwd=REPO,
                                 env=submit_env, capture_output=True, text=True, timeout=120, check=False)
            if out.returncode == 0:
                break
            assert time.monotonic() < deadline, out.stdout[-2000:] + out.stderr[-3000:]
            time.sleep(3)
        deadline = time.monotonic() + 600
        while (job := head.job(sid))["status"] in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            run_dir = result["run_dir"]
            if prom and (run_dir / "endpoints.json").is_file():
                for expr in queries:
                    if expr not in result["ok"] and prom.query(expr):
                        result["ok"][expr] = True
            if result["status_live"] is None and (run_dir / "endpoints.json").is_file():
                st = collect_status(run_dir)
                if st["state"] == RUNNING and (st["learner"]["step"] or 0) >= 1 and st["learner"]["eval"]:
                    result["status_live"] = st
            time.sleep(1)
        result["job"] = job
        result["job_logs"] = httpx.get(f"{head.url}/api/jobs/{sid}/logs", timeout=10).json().get("logs", "")
        if prom:
            for expr in queries:  # Ray's own series outlive the job
                if expr not in result["ok"] and prom.query(expr):
                    result["ok"][expr] = True
            result["missing"] = {e: where for e, where in queries.items() if e not in result["ok"]}
            result["up"] = prom.query('up{job="ray"}')
            result["rules"] = prom.client.get("/api/v1/rules").json()["data"]["groups"]
            result["prometheus"] = prom
        result["status_after"] = subprocess.run([str(VENV_BIN / "diffrl"), "status", str(result["run_dir"])],
                                                capture_output=True, text=True, timeout=60, check=False)
        yield result
    finally:
        try:  # a test that failed half-way: stop the job first (SIGTERM: the driver stops its reward servers)
            if head.job(sid).get("status") in ("PENDING", "RUNNING"):
                httpx.post(f"{head.url}/api/jobs/{sid}/stop", timeout=10)
                time.sleep(10)
        except (httpx.HTTPError, ValueError):
            pass
        if prom:
            prom.stop()
        head.stop()
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_training_runs_as_a_ray_job(live):
    assert live["job"]["status"] == "SUCCEEDED", live["job_logs"][-5000:]
    summary = json.loads((live["run_dir"] / "summary.json").read_text())
    assert summary["end_step"] >= 5 and summary["seconds"] >= TRAIN_SECONDS
    # held-out evaluation is exported as learner gauges (the final scrape is kept in the run folder)
    final = (live["run_dir"] / "metrics_final.prom").read_text()
    for name in ("diffrl_learner_eval_strict_accuracy", "diffrl_learner_eval_fidelity",
                 'diffrl_learner_eval_clause_accuracy{clause="count"}', 'diffrl_learner_eval_reward{reward="shapes"}',
                 'diffrl_learner_eval_pass_rate{reward="shapes"}'):
        assert name in final
    assert re.search(rf"^diffrl_learner_eval_step {summary['end_step']}\.0$", final, re.MULTILINE)


def test_driver_writes_prometheus_targets(live):
    run_dir = live["run_dir"]
    groups = json.loads((run_dir / "prometheus_targets.json").read_text())
    jobs = {g["labels"]["job"]: g["targets"] for g in groups}
    assert set(jobs) == {"learner", "sampler", "reward"}
    assert len(jobs["sampler"]) == 2 and len(jobs["learner"]) == 1
    assert all(g["labels"]["diffrl_run"] == RUN_NAME for g in groups)
    # DIFFRL_METRICS_HOST=0.0.0.0 (deploy/ray/runtime_env.yaml): advertised at the node's address
    endpoints = json.loads((run_dir / "endpoints.json").read_text())
    assert not endpoints["learner_metrics"].startswith("http://127.0.0.1:")
    # the live copy Prometheus watches is gone once the run is over
    assert not (live["runs"] / "prometheus" / f"{RUN_NAME}.json").exists()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed (apt-get install prometheus; "
                    "make test installs it when run as root)")
def test_every_dashboard_query_returns_data_from_a_live_run(live):
    assert live["ok"], "no dashboard query ever returned data"
    assert not live["missing"], "dashboard queries that never returned data:\n" + "\n".join(
        f"  {where}: {expr}" for expr, where in live["missing"].items())


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed")
def test_prometheus_scrapes_ray_and_evaluates_the_alert_rules(live):
    assert live["up"] and all(r["value"][1] == "1" for r in live["up"]), live["up"]
    rules = [r for g in live["rules"] for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"DiffrlLearnerStuck", "DiffrlRewardServerErrors", "DiffrlBacklogGrowing"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_status_shows_the_live_run_then_that_it_ended(live):
    st = live["status_live"]
    assert st is not None, "diffrl status never saw the run running with a step and an evaluation"
    lr = st["learner"]
    assert lr["step"] >= 1 and lr["policy_version"] >= 1 and lr["backlog_groups"] is not None
    assert "total" in lr["reward_mean"] and "shapes" in lr["reward_mean"]
    assert 0 <= lr["eval"]["strict"] <= 1 and 0 <= lr["eval"]["fidelity"] <= 1
    assert 0 <= lr["eval"]["reward"]["shapes"] <= 1 and 0 <= lr["eval"]["pass_rate"]["shapes"] <= 1
    assert len(st["samplers"]) == 2 and all(s["up"] for s in st["samplers"])
    assert [r["health"] for r in st["rewards"]] == ["ok"] and st["rewards"][0]["requests"] >= 1
    text = format_status(st)
    assert "RUNNING" in text and "sampler-1" in text and "shapes" in text
    after = live["status_after"]
    assert after.returncode == 1, after.stdout + after.stderr
    assert FINISHED.upper() in after.stdout and "not running" in after.stdout
