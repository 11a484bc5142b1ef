"""The Ray Serve application: HTTP ingress -> Preprocessor -> Recommender, plus a bundle registry.

    Ingress (FastAPI, serve/routes.py)  validates requests, maps answers to HTTP
      -> Preprocessor (OnlinePreprocessor)  raw events -> encoded [B, T] batch; encoded ids -> raw ids
         -> Recommender (SessionModel)      @serve.batch: requests of many clients in one model call;
                                            takes a GPU with num_gpus > 0
    BundleRegistry                       the bundle version `POST /admin/reload` announced

Run it:
    serve run serve.app:app_builder bundle_dir=runs/demo/model            (a dev server)
    serve deploy serve/config.yaml                                        (a cluster; autoscaling)
    raytr serve --model runs/demo/model, or start_local()/stop_local() from Python

Reloading a bundle, without downtime:
- `POST /admin/reload` (header X-Admin-Token; the token comes from env RAYTR_ADMIN_TOKEN or
  serve.admin_token_file; without one the route answers 403) makes the registry re-read the bundle
  directory. Every Preprocessor and Recommender replica polls the registry (`reload_poll_s`), loads
  the new bundle in a thread while the old one keeps serving, then swaps. Encoded batches carry
  their bundle version and a Recommender keeps the previous model too, so a request is never scored
  by a model of another vocabulary while replicas switch; a replica that meets a version it lacks
  loads the directory at once. If a Recommender cannot load the new bundle (say a CUDA OOM), the
  service answers with the previous version (both keep it) and /healthz is a 503 naming both until
  the load succeeds (see Preprocessor). Write a new bundle next to the old one and move it into place
  (or overwrite files atomically) before calling reload.
- Before Serve starts, app_builder runs the registry's checks on the bundle (workflow, model, weights):
  a bundle the replicas could not load is one error naming the file.
- `serve deploy` with a new `bundle_dir` in the config's args is a rolling update: Serve starts
  replicas of the new version, then stops the old ones (use it when the event fields change,
  which a reload refuses with 409).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import time
from typing import Literal, TYPE_CHECKING, Any

import httpx
import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from raytr.bundle import Bundle
from raytr.config import DataConfig, ServeConfig
from serve.api import BatchingStats, HealthResponse, ModelInfo, ReloadResponse
from serve.core import (
    BUNDLE_LOAD_ERRORS,
    Query,
    Recommendations,
    Rejection,
    ScoringRequest,
    ScoringResult,
    VersionedStates,
    VersionUnavailable,
    cannot_reload,
    check_default_k,
    load_compatible,
    reload_response,
)
from serve.routes import build_app, resolve_admin_token

if TYPE_CHECKING:  # the replicas that need them import torch/NVTabular in their constructors
    from serve.engine import Encoder, Scorer

log = logging.getLogger(__name__)

APP_NAME = "raytr"
RETRIES = 2  # extra attempts when the replica a call went to died (another replica takes it)


# ------------------------------------------------------------------------------------ handles
async def call(method: Any, *args: Any, what: str) -> Any:
    """`await handle.method.remote(*args)`, mapping an unavailable deployment to a 503 Rejection.
    A call whose replica died is retried on another replica: scoring is idempotent."""
    for attempt in range(RETRIES + 1):
        try:
            return await method.remote(*args)
        except RayTaskError:
            raise  # a bug in our code: a 500 with the traceback in the replica's log
        except RayActorError as exc:
            if attempt == RETRIES:
                return Rejection(503, f"the {what} replica died ({type(exc).__name__}); retry")
            await asyncio.sleep(0.05 * (attempt + 1))
        except (RayError, RayServeException) as exc:
            return Rejection(503, f"the {what} is unavailable ({type(exc).__name__}); retry")
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------ deployments
@serve.deployment(name="BundleRegistry", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0})
class BundleRegistry:
    """The bundle version the service should serve: set at start, changed by /admin/reload."""

    async def __init__(self, bundle_dir: str, data: DataConfig, default_k: int) -> None:
        self._bundle_dir, self._data, self._default_k = bundle_dir, data, default_k
        self._version = (await asyncio.to_thread(load_compatible, bundle_dir, data)).version
        self._lock = asyncio.Lock()

    def current(self) -> str:
        return self._version

    async def reload(self) -> ReloadResponse | Rejection:
        """Announce the bundle directory's version once it is known to load as every replica will
        load it: same data config, workflow compiled and matching the model's features."""
        async with self._lock:
            try:
                bundle = await asyncio.to_thread(self._checked_bundle)
            except BUNDLE_LOAD_ERRORS as exc:
                return cannot_reload(self._bundle_dir, exc)
            previous, self._version = self._version, bundle.version
            return reload_response(previous, self._version)

    def _checked_bundle(self) -> Bundle:
        from serve.engine import check_servable

        bundle = load_compatible(self._bundle_dir, self._data)
        check_servable(bundle, self._default_k)  # what each Preprocessor and Recommender will do with it
        return bundle


