"""Shared test fixtures: one Ray cluster, one tiny synthetic dataset, one `prepare` run.

Everything expensive is session-scoped and shared, so the suite starts Ray once and runs
`raytr prepare` on the synthetic data once (~15 s on 2 cores):

    ray_cluster      the one Ray cluster of the test session (4 logical CPUs, no dashboard).
                     Never start another one: CI has 2 cores. Tests that use it get the `ray`
                     marker automatically (mark them explicitly anyway).
    synth_config     the `SynthConfig` of the tiny dataset (1,500 sessions, 300 items, 4 days).
    raw_dir          its raw events, parquet partitioned by event day (day=1/part-0.parquet, ...).
    raw_events       the same events as a DataFrame (shared: copy before modifying).
    data_config      the `data` section of configs/synthetic.yaml.
    prepared_dir     `raw_dir` prepared with `data_config` (sessions/, workflow/, schema.*,
                     prepare.json). Shared and read-only: copy it before writing into it.
    prepare_summary  the `PrepareSummary` that run returned.
    prepared_schema  the Merlin schema read from `prepared_dir`.
    prepared_spec    the `FeatureSpec` derived from it.
    shared_data      ../shared/data/yoochoose-rsc15-100k (skips when absent).
    s3_bucket        an empty bucket on a local S3 server (moto), as an "s3://..." URL; the Ray
                     cluster's processes get its endpoint and dummy credentials from the start.

Tests marked `gpu` are skipped when torch sees no CUDA device.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data" / "yoochoose-rsc15-100k"

# The frozen Merlin 23.08 stack warns a lot on current pandas/dask (FutureWarning, UserWarning,
# DeprecationWarning). Ray workers and CLI subprocesses inherit this environment variable; the
# test process itself is filtered in pytest_configure below.
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning")

# Without a GPU, Triton kernels (raytr.models.triton_loss) run in Triton's interpreter on CPU tensors.
# It is chosen when triton is imported, so the variable is set before any test imports it (and Ray
# workers, started later, inherit it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The local S3 server of `s3_bucket` credentials; its address comes from the server itself.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "raytr-test",
    "AWS_SECRET_ACCESS_KEY": "raytr-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_configure(config: pytest.Config) -> None:
    for module in ("merlin", "nvtabular", "dask", "distributed", "numba"):
        for category in ("FutureWarning", "UserWarning", "DeprecationWarning"):
            config.addinivalue_line("filterwarnings", f"ignore::{category}:{module}.*")
    # Ray's own deprecated DataContext fields (the regex "ray\." does not match raytr's modules)
    config.addinivalue_line("filterwarnings", r"ignore::DeprecationWarning:ray\..*")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = None
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False"))


@pytest.fixture(scope="session")
def _s3_env():
    """The test session's local S3 server (moto), started before Ray so that every Ray worker (tasks,
    Ray Data, Ray Train workers) reaches it as a real deployment would, through AWS_* variables:
    {variable: value}. It listens on a port it binds itself (0): a port picked free and bound later
    had been taken meanwhile by one of Ray's processes, and every S3 test then hung."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", **S3_CREDENTIALS}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster(_s3_env):
    """The one Ray cluster of the test session; shut down at the end.

    num_cpus=4 on 2 real cores: Ray Train's workers plus Ray Data's read tasks need more logical
    CPUs than the machine has, or `fit()` starves (see shared/notes/stack.md)."""
    import ray

    if ray.is_initialized():  # a caller (e.g. a notebook running pytest) already connected
        yield ray.get_runtime_context()
        return
    context = ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": _s3_env})
    try:
        yield context
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def synth_config():
    from raytr.data.synth import SynthConfig

    return SynthConfig(sessions=1_500, items=300, days=4, seed=7)


@pytest.fixture(scope="session")
def _raw(synth_config, tmp_path_factory):
    from raytr.data.synth import synthesize

    path = tmp_path_factory.mktemp("raw") / "events"
    frame = synthesize(synth_config, path)
    return path, frame


@pytest.fixture(scope="session")
def raw_dir(_raw) -> Path:
    """Raw synthetic events: `day=N/part-0.parquet`, partitioned by the day of each event."""
    return _raw[0]


@pytest.fixture(scope="session")
def raw_events(_raw):
    """The raw events as written (shared between tests: copy before modifying)."""
    return _raw[1]


@pytest.fixture(scope="session")
def data_config():
    from raytr.config import load_config

    return load_config(REPO_ROOT / "configs" / "synthetic.yaml").data


@pytest.fixture(scope="session")
def _prepared(ray_cluster, raw_dir, data_config, tmp_path_factory):
    from raytr.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "synthetic"
    summary = prepare(data_config, raw_dir, out)
    return out, summary


@pytest.fixture(scope="session")
def prepared_dir(_prepared) -> Path:
    """The prepared synthetic dataset (read-only: copy it before writing into it)."""
    return _prepared[0]


@pytest.fixture(scope="session")
def prepare_summary(_prepared):
    return _prepared[1]


@pytest.fixture(scope="session")
def prepared_schema(prepared_dir):
    from raytr.data.schema import load_schema

    return load_schema(prepared_dir)


@pytest.fixture(scope="session")
def prepared_spec(prepared_schema):
    from raytr.data.schema import feature_spec

    return feature_spec(prepared_schema)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The YOOCHOOSE sample (TSV files named .csv), present only where ../shared is mounted."""
    path = SHARED_DATA.resolve()
    if not path.is_dir() or not any(path.glob("*.csv")):
        pytest.skip(f"YOOCHOOSE sample not found at {path} (../shared is not mounted here)")
    return path


@pytest.fixture(scope="session")
def _s3_server(_s3_env):
    """The AWS_* variables of the local S3 server in this process's environment, for the session."""
    saved = {k: os.environ.get(k) for k in _s3_env}
    os.environ.update(_s3_env)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture
def s3_bucket(_s3_server) -> str:
    """A new, empty bucket on the test session's local S3 server."""
    import fsspec

    name = f"raytr-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
