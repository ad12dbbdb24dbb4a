"""Run storage (diffrl/storage.py): checkpoints committed atomically in object storage, resumed from it
on another machine after the learner died mid-upload, retries and the checkpoint-outage limit, and a
clear error when the storage cannot be reached at start.

The object store is real: fsspec's in-memory filesystem for the unit tests, and moto's S3 server (a
separate process speaking the S3 HTTP API) reached through s3fs for the learner and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from test_learner import (  # noqa: F401 - fixtures
    bus,
    make_group,
    make_learner,
    model_dir,
    pending_ids,
    poll_until_step,
    redis_server,
    small_config,
)

from diffrl.learner import checkpoint as ckpt
from diffrl.learner import metrics as M
from diffrl.learner.learner import Learner
from diffrl.models.adapter import FlowModel
from diffrl.storage import (
    FAILURES_TOTAL,
    MANIFEST,
    RETRIES_TOTAL,
    RunStorage,
    StorageError,
    StorageRetry,
    run_location,
)
from diffrl.utils import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def memory_storage(name: str, **retry) -> RunStorage:
    return RunStorage(f"memory://diffrl-test/{name}-{time.monotonic_ns()}", StorageRetry(**retry))


def counter(name: str, op_prefix: str) -> float:
    """Sum of a storage counter over the ops starting with ``op_prefix``."""
    total = 0.0
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name == name and s.labels.get("op", "").startswith(op_prefix):
                total += s.value
    return total


# --------------------------------------------------------------------------------------- unit


def test_run_location_cases(tmp_path):
    local, url = run_location("", str(tmp_path / "runs"), "a")
    assert local == tmp_path / "runs" / "a" and url == ""
    shared, url = run_location(str(tmp_path / "shared"), "runs", "a")  # a shared volume: written directly
    assert shared == tmp_path / "shared" / "a" and url == ""
    local, url = run_location("s3://bucket/runs/", str(tmp_path / "runs"), "a")
    assert local == tmp_path / "runs" / "a" and url == "s3://bucket/runs/a"
    assert run_location("file:///mnt/x", "runs", "a") == (Path("/mnt/x/a"), "")


def _files(tmp_path: Path, sizes: dict[str, int]) -> Path:
    folder = tmp_path / "staged"
    for rel, n in sizes.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(os.urandom(n))
    return folder


def test_commit_manifest_latest_and_partial_uploads(tmp_path):
    store = memory_storage("commit")
    assert store.latest_checkpoint() is None
    one = _files(tmp_path / "1", {"state.json": 10, "engine_theta/model.pt": 300})
    assert store.put_tree(one, "checkpoints/step_000002") == {"state.json": 10, "engine_theta/model.pt": 300}
    assert store.latest_checkpoint() is None  # uploaded, not committed
    assert store.commit_checkpoint("step_000002") == {"state.json": 10, "engine_theta/model.pt": 300}
    assert store.latest_checkpoint() == "step_000002"
    # a later checkpoint half uploaded (the writer died): `latest` still names the complete one
    store.put_file(one / "state.json", "checkpoints/step_000004/state.json")
    assert store.latest_checkpoint() == "step_000002"
    # a pointer to a folder whose files are not all there is refused, never loaded
    store.put_text("checkpoints/step_000004/" + MANIFEST, json.dumps({"files": {"state.json": 10, "x.pt": 5}}))
    store.put_text("checkpoints/latest", "step_000004\n")
    with pytest.raises(StorageError, match="incomplete.*x.pt"):
        store.latest_checkpoint()
    store.put_text("checkpoints/latest", "step_000002\n")
    # download restores the exact bytes
    got = store.get_tree("checkpoints/step_000002", tmp_path / "down", skip=(MANIFEST,))
    assert sorted(got) == ["engine_theta/model.pt", "state.json"]
    assert (tmp_path / "down/engine_theta/model.pt").read_bytes() == (one / "engine_theta/model.pt").read_bytes()
    # prune keeps the newest up to latest, never newer folders that may be in progress
    for step in (6, 8):
        store.put_tree(one, f"checkpoints/step_00000{step}")
        store.commit_checkpoint(f"step_00000{step}")
    store.put_file(one / "state.json", "checkpoints/step_000010/state.json")
    assert store.prune_checkpoints(2, "step_000008") == ["step_000002", "step_000004"]
    names = {k.split("/", 1)[0] for k in store.list_files("checkpoints") if k.startswith("step_")}
    assert names == {"step_000006", "step_000008", "step_000010"}


def test_retries_are_counted_then_fail_with_the_operation(tmp_path, monkeypatch):
    store = memory_storage("retry", max_elapsed_s=2.0, initial_backoff_s=0.01, max_backoff_s=0.05)
    path = tmp_path / "f.txt"
    path.write_text("hello")
    real_put, calls = store.fs.put_file, []

    def flaky(*args, **kwargs):  # fault injection: the first two attempts fail
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("connection reset by peer")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", flaky)  # fsspec shares filesystem instances: undone after the test
    before = counter(RETRIES_TOTAL, "put flaky")
    store.put_file(path, "flaky.txt")
    assert len(calls) == 3 and store.read_text("flaky.txt") == "hello"
    assert counter(RETRIES_TOTAL, "put flaky") - before == 2

    store = memory_storage("down", max_elapsed_s=0.2, initial_backoff_s=0.05, max_backoff_s=0.05)

    def down(*args, **kwargs):
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(store.fs, "put_file", down)
    failed = counter(FAILURES_TOTAL, "put gone")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="put gone.txt failed: ConnectionError: endpoint unreachable"):
        store.put_file(path, "gone.txt")
    assert time.monotonic() - t0 < 2.0
    assert counter(FAILURES_TOTAL, "put gone") - failed == 1


def test_checkpoint_outage_is_counted_then_stops_the_learner(model_dir, bus, tmp_path, monkeypatch):  # noqa: F811
    """Uploads fail: the step goes on without acknowledging its groups (counted); past
    max_checkpoint_outage_s the learner raises instead of training on without checkpoints."""
    r, stream, producer = bus
    store = memory_storage("outage", max_elapsed_s=0.05, initial_backoff_s=0.01, max_backoff_s=0.01,
                           max_checkpoint_outage_s=1.5)
    registry = CollectorRegistry()
    cfg = small_config(checkpoint_every=1)
    model = FlowModel.from_pretrained(str(model_dir), device=cfg.device, dtype=cfg.dtype)
    learner = Learner(cfg, model, run_dir=tmp_path / "run", registry=registry, storage=store)
    learner.connect_bus(r, stream=stream)
    ids = [producer.publish(make_group(version=0)) for _ in range(8)]
    poll_until_step(learner, 1)
    assert store.latest_checkpoint() == "step_000001" and pending_ids(r, stream) == set()

    def down(*args, **kwargs):
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(store.fs, "put_file", down)
    poll_until_step(learner, 2)  # the checkpoint fails: logged, counted, nothing acknowledged
    assert registry.get_sample_value(M.CHECKPOINT_FAILURES_TOTAL) == 1
    assert store.latest_checkpoint() == "step_000001"
    assert pending_ids(r, stream) == set(ids[2:4])
    assert not (tmp_path / "run/checkpoints/.staging-rank00000/step_000002").exists()  # staging cleaned
    time.sleep(1.6)
    with pytest.raises(ckpt.CheckpointOutageError, match="max_checkpoint_outage_s"):
        poll_until_step(learner, 3)
    assert pending_ids(r, stream) == set(ids[2:6])  # nothing trained since step 1 was acknowledged
    learner.close()


# --------------------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free port, a bucket, and the environment that points boto at it."""
    pytest.importorskip("s3fs")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 30
        while True:
            try:
                fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
                fs.mkdir("diffrl-runs")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield env
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class KilledMidUpload(BaseException):
    """Fault injection: the learner process dies (nothing after this runs: no except, no ack)."""


