"""The deployment files: cluster.yaml, docker/Dockerfile, .dockerignore, k8s/rayjob.yaml, docs/cluster.md.

Fast and offline: no Ray cluster starts, no docker build runs. What is checked:
- cluster.yaml passes the validation `ray up` runs (Ray's prepare_config + validate_config, the
  JSON schema in ray/autoscaler/ray-schema.json), minus the AWS API calls, and has the node types
  docs/cluster.md promises;
- the Dockerfile installs what the Makefile's `install` recipe installs, from the same requirement
  files, in the same order, with the same --no-deps flags, on the Ray/Python that base.txt pins;
- the RayJob manifest is a ray.io/v1 RayJob running jobs/train.py on an autoscaling GPU group.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
DOCS = ROOT / "docs" / "cluster.md"
MAKEFILE = ROOT / "Makefile"
BASE_REQS = ROOT / "requirements" / "base.txt"


# ----------------------------------------------------------------------------- helpers


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d is not None]
    assert len(docs) == 1, f"k8s/rayjob.yaml: expected one document, got {len(docs)}"
    return docs[0]


def _pin(name: str) -> str:
    """The exact version requirements/base.txt pins for `name` (`name[extras]==X`)."""
    for line in BASE_REQS.read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([\w.]+)\s*(#.*)?$", line.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"requirements/base.txt pins no exact version of {name}")


_SEPARATORS = {"&&", "||", ";", "|", ";;", "(", ")"}


def _pip_installs(shell: str) -> list[dict]:
    """Every `pip install ...` in a shell command line, normalised.

    Returns dicts with: reqs (-r files), pkgs (positional requirements), no_deps, editable,
    constraints (-c files), index_url.
    """
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    tokens = list(lexer)
    out = []
    for i, tok in enumerate(tokens):
        if tok != "install" or i == 0 or not re.fullmatch(r"(.*/)?pip3?", tokens[i - 1]):
            continue
        step = {"reqs": [], "pkgs": [], "no_deps": False, "editable": False, "constraints": [], "index_url": None}
        args = []
        for t in tokens[i + 1 :]:
            if t in _SEPARATORS:
                break
            args.append(t)
        it = iter(args)
        for a in it:
            if a in ("-r", "--requirement"):
                step["reqs"].append(next(it))
            elif a in ("-c", "--constraint"):
                step["constraints"].append(next(it))
            elif a in ("-i", "--index-url"):
                step["index_url"] = next(it)
            elif a == "--no-deps":
                step["no_deps"] = True
            elif a in ("-e", "--editable"):
                step["editable"] = True
                step["pkgs"].append(next(it))
            elif a.startswith("-"):
                continue  # -q, -U, ...: output/upgrade flags do not change what is installed
            else:
                step["pkgs"].append(a)
        out.append(step)
    return out


def _makefile_install_steps() -> list[dict]:
    """The pip installs of the Makefile's stamp (`make install`) recipe, in order."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    steps = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        cmd = line.strip().replace("$(BIN)/", "")
        if not cmd.startswith("#"):
            steps += _pip_installs(cmd)
    assert steps, "no pip install found in the Makefile's install recipe"
    return steps


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    joined, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            if not buf:
                continue
            if line.startswith("#"):  # a comment inside a continued instruction is dropped by docker
                continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            joined.append(buf.strip())
        buf = ""
    instructions = []
    for text in joined:
        word, _, rest = text.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def _dockerfile_steps() -> list[tuple[str, dict]]:
    """(RUN command, pip install step) for every pip install of the Dockerfile, in order."""
    return [(args, step) for ins, args in _dockerfile_instructions() if ins == "RUN" for step in _pip_installs(args)]


def _key(step: dict) -> tuple:
    return (tuple(step["reqs"]), tuple(step["pkgs"]), step["no_deps"], step["editable"])


# ----------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster()
    # What `ray up` does before it talks to AWS (ray.autoscaler._private.commands._bootstrap_config):
    # merge with the provider's defaults.yaml, merge setup commands, check docker, fill per-type
    # min/max, then the JSON-schema validation. Unknown keys or wrong types fail here.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # Resources are explicit for every type, so validation does not depend on AWS's auto-detection.
    for name, node_type in raw["available_node_types"].items():
        assert "resources" in node_type, f"{name}: resources must be set explicitly"


