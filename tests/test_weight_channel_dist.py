"""The torch.distributed weight channel (proto/weight_dist.py) with real processes over gloo: exact round
trips of several dtypes, newest-version semantics, a sampler killed mid-transfer, a restarted sampler;
the ``weights`` config section; and a tiny training run on ``weights.channel=torch_dist`` (slow)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.proto.weight_dist import TAG_DATA, TorchDistPublisher, pack, parse_header, unpack
from diffrl.proto.weight_metrics import TRANSFER_FAILURES_TOTAL, WeightMetrics
from diffrl.proto.weight_sync import WeightsConfig

# the sampler processes import this module (spawn): heavier imports (diffrl.schema, diffrl.job) stay in tests
TIMEOUT_S = 5.0


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """dtype, shape and a hash of the exact bytes of each tensor."""
    out = {}
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
    return out


def weights(version: int, big_mb: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    out = {
        "w.f32": torch.randn(7, 5, generator=g),
        "w.f32_t": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "w.bf16": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(13, generator=g).to(torch.float16),
        "w.f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "n.i64": torch.randint(-2**40, 2**40, (9,), generator=g, dtype=torch.int64),
        "n.u8": torch.randint(0, 256, (17,), generator=g, dtype=torch.uint8),
        "n.i8": torch.randint(-128, 128, (5,), generator=g, dtype=torch.int8),
        "n.bool": torch.rand(10, generator=g) > 0.5,
        "scalar": torch.tensor(float(version)),
        "empty": torch.zeros(0, 3),
    }
    if big_mb:
        out["big"] = torch.full((int(big_mb * 2**20 / 4),), float(version))
    return out


class _DieOnData:
    """Fault injection: the sampler process kills itself when the first data buffer is due (the learner's
    server thread is then sending a large buffer into a closed connection)."""

    def __init__(self, pg):
        self.pg = pg

    def recv(self, tensors, src, tag):
        if tag == TAG_DATA:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.pg.recv(tensors, src, tag)

    def __getattr__(self, name):
        return getattr(self.pg, name)


def _sampler_main(address, sampler_id: str, conn) -> None:
    """A sampler process: answers commands from the test over a pipe."""
    from diffrl.proto.weight_dist import TorchDistSource

    torch.set_num_threads(1)
    source = TorchDistSource(sampler_id, lambda: tuple(address), timeout_s=TIMEOUT_S)
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            return
        if cmd == "latest":
            conn.send(source.latest_version())
        elif cmd == "fetch":
            start = time.perf_counter()
            got = source.fetch_newer(arg)
            conn.send((None if got is None else (got[0], got[1], digest(got[2])), time.perf_counter() - start,
                       source.failures))
        elif cmd == "die_mid_transfer":
            source._connect()
            source._join()
            source._pg = _DieOnData(source._pg)
            conn.send("dying")
            source.fetch_newer(arg)


class Sampler:
    def __init__(self, address, sampler_id: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sampler_main, args=(address, sampler_id, child), daemon=True)
        self.proc.start()

    def ask(self, cmd: str, arg=None, timeout: float = 60.0):
        self.conn.send((cmd, arg))
        assert self.conn.poll(timeout), f"sampler did not answer {cmd}"
        return self.conn.recv()

    def fetch(self, version: int):
        got, _seconds, _failures = self.ask("fetch", version)
        return got

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop", None))
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


@pytest.fixture
def publisher():
    pub = TorchDistPublisher(timeout_s=TIMEOUT_S, port=0, backend="gloo")
    yield pub
    pub.close()


def learner_failures() -> float:
    from prometheus_client import REGISTRY

    return sum(REGISTRY.get_sample_value(TRANSFER_FAILURES_TOTAL, {"channel": "torch_dist", "side": "learner",
                                                                    "reason": r}) or 0.0
               for r in ("error", "timeout"))


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_pack_header_unpack_in_process():
    tensors = weights(3)
    snap = pack(3, tensors, "lora")
    version, kind, entries = parse_header(snap.header)
    assert (version, kind) == (3, "lora")
    assert len(snap.buffers) == len({t.dtype for t in tensors.values()})  # one flat buffer per dtype
    assert digest(unpack(entries, snap.buffers)) == digest(tensors)
    with pytest.raises(ValueError, match="weight header"):
        parse_header(b"\xff\x00garbage")


def test_round_trip_newest_version_and_monotonic(publisher):
    sampler = Sampler(publisher.address, "sampler-0")
    try:
        assert sampler.ask("latest") == -1 and sampler.fetch(-1) is None  # nothing published yet
        for v in (1, 2, 3):  # the sampler misses 1 and 2
            publisher.publish(v, weights(v), "full")
        version, kind, got = sampler.fetch(-1)
        assert (version, kind) == (3, "full") and got == digest(weights(3))  # exact, every dtype
        assert sampler.fetch(3) is None  # nothing newer
        publisher.publish(2, weights(2))  # an older version is ignored: versions only go up
        assert sampler.ask("latest") == 3 and publisher.latest_version() == 3
        publisher.publish(4, weights(4), "lora")
        version, kind, got = sampler.fetch(3)
        assert (version, kind) == (4, "lora") and got == digest(weights(4))
        assert publisher.transfers == 2 and publisher.failures == 0
    finally:
        sampler.stop()


def test_sampler_killed_mid_transfer_does_not_stop_learner_or_others(publisher):
    WeightMetrics.for_registry()
    before = learner_failures()
    doomed, other = Sampler(publisher.address, "sampler-doomed"), Sampler(publisher.address, "sampler-other")
    try:
        publisher.publish(1, weights(1, big_mb=64))
        assert doomed.ask("die_mid_transfer", -1) == "dying"
        doomed.proc.join(20)
        assert doomed.proc.exitcode == -signal.SIGKILL
        # the training step's publish never waits for a sampler, not even one whose transfer is broken
        start = time.perf_counter()
        publisher.publish(2, weights(2, big_mb=64))
        assert time.perf_counter() - start < 2.0
        # the other sampler still gets the newest version, exactly
        version, _, got = other.fetch(-1)
        assert version == 2 and got == digest(weights(2, big_mb=64))
        # the broken transfer was noticed and counted (connection closed, or at the latest the timeout)
        assert wait_for(lambda: publisher.failures == 1, TIMEOUT_S + 10)
        assert learner_failures() - before == 1
        publisher.publish(3, weights(3))
        assert other.fetch(2)[0] == 3  # and keeps receiving afterwards
    finally:
        other.stop()
        doomed.stop()


def test_restarted_sampler_rejoins_and_gets_the_latest(publisher):
    first = Sampler(publisher.address, "sampler-0")
    try:
        publisher.publish(1, weights(1))
        assert first.fetch(-1)[0] == 1
        old_server = publisher._servers["sampler-0"][2]
    finally:
        first.kill()
    publisher.publish(2, weights(2))
    publisher.publish(3, weights(3))
    again = Sampler(publisher.address, "sampler-0")  # the same sampler id, a new process
    try:
        version, _, got = again.fetch(0)  # a restarted sampler starts from the base model
        assert version == 3 and got == digest(weights(3))
        # its old pair was retired when it rejoined: one server thread per sampler id
        assert publisher._servers["sampler-0"][2] is not old_server
        assert wait_for(lambda: not old_server.is_alive(), 5)
    finally:
        again.stop()


def test_unreachable_learner_is_counted_not_raised():
    from diffrl.proto.weight_dist import TorchDistSource

    pub = TorchDistPublisher(timeout_s=1.0, port=0, backend="gloo")
    pub.publish(1, weights(1))
    address = pub.address
    source = TorchDistSource("s", lambda: address, timeout_s=1.0)
    pub.close()
    del pub  # the store goes away with it
    start = time.perf_counter()
    assert source.fetch_newer(0) is None
    assert time.perf_counter() - start < 10 and source.failures == 1


@pytest.mark.parametrize("override,field", [
    ("weights.channel=nvlink", "weights.channel"),
    ("weights.backend=mpi", "weights.backend"),
    ("weights.timeout_s=0", "weights.timeout_s"),
    ("weights.port=70000", "weights.port"),
    ("weights.auto_threshold_mb=-1", "weights.auto_threshold_mb"),
])
def test_bad_weights_config_names_the_field(override, field):
    from diffrl.schema import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert err.value.field == field and field in str(err.value)


def test_auto_channel_by_size():
    from diffrl.schema import TrainConfig

    cfg = WeightsConfig(channel="auto", auto_threshold_mb=1)
    assert cfg.choose(2**20) == "object_store" and cfg.choose(2**20 + 1) == "torch_dist"
    assert WeightsConfig(channel="object_store").choose(10 * 2**30) == "object_store"
    assert WeightsConfig(channel="torch_dist").choose(1) == "torch_dist"
    assert load_config(TrainConfig, None, ["weights.channel=torch_dist"]).weights.channel == "torch_dist"


@pytest.mark.slow
def test_train_with_torch_dist_channel(tiny_model, tmp_path):
    """The job end to end (Ray actors: 1 learner, 2 samplers) with p_samp over the torch_dist channel."""
    from diffrl.job import train
    from diffrl.schema import TrainConfig

    cfg = load_config(TrainConfig, "deploy/configs/shapes-cpu.yaml", [
        f"model.path={tiny_model}", f"run.output_dir={tmp_path}", "run.name=dist", "run.max_steps=2",
        "run.eval_every=0", "run.progress=false", "sampler.num_samplers=2", "sampler.k=4",
        "sampler.groups_per_round=1", "sampler.max_pending_groups=2", "sampler.sampling.num_steps=2",
        "learner.groups_per_step=2", "learner.checkpoint_every=2", "learner.crd.num_noise_levels=2",
        "learner.crd.num_sampling_steps=2", "ray.temp_dir=/tmp/diffrl-ray-test", "weights.channel=torch_dist",
        "weights.timeout_s=30"])
    run_dir = train(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["end_step"] == 2
    assert all(v >= 1 for v in summary["sampler_versions_end"]), summary["sampler_versions_end"]
    scrape = (run_dir / "metrics_final.prom").read_text()
    assert 'diffrl_weights_publish_seconds_count{channel="torch_dist"}' in scrape
    assert 'diffrl_weights_sent_bytes_total{channel="torch_dist"}' in scrape
    assert 'channel="object_store"' not in scrape
