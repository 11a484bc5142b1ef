"""Joining Ray: the one place raytr starts or connects to a Ray cluster."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets it), or start a local one,
    unless this process is already connected (tests and notebooks call `ray.init` themselves).
    Without RAY_ADDRESS it starts its own even where a `ray start` cluster runs on this machine:
    `ray.init()` would join that one silently, or wait forever on one killed without `ray stop`."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env_vars = {"PYTHONWARNINGS": os.environ["PYTHONWARNINGS"]} if "PYTHONWARNINGS" in os.environ else {}
    ray.init(address=address or "local", include_dashboard=False if not address else None,
             runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
    log.info("ray: %s", "connected to " + address if address else "started a local cluster")


@dataclass(frozen=True)
class ClusterLimit:
    """The most a Ray cluster can ever hold: in all (`total`) and on one node (`nodes`: the
    resources of each node it has, and of each node type its autoscaler may add); `why` it cannot
    grow past them."""

    total: dict[str, float]
    nodes: list[dict[str, float]]
    why: str


def cluster_limit() -> ClusterLimit | None:
    """The most resources the connected cluster can ever hold; None where it may grow by an amount
    not known here (an autoscaler with no limits in the GCS, or nodes that a person starts and joins).

    A cluster this process started (`ray.init()` without an address, as `ensure_ray` does without
    RAY_ADDRESS, or a test or notebook does) runs no autoscaler: it holds what it has now. An
    autoscaling one (`ray up cluster.yaml`, KubeRay) that publishes its node groups' limits in the
    GCS holds at most those (the limits Ray Train V2 checks its worker group against)."""
    live = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    node = getattr(ray._private.worker, "_global_node", None)  # Ray's own handle; None under Ray Client
    if node is not None and node.is_head():
        totals = {k: float(v) for k, v in ray.cluster_resources().items()}
        return ClusterLimit(totals, live, "a local Ray cluster that this process started, which adds no nodes")
    try:
        state = ray._private.state.state
        limits = state.get_max_resources_from_cluster_config()
        config = state.get_cluster_config() if limits else None
    except Exception as error:  # noqa: BLE001 - a private API: not knowing the limit only loses the check
        log.debug("ray: no cluster limits from the GCS: %s", error)
        return None
    if not limits:
        return None
    groups = [{k: float(v) for k, v in group.resources.items()} for group in config.node_group_configs
              if group.max_count != 0]
    return ClusterLimit({k: float(v) for k, v in limits.items()}, live + groups,
                        "the most that its autoscaler's node groups allow")
