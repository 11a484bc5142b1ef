"""The heavy half of the service: encode sessions, score them, decode the answer (no Ray, no HTTP).

The Ray Serve app (serve/app.py) runs the Encoder in the Preprocessor deployment and the Scorer in
the Recommender deployment; `LocalBackend` runs both in one process (serve/standalone.py, tests).
Hand-offs and version bookkeeping are in serve/core.py.

Shape legend: N = sessions scored together, T = max sequence length, V = item cardinality.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import torch

from raytr.bundle import Bundle, read_data_config
from raytr.config import ServeConfig
from raytr.features import SessionBatch
from raytr.models import SessionModel
from raytr.models.export import ExportedScorer
from raytr.models.head import returnable, top_k
from raytr.online import OnlineInputError, OnlinePreprocessor
from serve.api import (
    ITEM_FIELD,
    TIMESTAMP_FIELD,
    FeatureSummary,
    HealthResponse,
    ModelInfo,
    RecommendResponse,
    ReloadResponse,
    ScoredItem,
    api_field,
)
from serve.core import (
    BUNDLE_LOAD_ERRORS,
    Query,
    Recommendations,
    Rejection,
    ScoringRequest,
    ScoringResult,
    VersionedStates,
    cannot_reload,
    check_default_k,
    reload_response,
    unprocessable,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ encoder
class Encoder:
    """One bundle's preprocessing: queries -> `ScoringRequest`, encoded ids -> raw ids. With
    `default_k`, a bundle with fewer items is refused (`BundleRefused`): every request without k
    would be a 422."""

    def __init__(self, bundle: Bundle, default_k: int | None = None) -> None:
        self.bundle = bundle
        self.version = bundle.version
        self.online = OnlinePreprocessor.from_bundle(bundle)  # checks the workflow against the model's spec
        if default_k is not None:
            check_default_k(default_k, self.online.catalog_size, bundle.root)

    @classmethod
    def loader(cls, default_k: int) -> Callable[[Bundle], "Encoder"]:
        return lambda bundle: cls(bundle, default_k)

    def encode(self, queries: Sequence[Query]) -> ScoringRequest | Rejection:
        catalog = self.online.catalog_size
        for q in queries:
            if q.k > catalog:
                return unprocessable([*q.loc, "k"], f"k={q.k} is larger than the catalog ({catalog} items): "
                                     f"ask for at most {catalog}", "less_than_equal", q.k)
        try:
            encoded = self.online.encode_sessions([q.events for q in queries], timestamp_unit="s")
        except OnlineInputError as exc:
            return unprocessable(self._error_loc(queries, exc.loc), str(exc), value=exc.value)
        return ScoringRequest(
            version=self.version,
            batch=encoded.batch,
            k=[q.k for q in queries],
            exclude=[ids if q.exclude_seen else None for q, ids in zip(queries, encoded.item_ids)],
        )

    def _error_loc(self, queries: Sequence[Query], loc: tuple) -> list[str | int]:
        if not loc:
            return ["body"]
        prefix = list(queries[loc[0]].loc) if isinstance(loc[0], int) and loc[0] < len(queries) else ["body"]
        rest: list[str | int] = ["events", *loc[1:2]] if len(loc) > 1 else ["events"]
        if len(loc) > 2:
            rest.append(api_field(str(loc[2]), self.online.config))
        return prefix + rest

    def decode(self, queries: Sequence[Query], result: ScoringResult) -> list[RecommendResponse]:
        out = []
        for q, ids, scores in zip(queries, result.ids, result.scores):
            raw = self.online.decode_items(ids)
            items = [ScoredItem(item_id=i, score=s) for i, s in zip(raw, scores)]
            out.append(RecommendResponse(session_id=q.session_id, items=items, model_version=self.version))
        return out

    def info(self, serve_config: ServeConfig) -> ModelInfo:
        spec, data = self.online.spec, self.online.config
        metrics = self.bundle.train_result.get("metrics", {})
        return ModelInfo(
            model_version=self.version,
            run_name=self.bundle.train_result.get("run_name"),
            item_cardinality=spec.item_cardinality,
            catalog_size=self.online.catalog_size,
            max_sequence_length=spec.max_sequence_length,
            max_events_per_session=serve_config.max_events_per_session,
            event_fields=[ITEM_FIELD, TIMESTAMP_FIELD, *data.categorical, *data.continuous],
            features=FeatureSummary(categorical=dict(spec.categorical), continuous=list(spec.continuous)),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )


def check_servable(bundle: Bundle, default_k: int) -> None:
    """Do once what every replica will do with `bundle`, so that a bundle they cannot serve is one
    error naming the file instead of replicas failing: compile the workflow against the model's spec
    and check the catalog holds `default_k` items (each Preprocessor), load the weights into the
    model's config (each Recommender). Run by app_builder before Serve starts and by the registry
    before it announces a reload. Costs one model load on the CPU (the weights' size in memory)."""
    Encoder(bundle, default_k)  # a damaged category file or another catalog: a ValueError naming it
    SessionModel.load(bundle.model_dir)  # a damaged or mismatched model.safetensors: a ValueError naming it


# ------------------------------------------------------------------------------------ scorer
def concat_batches(batches: Sequence[SessionBatch]) -> SessionBatch:
    """Stack [n_i, T] batches into one [N, T] batch (same columns, same T)."""
    first = batches[0]
    if len(batches) == 1:
        return first
    return SessionBatch(
        item_ids=torch.cat([b.item_ids for b in batches]),
        categorical={k: torch.cat([b.categorical[k] for b in batches]) for k in first.categorical},
        continuous={k: torch.cat([b.continuous[k] for b in batches]) for k in first.continuous},
    )


class Scorer:
    """One bundle's model: encoded sessions -> top-k encoded ids and scores."""

    def __init__(self, bundle: Bundle, device: str = "cpu", kind: str = "eager") -> None:
        self.version = bundle.version
        self.device = torch.device(device)
        self.model = SessionModel.load(bundle.model_dir, map_location=self.device)
        # serve.scorer: the model itself, or its torch.export program (same scores, no Python model code).
        self.score_next = ExportedScorer.from_model(self.model) if kind == "exported" else self.model.score_next

    @classmethod
    def loader(cls, device: str, kind: str = "eager") -> Callable[[Bundle], "Scorer"]:
        return lambda bundle: cls(bundle, device, kind)

    def score(self, requests: Sequence[ScoringRequest], batch_requests: int | None = None) -> list[ScoringResult]:
        """Score all sessions of `requests` in one model call. Each session gets its own k, capped
        at the items left after its exclusions and its -inf/NaN scores."""
        batch = concat_batches([r.batch for r in requests]).to(self.device)
        scores = self.score_next(batch).float()  # [N, V]
        N, V = scores.shape
        exclude = torch.zeros(N, V, dtype=torch.bool, device=self.device)
        ks = []
        row = 0
        for request in requests:
            for k, seen in zip(request.k, request.exclude):
                if seen is not None and len(seen):
                    exclude[row, torch.tensor(seen, device=self.device)] = True
                ks.append(k)
                row += 1
        # Items scored -inf or NaN are never recommended (top_k skips them): a row may get fewer than k.
        available = returnable(scores, exclude).sum(dim=1).cpu()  # [N]
        k_eff = torch.minimum(torch.tensor(ks), available)
        ids: list[list[int]] = [[] for _ in range(N)]
        values: list[list[float]] = [[] for _ in range(N)]
        for k in k_eff.unique().tolist():
            if k <= 0:
                continue
            rows = (k_eff == k).nonzero().flatten()
            top_ids, top_scores = top_k(scores[rows.to(self.device)], int(k), exclude[rows.to(self.device)])
            for j, r in enumerate(rows.tolist()):
                ids[r], values[r] = top_ids[j].tolist(), top_scores[j].tolist()
        results, start = [], 0
        for request in requests:
            stop = start + len(request)
            results.append(ScoringResult(self.version, ids[start:stop], values[start:stop],
                                         batch_requests or len(requests)))
            start = stop
        return results


# ------------------------------------------------------------------------------------ in-process backend
@dataclass
class _Pair:
    encoder: Encoder
    scorer: Scorer

    @property
    def version(self) -> str:
        return self.encoder.version


def _load_pair(bundle: Bundle, config: ServeConfig, device: str) -> _Pair:
    return _Pair(Encoder(bundle, config.default_k), Scorer(bundle, device, config.scorer))


@dataclass
class LocalBackend:
    """Preprocessing and model in this process (serve/standalone.py, tests without HTTP).

    `recommend()` is the whole service for a list of queries; reload loads the new bundle next to
    the old one and swaps when it is ready.
    """

    bundle_dir: str
    serve_config: ServeConfig = field(default_factory=ServeConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.data = read_data_config(self.bundle_dir)
        self._states: VersionedStates[_Pair] = VersionedStates(
            self.bundle_dir, lambda b: _load_pair(b, self.serve_config, self.device), keep=1, data=self.data)
        self._states.load_sync()

    def recommend_sync(self, queries: Sequence[Query]) -> Recommendations | Rejection:
        pair = self._states.latest
        request = pair.encoder.encode(queries)
        if isinstance(request, Rejection):
            return request
        [result] = pair.scorer.score([request])
        return Recommendations(pair.version, pair.encoder.decode(queries, result), 1)

    async def recommend(self, queries: Sequence[Query]) -> Recommendations | Rejection:
        return await asyncio.to_thread(self.recommend_sync, queries)

    async def model_info(self) -> ModelInfo | Rejection:
        return self._states.latest.encoder.info(self.serve_config)

    async def health(self) -> HealthResponse | Rejection:
        return HealthResponse(model_version=self._states.latest.version)

    async def reload(self) -> ReloadResponse | Rejection:
        """Load and swap in the directory's bundle, refused (409) as the Serve app's registry refuses it."""
        previous = self._states.latest
        try:
            state = await self._states.sync_to_disk()
        except BUNDLE_LOAD_ERRORS as exc:
            return cannot_reload(self.bundle_dir, exc)
        return reload_response(previous.version, state.version)