@serve.deployment(name="Recommender", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1, "num_gpus": 0},
                  health_check_period_s=10, health_check_timeout_s=30)
class Recommender:
    """The SessionModel behind dynamic batching. Keeps the models of the last two bundle versions."""

    async def __init__(self, bundle_dir: str, data: DataConfig, registry: DeploymentHandle,
                       config: ServeConfig) -> None:
        import torch

        from serve.engine import Scorer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._states: VersionedStates[Scorer] = VersionedStates(bundle_dir, Scorer.loader(device, config.scorer),
                                                                keep=2, data=data)
        await self._states.sync_to_disk()
        self._score_batch.set_max_batch_size(config.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._requests = self._batches = self._max_batch = 0
        self._poll_s = config.reload_poll_s
        self._follow = asyncio.create_task(
            self._states.follow(lambda: registry.current.remote(), config.reload_poll_s))
        log.info("Recommender %s on %s serving %s", self._replica, device, self._states.versions)

    async def score(self, request: ScoringRequest) -> ScoringResult | VersionUnavailable:
        return await self._score_batch(request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[ScoringRequest]) -> list[ScoringResult | VersionUnavailable]:
        self._requests += len(requests)
        self._batches += 1
        self._max_batch = max(self._max_batch, len(requests))
        # A load that failed lately (here or in the follower, which retries every poll) is not tried
        # again per batch: the batch would wait for it (a CUDA OOM each time).
        if any(self._states.get(r.version) is None for r in requests) and not self._states.failed_within(self._poll_s):
            try:
                await self._states.sync_to_disk()  # a Preprocessor already switched to a newer bundle
            except BUNDLE_LOAD_ERRORS as exc:  # keep serving the versions it has; the follower retries
                log.warning("Recommender could not load %s (%r); serving %s", self._states.bundle_dir, exc,
                            self._states.versions)
        out: list[ScoringResult | VersionUnavailable | None] = [None] * len(requests)
        for version in {r.version for r in requests}:
            rows = [i for i, r in enumerate(requests) if r.version == version]
            scorer = self._states.get(version)
            if scorer is None:
                for i in rows:
                    out[i] = VersionUnavailable(version, self._states.versions)
                continue
            results = await asyncio.to_thread(scorer.score, [requests[i] for i in rows], len(requests))
            for i, result in zip(rows, results):
                out[i] = result
        return out  # type: ignore[return-value]

    def stats(self) -> BatchingStats:
        return BatchingStats(replica=self._replica, requests=self._requests, batches=self._batches,
                             max_batch_requests=self._max_batch)

    def version(self) -> tuple[str, bool]:
        """(the newest version loaded, whether loading another failed within the last two polls)."""
        return self._states.latest.version, self._states.failed_within(2 * self._poll_s)

    def check_health(self) -> None:
        if self._follow.done():
            raise RuntimeError(f"the bundle follower stopped: {self._follow}")


@serve.deployment(name="Preprocessor", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5},
                  health_check_period_s=10, health_check_timeout_s=30)