def test_resume_from_s3_after_the_learner_died_mid_upload(model_dir, bus, tmp_path, s3_server, monkeypatch):  # noqa: F811
    from diffrl.storage import open_storage

    r, stream, producer = bus
    url = f"s3://diffrl-runs/killed-{time.monotonic_ns()}"
    cfg = small_config(checkpoint_every=2, keep_checkpoints=2)
    store = open_storage(url)
    a = make_learner(model_dir, cfg, run_dir=tmp_path / "node-a")
    a.storage = store
    a.connect_bus(r, stream=stream)
    groups = [make_group(version=0) for _ in range(12)]
    ids = [producer.publish(g) for g in groups]
    poll_until_step(a, 2)
    assert store.latest_checkpoint() == "step_000002" and pending_ids(r, stream) == set()
    uploaded = store.list_files("checkpoints/step_000002")
    assert MANIFEST in uploaded and "state.json" in uploaded and any(k.startswith("engine_theta/") for k in uploaded)

    real_put, puts = store.fs.put_file, []

    def dies_on_third(lpath, rpath, *args, **kwargs):
        if "step_000004" in rpath:
            puts.append(rpath)
            if len(puts) == 3:
                raise KilledMidUpload(rpath)
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", dies_on_third)
    with pytest.raises(KilledMidUpload):
        poll_until_step(a, 4)
    assert len(store.list_files("checkpoints/step_000004")) == 2  # half a checkpoint in the bucket
    assert store.latest_checkpoint() == "step_000002"  # ... never taken as the latest
    assert pending_ids(r, stream) == set(ids[4:8])  # steps 3-4 trained, not committed

    # another machine (a fresh local folder) resumes from the bucket: step 2, then trains 3-4 again
    b = make_learner(model_dir, cfg, run_dir=tmp_path / "node-b")
    b.storage = open_storage(url)
    restored = b.restore_from_storage()
    assert restored is not None and b.resume(restored) == 2
    b.connect_bus(r, stream=stream)
    poll_until_step(b, 5)
    b.finish()
    assert b.storage.latest_checkpoint() == "step_000005"
    assert set(b.storage.list_files("checkpoints/step_000004")) >= {MANIFEST, "state.json"}
    assert {k.split("/", 1)[0] for k in b.storage.list_files("checkpoints") if k.startswith("step_")} == \
        {"step_000004", "step_000005"}  # keep_checkpoints=2, the half-written attempt replaced
    ledger = b.consumer.ledger()
    assert ledger["balanced"] and ledger["trained"] == 10 and ledger["duplicate"] == 0, ledger
    lines = b.storage.read_text("trained_groups.txt").splitlines()
    trained = [ln.split("\t")[0] for ln in lines]
    assert len(trained) == len(set(trained)) == 10  # each group once in the committed history
    assert sorted(trained) == sorted(g.group_id for g in groups[:10])
    b.close()


