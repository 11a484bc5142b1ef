"""The `jobs/*.py` entry points, and `ray job submit` of a training job to a real Ray head.

The submit test starts its own head with `ray start --head --block` in a subprocess, because the job
API needs a dashboard and the shared test cluster has none. It must not disturb that shared
in-process cluster (alive during the test: the prepared data comes from it) nor any other Ray
instance on the machine, so it never runs `ray stop` (which kills every local Ray process) and
isolates the head instead:
    --temp-dir         its own short directory: its sessions, sockets and `ray_current_cluster`
                       file live there, so `ray.init()` elsewhere never discovers this head;
    ports              every listening port picked free (GCS, dashboard, dashboard agent, client);
    auth token         Ray 2.60 enables token auth on new clusters: a fresh token in the temp dir
                       (RAY_AUTH_TOKEN_PATH + RAY_AUTH_MODE=token) for the head and the job CLI,
                       leaving ~/.ray/auth_token alone;
    shutdown           SIGTERM to `ray start --block` (it stops the processes it started), then
                       SIGKILL to its process group and to any process still naming the temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from raytr import storage
from raytr.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's bin: python, ray
JOBS = ("prepare", "train", "evaluate", "incremental")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", JOBS)
def test_job_entry_point_help_exits_0(name):
    proc = subprocess.run([sys.executable, f"jobs/{name}.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: raytr {name}"), proc.stdout
    assert "--data" in proc.stdout or name == "prepare"


def test_job_entry_point_bad_arguments_exit_nonzero():
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/synthetic.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "required: --data, --output" in proc.stderr


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without the token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {timeout} s")


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    import psutil

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # start_new_session: the group is this head's alone
    except ProcessLookupError:
        pass
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.info["cmdline"] and any(temp_dir in part for part in proc.info["cmdline"]):
                proc.kill()
        except psutil.Error:
            pass


@contextlib.contextmanager
def ray_head(log_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A separate Ray head for job submission: yields (dashboard URL, environment for the `ray` CLI)."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0")
    # The ports are free when chosen and bound by `ray start` later; another process (the session's
    # Ray cluster starts workers all the time) may take one in between: start again on new ones.
    for attempt in range(3):
        gcs, dashboard, agent, client = _free_ports(4)
        url = f"http://127.0.0.1:{dashboard}"
        with open(log_path, "a") as log:
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                 f"--ray-client-server-port={client}", "--num-cpus=2", "--include-dashboard=true",
                 f"--temp-dir={temp_dir}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_dashboard(url, head, timeout=90)
            break
        except (RuntimeError, TimeoutError):
            _stop_head(head, temp_dir)
            if attempt == 2:
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise
    try:
        yield url, env
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_ray_job_submit_trains_a_model_bundle(prepared_dir, tmp_path, request, where):
    """The same job with a local output directory, and with an s3:// one (the bucket on the test's
    local S3 server, reached by the job's Ray cluster through the AWS_* variables it inherits)."""
    output = str(tmp_path / "model") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/model"
    job_id = f"raytr-test-{uuid.uuid4().hex[:8]}"
    with ray_head(tmp_path / "ray-start.log") as (url, env):
        submit = ray_cli(
            "job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", ".",
            "--", "python", "jobs/train.py", "--config", "configs/synthetic.yaml", "--data", str(prepared_dir),
            "--output", output, "--epochs", "1", "--set", "training.num_workers=1",
            "--set", "training.disable_tqdm=true", env=env, timeout=200)
        status = ray_cli("job", "status", "--address", url, job_id, env=env, timeout=60)
    logs = submit.stdout[-6000:] + submit.stderr[-3000:]
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, f"{status.stdout}{status.stderr}\n{logs}"
    assert submit.returncode == 0, logs

    # The job printed the training summary and wrote a complete model bundle.
    assert f'"model_dir": "{storage.join(output, "model")}"' in submit.stdout
    bundle = Bundle.load(output)
    assert (bundle.model_dir / "model.safetensors").is_file() and bundle.workflow_dir.is_dir()
    result = json.loads(storage.read_text(storage.join(output, "train_result.json")))
    assert result["training_arguments"]["launcher"] == "ray" and result["training_arguments"]["num_workers"] == 1
    assert result["training_arguments"]["num_train_epochs"] == 1
    assert 0.0 < result["metrics"]["eval_ndcg@10"] <= 1.0
    # trained by Ray Train on the head, its checkpoints under the output
    assert storage.list_files(storage.join(output, "ray_results", result["run_name"]), suffixes=("model.safetensors",))