class Preprocessor:
    """The compiled workflow: queries -> encoded batch -> Recommender -> raw ids.

    Versions: it keeps the Encoders of the last two bundle versions, as each Recommender keeps their
    Scorers. A request is encoded with the newest; a Recommender lacking it loads it on demand, and
    if that fails (a CUDA OOM, the exported scorer failing) answers VersionUnavailable with the
    versions it has. The request is then encoded again with the newest version both have (the
    previous one), and this replica keeps answering with it for reload_poll_s before trying the
    newest again (the Recommender's follower retries the load every poll). Meanwhile /healthz is a
    503 naming both versions: the service answers, but not with the version the reload announced.
    """

    async def __init__(self, bundle_dir: str, data: DataConfig, recommender: DeploymentHandle,
                       registry: DeploymentHandle, config: ServeConfig) -> None:
        from serve.engine import Encoder

        self._config = config
        self._recommender = recommender
        self._states: VersionedStates[Encoder] = VersionedStates(bundle_dir, Encoder.loader(config.default_k),
                                                                 keep=2, data=data)
        self._fallback: tuple[str, float] | None = None  # (version, monotonic time to try the newest again)
        await self._states.sync_to_disk()
        self._follow = asyncio.create_task(
            self._states.follow(lambda: registry.current.remote(), config.reload_poll_s))

    def _serving(self) -> Encoder:
        """The newest Encoder, or the one of a fallback still in force."""
        if self._fallback is not None:
            version, until = self._fallback
            encoder = self._states.get(version)
            if encoder is not None and time.monotonic() < until:
                return encoder
            self._fallback = None
        return self._states.latest

    async def recommend(self, queries: list[Query]) -> Recommendations | Rejection:
        encoder = self._serving()
        for _ in range(3):
            request = await asyncio.to_thread(encoder.encode, queries)
            if isinstance(request, Rejection):
                return request
            result = await call(self._recommender.score, request, what="Recommender")
            if isinstance(result, Rejection):
                return result
            if isinstance(result, ScoringResult):
                return Recommendations(encoder.version, encoder.decode(queries, result), result.batch_requests)
            common = await self._common_encoder(encoder, result)
            if common is None:
                break
            encoder = common
        return Rejection(503, "a model reload is in progress (replicas disagree on the bundle version); retry")

    async def _common_encoder(self, tried: Encoder, missing: VersionUnavailable) -> Encoder | None:
        """The newest Encoder, other than `tried`, of a version the Recommender has (None: none)."""
        if missing.available and self._states.get(missing.available[0]) is None:
            try:  # the Recommender is ahead (this replica missed a reload): follow the directory
                await self._states.sync_to_disk()
            except BUNDLE_LOAD_ERRORS as exc:
                log.warning("Preprocessor could not load %s (%r)", self._states.bundle_dir, exc)
        common = next((e for e in self._states.states
                       if e.version in missing.available and e.version != tried.version), None)
        if common is not None and common is not self._states.latest:
            if self._fallback is None:
                log.warning("a Recommender has no model for %s (it has %s): answering with %s for now",
                            missing.requested, missing.available, common.version)
            self._fallback = (common.version, time.monotonic() + self._config.reload_poll_s)
        return common

    async def model_info(self) -> ModelInfo:
        info = self._serving().info(self._config)
        stats = await call(self._recommender.stats, what="Recommender")
        return info.model_copy(update={"batching": None if isinstance(stats, Rejection) else stats})

    async def health(self) -> HealthResponse | Rejection:
        loaded = await call(self._recommender.version, what="Recommender")
        if isinstance(loaded, Rejection):
            return loaded
        version, failing = loaded
        newest, serving = self._states.latest.version, self._serving().version
        # Answering with an older version, or a Recommender without the newest that fails to load it.
        if serving != newest or (version != newest and failing):
            return Rejection(503, f"replicas disagree on the bundle version: the Preprocessor has {newest}, a "
                                  f"Recommender {version}; answering with {serving} meanwhile (the replicas' logs "
                                  "say why a load failed)")
        # A Recommender a poll behind (a reload in progress) loads the newest on demand: healthy.
        return HealthResponse(model_version=newest)

    def check_health(self) -> None:
        if self._follow.done():
            raise RuntimeError(f"the bundle follower stopped: {self._follow}")


class ServeBackend:
    """The routes' Backend over deployment handles (lives in the ingress replica)."""

    def __init__(self, preprocessor: DeploymentHandle, registry: DeploymentHandle) -> None:
        self._preprocessor = preprocessor
        self._registry = registry

    async def recommend(self, queries: list[Query]) -> Recommendations | Rejection:
        return await call(self._preprocessor.recommend, queries, what="Preprocessor")

    async def model_info(self) -> ModelInfo | Rejection:
        return await call(self._preprocessor.model_info, what="Preprocessor")

    async def health(self) -> HealthResponse | Rejection:
        return await call(self._preprocessor.health, what="Preprocessor")

    async def reload(self) -> ReloadResponse | Rejection:
        return await call(self._registry.reload, what="BundleRegistry")


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    """The HTTP entry point. Its FastAPI app is built in each replica (`__serve_build_asgi_app__`),
    from the bundle's data config: nothing unpicklable crosses the controller."""

    def __init__(self, data: DataConfig, preprocessor: DeploymentHandle, registry: DeploymentHandle,
                 config: ServeConfig) -> None:
        self._data = data  # the service's, from app_builder: a replica started later must not read a newer one
        self._config = config
        self._backend = ServeBackend(preprocessor, registry)
        self._admin_token = resolve_admin_token(config)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self._backend, self._data, self._config, self._admin_token)