def test_unreachable_storage_fails_at_start_with_the_url(tmp_path, s3_server):
    """The CLI exits 1 naming run.storage before Redis, Ray or a model start."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"run": {"name": "x", "output_dir": str(tmp_path / "runs"), "progress": False,
                                          "storage": "s3://diffrl-runs/runs"},
                                  "ray": {"temp_dir": str(tmp_path / "ray")}}))
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
           "AWS_MAX_ATTEMPTS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([str(BIN / "diffrl"), "train", str(recipe)], capture_output=True, text=True, env=env, check=False,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "run.storage s3://diffrl-runs/runs/x: cannot write there" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "ray").exists()  # nothing heavy started
    bad = subprocess.run([str(BIN / "diffrl"), "train", str(recipe), "run.storage=nosuch://x"],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert bad.returncode == 2 and "run.storage" in bad.stderr and "nosuch" in bad.stderr, bad.stderr[-1000:]


# ----------------------------------------------------------------------- two Ray nodes, one bucket


class RayNode:
    """``ray start --block`` (head, or a worker joining ``head_port``) in its own process group and
    working directory, every port free; stopped by signalling its group (never ``ray stop``)."""

    def __init__(self, cwd: Path, temp_dir: Path, num_cpus: int, head_port: int | None = None):
        cwd.mkdir(parents=True, exist_ok=True)
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--metrics-export-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port()}
        if head_port is None:
            self.port = free_port()
            args = ["--head", f"--port={self.port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}"]
        else:
            self.port = head_port
            args = [f"--address=127.0.0.1:{head_port}"]
        env = dict(os.environ, RAY_AUTH_MODE="disabled", AUTOSCALER_METRIC_PORT=str(free_port()),
                   DASHBOARD_METRIC_PORT=str(free_port()), PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        env.pop("RAY_ADDRESS", None)
        self.log = cwd / "ray.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                 *args, *(f"{k}={v}" for k, v in ports.items())],
                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        import signal

        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _wait_nodes(address: str, n: int, nodes: list[RayNode]) -> None:
    import ray

    deadline = time.monotonic() + 120
    ray.init(address=address)
    try:
        while len([x for x in ray.nodes() if x["Alive"]]) < n:
            for node in nodes:
                assert node.proc.poll() is None, node.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray nodes did not come up"
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_node_ray_run_lands_in_s3_and_resumes_on_a_fresh_machine(tiny_model, tmp_path, s3_server, monkeypatch):
    """The driver on a head node without CPUs (cwd A), every actor on a worker node (cwd B); the run's
    storage is an S3 bucket. Everything lands in the bucket; then the local folder is deleted (a new
    machine) and ``--resume s3://…`` continues the run, with a balanced ledger and each group trained once."""
    import tempfile

    from diffrl.config import load_config
    from diffrl.embedded_redis import EmbeddedRedis, connect
    from diffrl.job import train
    from diffrl.proto.bus import ledger_snapshot
    from diffrl.schema import TrainConfig
    from diffrl.storage import open_storage

    temp = Path(tempfile.mkdtemp(prefix="drs-", dir="/tmp"))  # short: Ray's sockets live under it
    head = RayNode(tmp_path / "head-cwd", temp, num_cpus=0)
    nodes = [head]
    redis = EmbeddedRedis(port=0, data_dir=tmp_path / "redis").start()  # the cluster's Redis service
    try:
        time.sleep(2)
        nodes.append(RayNode(tmp_path / "worker-cwd", temp, num_cpus=6, head_port=head.port))
        address = f"127.0.0.1:{head.port}"
        _wait_nodes(address, 2, nodes)
        driver_cwd = tmp_path / "driver-cwd"
        driver_cwd.mkdir()
        monkeypatch.chdir(driver_cwd)
        overrides = [
            f"model.path={tiny_model}", "run.output_dir=work", "run.name=s3run", "run.storage=s3://diffrl-runs/runs",
            "run.max_steps=4", "run.eval_every=2", "run.progress=false", "eval.max_prompts=2", "eval.num_steps=2",
            "sampler.num_samplers=1", "sampler.k=4", "sampler.groups_per_round=1", "sampler.max_pending_groups=2",
            "sampler.sampling.num_steps=2", "learner.groups_per_step=2", "learner.checkpoint_every=2",
            "learner.crd.num_noise_levels=2", "learner.crd.num_sampling_steps=2", f"ray.address={address}",
            f"redis.url={redis.url}"]
        run_dir = train(load_config(TrainConfig, str(REPO / "deploy/configs/shapes-cpu.yaml"), overrides))
        assert run_dir == driver_cwd / "work" / "s3run"
        assert not (tmp_path / "worker-cwd" / "work").exists()  # no actor wrote relative to its own cwd
        store = open_storage("s3://diffrl-runs/runs/s3run")
        files = store.list_files()
        for rel in ("config.yaml", "metrics.jsonl", "eval.jsonl", "ledger.json", "summary.json", "trained_groups.txt",
                    "grids/step_000000.png", "grids/step_000002.png", "grids/step_000004.png",
                    "logs/learner-0.log", "logs/sampler-0.log", "logs/reward-shapes-0.log", "logs/driver.log",
                    "checkpoints/latest", "checkpoints/step_000004/MANIFEST.json",
                    "checkpoints/step_000004/state.json"):
            assert rel in files, (rel, sorted(files))
        assert store.latest_checkpoint() == "step_000004"
        assert "learner rank 0" in store.read_text("logs/learner-0.log") or \
            "learner-0" in store.read_text("logs/learner-0.log")

        # a fresh machine: no local folder; resume from the bucket to step 6
        import shutil

        shutil.rmtree(run_dir)
        resumed = train(load_config(TrainConfig, str(REPO / "deploy/configs/shapes-cpu.yaml"),
                                    [*overrides, "run.resume=s3://diffrl-runs/runs/s3run", "run.max_steps=6"]))
        assert resumed == run_dir
        summary = json.loads(store.read_text("summary.json"))
        assert summary["resumed"] and summary["start_step"] == 4 and summary["end_step"] == 6
        assert store.latest_checkpoint() == "step_000006"
        trained = [ln.split("\t")[0] for ln in store.read_text("trained_groups.txt").splitlines()]
        assert len(trained) == len(set(trained)) == 2 * 6
        steps = [json.loads(ln)["step"] for ln in store.read_text("metrics.jsonl").splitlines()
                 if '"kind": "train"' in ln]
        assert steps == [1, 2, 3, 4, 5, 6]  # the first run's lines came back with the download
        live = ledger_snapshot(connect(redis.url), "experience")
        assert live["balanced"] and live["trained"] == 12, live

        # the tuned weights out, from the bucket to the bucket, in the format diffusers loads
        export = subprocess.run([str(BIN / "diffrl"), "export", "s3://diffrl-runs/runs/s3run", "--out",
                                 "s3://diffrl-runs/exports/s3run"], capture_output=True, text=True, check=False,
                                timeout=300)
        assert export.returncode == 0, export.stderr[-3000:]
        exported = open_storage("s3://diffrl-runs/exports/s3run").list_files()
        assert {"model_index.json", "export.json", "README.md"} <= set(exported), sorted(exported)
        assert json.loads(open_storage("s3://diffrl-runs/exports/s3run").read_text("export.json"))["step"] == 6
    finally:
        redis.stop()
        for node in reversed(nodes):
            node.stop()
