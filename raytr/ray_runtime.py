"""Joining Ray: the one place raytr starts or connects to a Ray cluster."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets it), or start a local one,
    unless this process is already connected (tests and notebooks call `ray.init` themselves)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env_vars = {"PYTHONWARNINGS": os.environ["PYTHONWARNINGS"]} if "PYTHONWARNINGS" in os.environ else {}
    ray.init(address=address, include_dashboard=False if not address else None,
             runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
    log.info("ray: %s", "connected to " + address if address else "started a local cluster")