# ------------------------------------------------------------------------------------ builder
class AppArgs(BaseModel):
    """Arguments of `app_builder` (`serve run serve.app:app_builder key=value ...` passes strings;
    they are parsed here). Replica counts left None use the deployment default or the
    autoscaling_config of serve/config.yaml."""

    model_config = ConfigDict(extra="forbid")

    bundle_dir: str = Field(description="a `raytr train` output directory (model bundle)")
    ingress_replicas: int | None = Field(None, ge=1)
    preprocessor_replicas: int | None = Field(None, ge=1)
    recommender_replicas: int | None = Field(None, ge=1)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per Recommender replica (0: CPU)")
    recommender_num_cpus: float = Field(1.0, ge=0)
    preprocessor_num_cpus: float = Field(0.5, ge=0)
    ingress_num_cpus: float = Field(0.5, ge=0)
    default_k: int = Field(ServeConfig.default_k, ge=1)
    max_events_per_session: int = Field(ServeConfig.max_events_per_session, ge=1)
    max_sessions_per_batch: int = Field(ServeConfig.max_sessions_per_batch, ge=1)
    max_body_bytes: int = Field(ServeConfig.max_body_bytes, ge=1)
    max_batch_size: int = Field(ServeConfig.max_batch_size, ge=1)
    batch_wait_timeout_s: float = Field(ServeConfig.batch_wait_timeout_s, ge=0)
    reload_poll_s: float = Field(ServeConfig.reload_poll_s, gt=0)
    admin_token_file: str | None = None
    scorer: Literal["eager", "exported"] = Field(ServeConfig.scorer, description="the model, or its torch.export program")

    def serve_config(self) -> ServeConfig:
        return ServeConfig(
            model_dir=self.bundle_dir, default_k=self.default_k, max_events_per_session=self.max_events_per_session,
            max_sessions_per_batch=self.max_sessions_per_batch, max_body_bytes=self.max_body_bytes,
            max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s,
            reload_poll_s=self.reload_poll_s, admin_token_file=self.admin_token_file, scorer=self.scorer,
        )


# The ServeConfig fields that are AppArgs fields too: all but where to listen and what to serve.
SERVE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ServeConfig)) - {"model_dir", "host", "port"}


def app_options(config: ServeConfig) -> dict[str, Any]:
    """The `AppArgs` a raytr YAML's `serve` section sets (for start_local, next to the bundle, host, port)."""
    return {name: getattr(config, name) for name in SERVE_CONFIG_FIELDS}


def _replicas(count: int | None) -> dict[str, Any]:
    return {} if count is None else {"num_replicas": count}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `args` (see `AppArgs`); validates them before anything starts."""
    opts = AppArgs.model_validate(args)
    config = opts.serve_config()
    # Check here what the replicas will, as the standalone server does: a missing token file or
    # bundle file (say model/model.safetensors), or a default_k above the catalog, is one error naming
    # it, not a deployment failing in a replica. The token itself is read again in each Ingress
    # replica (it never travels in the app's arguments).
    resolve_admin_token(config)
    bundle = Bundle.load(opts.bundle_dir)
    check_default_k(config.default_k, bundle.catalog_size, opts.bundle_dir)
    # And what the replicas do with it, as the registry checks a reload: a truncated weights or
    # category file, or a model of another catalog than the workflow, is a ValueError naming it here,
    # not ~50 s of replicas failing. Imports torch/NVTabular and loads the model once (on the CPU).
    from serve.engine import check_servable

    check_servable(bundle, config.default_k)
    # Every replica serves this data config, whatever the directory holds when autoscaling starts one later.
    data = bundle.data
    registry = BundleRegistry.bind(opts.bundle_dir, data, config.default_k)
    recommender = Recommender.options(
        **_replicas(opts.recommender_replicas),
        max_ongoing_requests=max(64, 2 * opts.max_batch_size),  # >= max_batch_size or batches never fill
        ray_actor_options={"num_cpus": opts.recommender_num_cpus, "num_gpus": opts.num_gpus},
    ).bind(opts.bundle_dir, data, registry, config)
    preprocessor = Preprocessor.options(
        **_replicas(opts.preprocessor_replicas), ray_actor_options={"num_cpus": opts.preprocessor_num_cpus},
    ).bind(opts.bundle_dir, data, recommender, registry, config)
    return Ingress.options(
        **_replicas(opts.ingress_replicas), ray_actor_options={"num_cpus": opts.ingress_num_cpus},
    ).bind(data, preprocessor, registry, config)


# ------------------------------------------------------------------------------------ local helpers
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """Refuse, in one line naming it, an address Serve's HTTP proxy could not listen on here: a port
    out of range, taken by another server, or privileged; a host that is not this machine's."""
    if not 1 <= port <= 65_535:
        raise ValueError(f"port {port}: expected a TCP port from 1 to 65535; choose one with --port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ValueError(f"host {host!r}: {error.strerror}; expected an address of this machine "
                         "(--host, e.g. 127.0.0.1 or 0.0.0.0)") from None
    with socket.socket(family, kind, proto) as probe:
        # As the proxy's server does: connections closed lately (TIME_WAIT) do not block the port,
        # a server listening on it does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            hint = {errno.EADDRINUSE: "another server is listening on it; choose another port with --port",
                    errno.EACCES: "ports below 1024 need privileges; choose another port with --port",
                    errno.EADDRNOTAVAIL: "not an address of this machine; choose another host with --host"}
            raise ValueError(f"cannot serve on {host}:{port}: {error.strerror}; "
                             f"{hint.get(error.errno, 'check --host and --port')}") from None


