"""Where the learner ranks run: one Ray placement-group bundle per rank, and the address their
process group meets at, taken on rank 0's node (on a cluster it is not the driver's).

Kept free of heavy imports: ``node_endpoint`` runs in a fresh Ray worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffrl.utils import free_port

if TYPE_CHECKING:
    from diffrl.schema import TrainConfig


def place_learners(cfg: TrainConfig):
    """Reserve one bundle per learner rank (``placement``: CPUs, GPUs, strategy) and wait until the
    cluster has placed them all; a cluster that cannot within ``placement.ready_timeout_s`` fails the
    job with what was asked. Returns the placement group (rank r runs in bundle r)."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    p = cfg.placement
    bundle = {k: v for k, v in (("CPU", p.num_cpus), ("GPU", p.num_gpus)) if v > 0}
    pg = placement_group([dict(bundle) for _ in range(cfg.learner.world_size)], strategy=p.strategy)
    try:
        ray.get(pg.ready(), timeout=p.ready_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement: the Ray cluster did not fit {cfg.learner.world_size} learner rank(s) of {bundle} "
            f"(strategy {p.strategy}) within placement.ready_timeout_s={p.ready_timeout_s:g} s; `ray status` "
            "shows what is free") from None
    return pg


def in_bundle(pg, index: int):
    """Scheduling strategy that runs a task or actor in bundle ``index`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def node_endpoint() -> tuple[str, int, str]:
    """(IP, a free TCP port, Ray node id) of the node this runs on."""
    import ray

    return ray.util.get_node_ip_address(), free_port(""), ray.get_runtime_context().get_node_id()


def learner_rendezvous(pg) -> tuple[str, int, str]:
    """Where the learner ranks' process group meets: the IP of the node of bundle 0 (rank 0, which
    hosts the TCP store), a port free there, and that node's id. Asked on that node, not the driver's:
    on a cluster rank 0 may run anywhere."""
    import ray

    probe = ray.remote(num_cpus=0)(node_endpoint).options(scheduling_strategy=in_bundle(pg, 0))
    return ray.get(probe.remote())
