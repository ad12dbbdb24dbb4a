"""Where the learner ranks run and where their process group meets, on a real two-node Ray cluster
(two raylets on this machine, ray.cluster_utils): the driver's node has no CPUs, so the ranks, and
the rendezvous with them, must be on the other node."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from diffrl.config import ConfigError, load_config
from diffrl.placement import in_bundle, learner_rendezvous, node_endpoint, place_learners
from diffrl.schema import TrainConfig

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="drp-", dir="/tmp")  # short: Ray's unix sockets live under it
    (Path(temp) / "ray").mkdir()
    # the cluster writes its address file (ray_current_cluster) under RAY_TMPDIR, not into /tmp/ray
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(RAY_TMPDIR=temp, RAY_AUTH_MODE="disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp, ignore_errors=True)


def test_ranks_and_rendezvous_are_on_the_ranks_node_not_the_drivers(two_nodes):
    _cluster, worker = two_nodes
    cfg = TrainConfig()
    cfg.learner.world_size = 2
    cfg.ray.address = "auto"
    driver_node = ray.get_runtime_context().get_node_id()
    pg = place_learners(cfg)
    try:
        ip, port, node = learner_rendezvous(pg)
        assert node == worker.node_id != driver_node
        assert ip == worker.node_ip_address
        with socket.socket() as s:  # the port is free on that node (one machine here)
            s.bind(("", port))
        # what runs in bundle r (rank r) runs there too
        where = ray.remote(num_cpus=1)(node_endpoint)
        nodes = ray.get([where.options(scheduling_strategy=in_bundle(pg, r)).remote() for r in range(2)])
        assert [n[2] for n in nodes] == [worker.node_id] * 2
    finally:
        ray.util.remove_placement_group(pg)


def test_a_cluster_that_cannot_fit_the_ranks_fails_with_what_was_asked(two_nodes):
    cfg = TrainConfig()
    cfg.learner.world_size = 3  # 3 bundles of 1 CPU on a cluster of 2 CPUs
    cfg.placement.ready_timeout_s = 2.0
    with pytest.raises(RuntimeError, match=r"did not fit 3 learner rank\(s\) of \{'CPU': 1\.0\}.*ready_timeout_s=2"):
        place_learners(cfg)
    # what the failed attempt reserved was given back: two ranks still fit
    cfg.learner.world_size = 2
    ray.util.remove_placement_group(place_learners(cfg))


def test_placement_config_is_validated_by_field():
    for override, field in (("placement.strategy=ANYWHERE", "placement.strategy"),
                            ("placement.num_cpus=0", "placement.num_cpus"),
                            ("placement.ready_timeout_s=0", "placement.ready_timeout_s")):
        with pytest.raises(ConfigError, match=rf"^{field}"):
            load_config(TrainConfig, None, [override])