def wait_until_healthy(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll GET {url}/healthz until 200 (right after `serve.run` routes can 404 for a while)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5.0)
            if response.status_code == 200:
                return response.json()
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f}s (last: {last})")


def start_local(bundle_dir: str, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 180.0,
                **opts: Any) -> str:
    """Serve `bundle_dir` on this machine's Ray (started if needed) and return the base URL once
    /healthz answers. `opts` are `AppArgs` fields (e.g. recommender_replicas=2, num_gpus=1)."""
    from raytr.ray_runtime import ensure_ray

    application = app_builder({"bundle_dir": str(bundle_dir), **opts})
    if _serve_address() is None:  # a running Serve keeps its proxy (and port): nothing is bound again
        check_port(host, port)  # before Ray starts: the proxy's bind failure would be a remote traceback
    ensure_ray()
    running = _serve_address()  # this process's, or the cluster's in RAY_ADDRESS
    if running is not None and not same_address(running, (host, port)):
        # serve.start would keep the running proxy's address (with a warning), and /healthz on the
        # address asked for would never answer.
        raise ValueError(f"Ray Serve already runs in this Ray cluster with its HTTP proxy on {running[0]}:"
                         f"{running[1]}, which is fixed while it runs; serve there (--host {running[0]} --port "
                         f"{running[1]}) or shut it down first (`serve shutdown`)")
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    except RayError as error:  # taken between the check and the proxy's bind
        if "Failed to bind" not in str(error):
            raise
        stop_local()  # the Serve instance this call started, left without its proxy
        raise ValueError(f"cannot serve on {host}:{port}: the address is already in use; choose another "
                         "port with --port") from None
    url = f"http://{host}:{port}"
    wait_until_healthy(url, timeout_s)
    log.info("serving %s at %s", bundle_dir, url)
    return url


def same_address(listening: tuple[str, int], asked: tuple[str, int]) -> bool:
    """Whether a proxy listening on `listening` answers at `asked`: the same port, and a wildcard
    host (0.0.0.0, ::) or one naming the same address (localhost and 127.0.0.1)."""
    (listen_host, listen_port), (host, port) = listening, asked
    if listen_port != port:
        return False
    if listen_host in ("0.0.0.0", "::") or listen_host == host:
        return True
    try:
        return socket.gethostbyname(listen_host) == socket.gethostbyname(host)
    except OSError:
        return False


def _serve_address() -> tuple[str, int] | None:
    """The host and port of the HTTP proxies Serve runs already in this process's Ray cluster
    (`serve.start` then keeps them, whatever it is asked), or None."""
    if not (ray.is_initialized() and serve.status().proxies):
        return None
    from ray.serve.context import _get_global_client  # Ray's own: the running controller's HTTP options

    options = _get_global_client().http_config
    return options.host, int(options.port)


def stop_local() -> None:
    """Stop Ray Serve (all applications and its HTTP proxy); Ray itself keeps running."""
    if ray.is_initialized():
        serve.shutdown()


__all__ = ["APP_NAME", "AppArgs", "app_builder", "app_options", "check_port", "free_port", "same_address", "start_local",
           "stop_local", "wait_until_healthy"]