def test_cluster_node_types_match_the_docs():
    cfg = _cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    # The head runs no work: no CPU advertised to the scheduler, no GPU, never scaled.
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0

    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    cpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) == 0}
    assert len(gpu) == 1 and len(cpu) == 1, f"expected one GPU and one CPU worker type, got {sorted(workers)}"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert t["max_workers"] >= 1, f"{name} must be able to scale up"
        assert t["resources"].get("CPU", 0) > 0, f"{name} must offer CPUs"
    # Every worker type can reach its own max at the same time.
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0

    # docs/cluster.md's table states each type's range and resources; keep them in step.
    docs = DOCS.read_text()
    for name, t in types.items():
        row = next((line for line in docs.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"docs/cluster.md has no table row for node type {name}"
        count = "1" if name == cfg["head_node_type"] else f"{t['min_workers']}..{t['max_workers']}"
        assert f"| {count} " in row, f"docs/cluster.md row for {name} should say {count}: {row}"
        res = ", ".join(f"{k}: {v}" for k, v in t["resources"].items())
        assert f"`{res}`" in row, f"docs/cluster.md row for {name} should say `{res}`: {row}"
        assert t["node_config"]["InstanceType"] in row
    assert f"idle_timeout_minutes: {cfg['idle_timeout_minutes']}" in docs


def test_cluster_docker_and_start_commands():
    cfg = _cluster()
    docker = cfg["docker"]
    assert docker["image"] and docker["container_name"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start
    # The autoscaler on the head reads the resolved config from this path.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "$RAY_HEAD_IP" in " ".join(cfg["worker_start_ray_commands"])
    # Head setup keeps the defaults' boto3 install (the autoscaler launches EC2 instances with it).
    assert "head_setup_commands" not in cfg
    # The dev sync installs the synced copy without touching the image's pinned dependencies.
    for cmd in cfg.get("setup_commands", []):
        for step in _pip_installs(cmd):
            assert step["no_deps"], f"setup command would re-resolve dependencies: {cmd}"
    assert (
        _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        == docker["image"]
    ), "cluster.yaml and k8s/rayjob.yaml should run the same image"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_what_the_makefile_installs():
    make_steps = _makefile_install_steps()
    docker_steps = _dockerfile_steps()

    def is_torch(step):
        return step["pkgs"] == ["$TORCH_PIN"]

    def is_gpu(step):
        return step["reqs"] == ["requirements/gpu.txt"]

    # The Makefile's steps, same order, same files, same --no-deps / -e flags.
    shared = [s for _, s in docker_steps if not is_torch(s) and not is_gpu(s)]
    assert [_key(s) for s in shared] == [_key(s) for s in make_steps]
    # Sanity on what that means (so a Makefile rewrite cannot make both wrong together).
    keys = [_key(s) for s in make_steps]
    assert keys[0] == ((), ("pip<25",), False, False)
    assert ((("requirements/base.txt",), (), False, False)) in keys
    assert ((("requirements/merlin.txt",), (), True, False)) in keys
    assert keys[-1][1] == (".",) and keys[-1][2], "the package itself goes in last, with --no-deps"

    order = [
        "pip" if s["pkgs"] == ["pip<25"] else "torch" if is_torch(s) else (s["reqs"] or s["pkgs"])[0]
        for _, s in docker_steps
    ]
    assert order.index("pip") < order.index("torch") < order.index("requirements/base.txt")
    assert order.index("requirements/merlin.txt") < order.index("requirements/gpu.txt") < order.index(".")


def test_dockerfile_torch_is_the_cuda_build_of_the_pinned_version():
    instructions = _dockerfile_instructions()
    (run, torch_step) = next((r, s) for r, s in _dockerfile_steps() if s["pkgs"] == ["$TORCH_PIN"])
    # The version comes from base.txt, the wheel from the index named by a build arg.
    assert "grep -E '^torch==' requirements/base.txt" in run
    assert torch_step["index_url"] == "$TORCH_INDEX_URL"
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    # No second, hard-coded torch version anywhere.
    assert not any(re.search(r"torch==\d", a) for _, a in instructions)
    _pin("torch")  # base.txt does pin it exactly, so the grep finds one line


def test_dockerfile_base_image_matches_the_pinned_stack():
    instructions = _dockerfile_instructions()
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    base = next(a for ins, a in instructions if ins == "FROM")
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
    image, _, tag = base.partition(":")
    assert image == "rayproject/ray"
    assert tag.startswith(f"{_pin('ray')}-py311-"), f"{base}: Ray/Python should match requirements/base.txt"
    # Base image CUDA == torch index CUDA (an older CUDA on LD_LIBRARY_PATH can shadow torch's libs).
    assert tag.rsplit("-", 1)[-1] == args["TORCH_INDEX_URL"].rsplit("/", 1)[-1]


def test_dockerfile_cudf_is_optional():
    instructions = _dockerfile_instructions()
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    assert args["WITH_CUDF"] == "0"
    run, step = next((r, s) for r, s in _dockerfile_steps() if s["reqs"] == ["requirements/gpu.txt"])
    assert '"$WITH_CUDF" = "1"' in run
    assert step["constraints"], "cuDF must not silently replace the pinned stack"


def test_dockerignore_keeps_local_state_out():
    entries = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for needed in (".venv", ".git", "runs/", "data/"):
        assert needed in entries, f".dockerignore should exclude {needed}"


# ----------------------------------------------------------------------------- KubeRay


def test_rayjob_manifest():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    assert argv[argv.index("--config") + 1] == "configs/synthetic.yaml"
    assert not set(argv) & {"&&", ";", "||", "|"}, "KubeRay splices the entrypoint into a shell line"
    # Relative paths resolve against the repo baked into the image.
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert "WORKDIR /app" in DOCKERFILE.read_text()

    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pin("ray")
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})

    (gpu_group,) = cluster["workerGroupSpecs"]
    assert gpu_group["minReplicas"] == 0 and gpu_group["replicas"] == 0
    assert gpu_group["maxReplicas"] >= 1
    (worker,) = gpu_group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["image"] == head["template"]["spec"]["containers"][0]["image"]


def test_docs_show_the_whole_pipeline():
    text = DOCS.read_text()
    for cmd in (
        "docker build -f docker/Dockerfile",
        "ray up cluster.yaml",
        "ray job submit --working-dir .",
        "jobs/prepare.py",
        "jobs/train.py",
        "jobs/evaluate.py",
        "jobs/incremental.py",
        "serve deploy serve/config.yaml",
        "ray down cluster.yaml",
        "k8s/rayjob.yaml",
    ):
        assert cmd in text, f"docs/cluster.md should show `{cmd}`"
    assert "kubectl apply -f k8s/rayjob.yaml" in (ROOT / "k8s" / "README.md").read_text()
