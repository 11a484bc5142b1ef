"""The serving stack: routes and validation in-process (fast), then the Ray Serve app over real
HTTP (answers, validation, batching, reload, a replica killed).

Fast tests build a bundle without Ray (a workflow fitted in-process, an untrained model) and call
the standalone FastAPI app through Starlette's TestClient; the routes are the same code the Serve
ingress runs. The Serve tests share one bundle (trained a few steps on the shared prepared data)
and one `serve.run` with two Recommender replicas; they run in file order and the destructive ones
(reload, kill) come last. serve/config.yaml is checked against Ray's own schema without a cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token"


# ------------------------------------------------------------------------------------ config file
def test_config_yaml_parses_with_rays_schema_and_our_args():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    raw = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    [app] = config.applications
    assert app.import_path == "serve.app:app_builder"
    AppArgs.model_validate(app.args)  # the builder accepts the args
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "Preprocessor", "Recommender", "BundleRegistry"}
    for name in ("Preprocessor", "Recommender"):
        scaling = deployments[name].autoscaling_config
        assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] >= scaling["min_replicas"]
        assert "target_ongoing_requests" in scaling
    # Serve replaces what app_builder's .options() set with the file's values (ray_actor_options
    # as a whole dict), so the file must leave those to the args.
    set_by_args = {"Ingress": {"ray_actor_options"}, "Preprocessor": {"ray_actor_options"},
                   "Recommender": {"ray_actor_options", "max_ongoing_requests"}}
    for entry in raw["applications"][0]["deployments"]:
        assert not set(entry) & set_by_args.get(entry["name"], set()), entry
    assert AppArgs.model_validate(app.args).num_gpus == 0
    assert app.runtime_env["working_dir"]


def test_a_raytr_yaml_serve_section_reaches_the_app(tmp_path, monkeypatch):
    """Every serve setting of the YAML is an app argument, and `raytr serve --config` passes them."""
    import raytr.cli
    import serve.app
    from raytr.config import ServeConfig, load_config
    from serve.app import SERVE_CONFIG_FIELDS, AppArgs, app_options

    assert SERVE_CONFIG_FIELDS <= set(AppArgs.model_fields)
    config = load_config(overrides={"serve": {"default_k": 7, "max_batch_size": 8, "scorer": "exported"}}).serve
    args = AppArgs.model_validate({"bundle_dir": "b", **app_options(config)})
    assert args.serve_config() == replace(config, model_dir="b", host=ServeConfig.host, port=ServeConfig.port)

    calls = []
    monkeypatch.setattr(serve.app, "start_local", lambda model, **kw: calls.append((model, kw)) or "http://x")
    monkeypatch.setattr(serve.app, "stop_local", lambda: None)
    def interrupt(seconds: float) -> None:  # Ctrl-C at once, instead of serving for an hour
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    path = tmp_path / "raytr.yaml"
    path.write_text("serve:\n  model_dir: runs/x/train\n  port: 8123\n  default_k: 7\n")
    assert raytr.cli.main(["serve", "--config", str(path), "--set", "serve.max_batch_size=8"]) == 0
    [(model, kw)] = calls
    assert model == "runs/x/train" and kw["port"] == 8123 and kw["host"] == "127.0.0.1"
    assert kw["default_k"] == 7 and kw["max_batch_size"] == 8


# ------------------------------------------------------------------------------------ bad inputs
EVENT = {"item_id": 1, "timestamp": 1_714_550_000.0}
BAD_JSON = [
    (b'{"events": [{"item_id": 1, "timestamp": 1.0, "price": NaN}]}', "price"),
    (b'{"events": [{"item_id": 1, "timestamp": Infinity}]}', "timestamp"),
    (b'{"events": [{"item_id": 1, "timestamp": 1.0}], "k": 3', "body"),  # malformed JSON
    (b'[1, 2, 3]', "body"),
    (b'', "body"),
]
# Bodies FastAPI validates as raw bytes (not JSON), echoed back in the 422: not UTF-8, short and long.
BAD_RAW = [(b"\xff\xfe\x00garbage", "text/plain"), (b"\xff\xfe\x00garbage", None),
           (b"\xff" * 500, "application/octet-stream")]
BAD_BODIES = [
    ({"events": []}, "events"),
    ({"events": [EVENT], "k": 0}, "k"),
    ({"events": [EVENT], "k": -3}, "k"),
    ({"events": [EVENT], "k": 10**6}, "k"),  # above the catalog
    ({"events": [EVENT], "k": "5"}, "k"),
    ({"events": [EVENT], "k": 2.5}, "k"),
    ({"events": [EVENT], "exclude_seen": "yes"}, "exclude_seen"),
    ({"events": [EVENT], "colour": "red"}, "colour"),
    ({"events": [{**EVENT, "colour": "red"}]}, "colour"),
    ({"events": [{**EVENT, "item_id": 1.5}]}, "item_id"),
    ({"events": [{**EVENT, "item_id": None}]}, "item_id"),
    ({"events": [{**EVENT, "item_id": True}]}, "item_id"),
    ({"events": [{**EVENT, "timestamp": "yesterday"}]}, "timestamp"),
    ({"events": [{"item_id": 1}]}, "timestamp"),
    ({"events": [{**EVENT, "price": "cheap"}]}, "price"),
    ({"events": [EVENT, {**EVENT, "price": -5.0}]}, ["body", "events", 1, "price"]),  # log(-4) after the LogOp
    ({"events": [{**EVENT, "category": [1]}]}, "category"),
    ({"events": {"item_id": 1}}, "events"),
    ({"events": [EVENT] * 1001}, "events"),  # max_events_per_session, under max_body_bytes
    ({"session_id": 1.5, "events": [EVENT]}, "session_id"),
    ({"events": [EVENT, {**EVENT, "timestamp": 1_714_550_000_000.0}]}, ["body", "events", 1, "timestamp"]),  # ms
    ({"events": [{**EVENT, "timestamp": -1e300}]}, ["body", "events", 0, "timestamp"]),
]
BAD_BATCHES = [
    ({"requests": []}, "requests"),
    ({"requests": [{"events": [EVENT]}, {"events": [{**EVENT, "price": float("-1e9")}]}]},
     ["body", "requests", 1, "events", 0, "price"]),
    ({"requests": [{"events": [EVENT]}, {"events": [EVENT, {**EVENT, "timestamp": 1e20}]}]},
     ["body", "requests", 1, "events", 1, "timestamp"]),
]
# Lone surrogates: JSON escapes Python decodes but UTF-8 cannot encode, in a value, an id, a key.
# (a /recommend body, the field its 422 names, the error type, the input echoed escaped or None)
_EVENTS = b'"events": [{"item_id": 1, "timestamp": 1.0}]'
LONE_SURROGATES = [
    (b'{"session_id": "\\ud800", ' + _EVENTS + b"}", "session_id", "string_unicode", None),
    (b'{"events": [{"item_id": "sku\\udfff", "timestamp": 1.0}]}', "item_id", "string_unicode", None),
    (b'{"events": [{"item_id": 1, "timestamp": 1.0, "category": "\\udc00"}]}', "category", "string_unicode", None),
    (b'{"k": "\\ud800", ' + _EVENTS + b"}", "k", "int_type", "\\ud800"),
    (b'{"\\ud800": 1, ' + _EVENTS + b"}", "body", "string_unicode", "\\ud800"),  # a key: pydantic names no field
    (b'{"events": [{"item_id": 1, "timestamp": 1.0, "\\udc00": 2}]}', "events", "string_unicode", "\\udc00"),
]



def _names_the_field(response: httpx.Response, field: str | list) -> bool:
    """A 422 whose error locations hold `field` (a name), or one of them is `field` (a whole loc)."""
    locs = [error["loc"] for error in response.json()["detail"]]
    return field in locs if isinstance(field, list) else any(field in map(str, loc) for loc in locs)


def _assert_bad_inputs_rejected(post) -> None:
    """Every case: a 4xx whose error location names the field. `post(path, json=..., content=...)`."""
    for content, field_name in BAD_JSON:
        response = post("/recommend", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, (content, response.text)
        assert _names_the_field(response, field_name), (content, response.text)
    for content, content_type in BAD_RAW:
        for path in ("/recommend", "/recommend/batch"):
            response = post(path, content=content, headers={"content-type": content_type} if content_type else {})
            assert response.status_code == 422, (content[:20], content_type, response.text[:300])
            assert _names_the_field(response, "body"), response.text[:300]
    for path, cases in (("/recommend", BAD_BODIES), ("/recommend/batch", BAD_BATCHES)):
        for body, field_name in cases:
            response = post(path, json=body)
            assert response.status_code == 422, (str(body)[:200], response.text[:500])
            assert _names_the_field(response, field_name), (str(body)[:200], response.text[:500])
    huge = {"events": [{**EVENT, "timestamp": float(i)} for i in range(100_000)]}
    response = post("/recommend", json=huge)
    assert response.status_code == 413 and "max_body_bytes" in response.json()["detail"]


def _assert_lone_surrogates_rejected(post) -> None:
    """Each case, alone and in a batch: a 422 naming the field and echoing the input escaped,
    never a 500 from encoding the answer or the error."""
    for body, field_name, kind, echoed in LONE_SURROGATES:
        for path, content in (("/recommend", body), ("/recommend/batch", b'{"requests": [' + body + b"]}")):
            response = post(path, content=content, headers={"content-type": "application/json"})
            assert response.status_code == 422, (path, body, response.text[:300])
            assert _names_the_field(response, field_name), (path, body, response.text[:300])
            [error] = response.json()["detail"]
            assert error["type"] == kind and "\\u" in error["input"], (path, body, error)
            if echoed is not None:
                assert error["input"] == echoed, (path, body, error)
            if field_name in ("session_id", "item_id", "category"):  # a string id that is not unicode
                assert "valid unicode" in error["msg"] and "lone surrogate" in error["msg"], error


# ------------------------------------------------------------------------------------ in-process (fast)
def _build_local_bundle(root: Path, item_names: Callable[[int], int | str] | None = None) -> Path:
    """A bundle without Ray: a workflow fitted in-process on synthetic events (item ids renamed by
    `item_names`), an untrained model."""
    from dataclasses import asdict

    from raytr.config import load_config
    from raytr.data.events import normalize_events, sort_events
    from raytr.data.schema import feature_spec
    from raytr.data.synth import SynthConfig, generate_events
    from raytr.data.workflow import fit_workflow, output_schema, save_workflow
    from raytr.models import SessionModel

    config = load_config(REPO_ROOT / "configs" / "synthetic.yaml")
    events = generate_events(SynthConfig(sessions=300, items=80, days=2, seed=1))
    if item_names is not None:
        events["item_id"] = events["item_id"].map(item_names)
    root.parent.mkdir(parents=True, exist_ok=True)
    sorted_file = root.parent / "sorted.parquet"
    sort_events(normalize_events(events, config.data), config.data).to_parquet(sorted_file, index=False)
    workflow = fit_workflow(config.data, [str(sorted_file)], root.parent / "fit")
    save_workflow(workflow, root / "workflow")
    spec = feature_spec(output_schema(workflow, config.data))
    SessionModel(spec, config.model, seed=0).save(root / "model")
    (root / "prepare.json").write_text(json.dumps({"data": asdict(config.data)}))
    (root / "train_result.json").write_text(json.dumps({"run_name": "untrained", "metrics": {"loss": 9.9}}))
    return root


def _raw_items(bundle: Path) -> list[int | str]:
    import pandas as pd

    return pd.read_parquet(bundle / "workflow" / "categories" / "unique.item_id.parquet")["item_id"].tolist()


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory) -> Path:
    return _build_local_bundle(tmp_path_factory.mktemp("local") / "bundle")


@pytest.fixture(scope="module")
def raw_items(local_bundle) -> list[int]:
    return _raw_items(local_bundle)


def test_any_string_item_id_of_the_training_data_is_served(tmp_path, monkeypatch):
    """Item ids as long as URLs, and the empty string, are items like any other: in requests
    (so exclude_seen can drop them) and in answers."""
    from fastapi.testclient import TestClient

    from serve.standalone import build_standalone_app

    def name(item: int) -> str:
        return {0: "", 1: "https://shop.example/p/" + "x" * 300}.get(item % 40, f"sku-{item}")

    bundle = _build_local_bundle(tmp_path / "bundle", name)
    items = _raw_items(bundle)
    assert "" in items and max(map(len, items)) > 300
    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    client = TestClient(build_standalone_app(str(bundle)))
    answer = client.post("/recommend", json={"events": [EVENT], "k": len(items), "exclude_seen": False})
    assert answer.status_code == 200, answer.text[:300]
    assert sorted(i["item_id"] for i in answer.json()["items"]) == sorted(items)
    odd = [i for i in items if len(i) == 0 or len(i) > 300]
    session = [{"item_id": item, "timestamp": 1_714_550_000.0 + n} for n, item in enumerate(odd)]
    answer = client.post("/recommend", json={"events": session, "k": len(items) - len(odd)})
    assert answer.status_code == 200, answer.text[:300]
    assert not {i["item_id"] for i in answer.json()["items"]} & set(odd)


def test_local_backend_recommends_without_http(local_bundle, raw_items):
    from serve.core import Query, Recommendations
    from serve.engine import LocalBackend

    backend = LocalBackend(str(local_bundle))
    catalog = len(raw_items)
    session = [{"item_id": item, "timestamp": 1_714_550_000.0 + 60 * i, "category": None, "price": 9.5}
               for i, item in enumerate(raw_items[:25])]  # 25 > T: the first 5 are cut from the input
    queries = [Query(events=session, k=5, exclude_seen=True, session_id="a"),
               Query(events=session, k=catalog, exclude_seen=True),
               Query(events=session[:1], k=catalog, exclude_seen=False)]
    outcome = backend.recommend_sync(queries)
    assert isinstance(outcome, Recommendations)
    first, capped, everything = outcome.responses
    assert first.session_id == "a" and len(first.items) == 5
    assert [i.score for i in first.items] == sorted((i.score for i in first.items), reverse=True)
    assert len(capped.items) == catalog - 25 and not {i.item_id for i in capped.items} & set(raw_items[:25])
    assert sorted(i.item_id for i in everything.items) == sorted(raw_items)  # raw ids, all of them


def test_standalone_app_answers_and_rejects_bad_inputs(local_bundle, raw_items, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.standalone import build_standalone_app

    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    client = TestClient(build_standalone_app(str(local_bundle)))
    events = [{"item_id": raw_items[0], "timestamp": 1_714_550_000.0, "category": 1030, "price": 5.0},
              {"item_id": 10**30, "timestamp": 1_714_550_001.0}]  # unknown: OOV
    answer = client.post("/recommend", json={"events": events, "k": 4})
    assert answer.status_code == 200 and answer.headers["x-raytr-batch-size"] == "1"
    assert len(answer.json()["items"]) == 4 and {i["item_id"] for i in answer.json()["items"]} <= set(raw_items)
    far = client.post("/recommend", json={"events": [EVENT, {**EVENT, "timestamp": 1e300}]})
    assert far.status_code == 422 and "timestamp" in json.dumps(far.json()["detail"])
    _assert_bad_inputs_rejected(client.post)
    assert client.get("/model").json()["metrics"] == {"loss": 9.9}
    assert client.post("/admin/reload", headers={"X-Admin-Token": "x"}).status_code == 403  # disabled
    assert client.post("/recommend", json={"events": events}).status_code == 200  # still serving


def test_lone_surrogates_are_a_422_never_a_500(local_bundle, raw_items, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.standalone import build_standalone_app

    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    client = TestClient(build_standalone_app(str(local_bundle)))
    _assert_lone_surrogates_rejected(client.post)
    paired = {"session_id": "s-\U0001F600", "events": [{"item_id": raw_items[0], "timestamp": 1.0}]}
    answer = client.post("/recommend", content=json.dumps(paired), headers={"content-type": "application/json"})
    assert answer.status_code == 200 and answer.json()["session_id"] == paired["session_id"]  # a surrogate pair is fine


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_serve_names_a_missing_model_file_before_starting_ray(local_bundle, tmp_path, monkeypatch, capsys, missing):
    """The Serve app's builder loads the bundle as the standalone server does: one line naming the
    file, rather than a deployment failing in a replica after Ray started. Bundle.load checks
    model/config.json as it does the weights (a replica failed on it before)."""
    import raytr.cli
    import raytr.ray_runtime
    from raytr.bundle import Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    (bundle / "model" / missing).unlink()
    if missing == "config.json":
        with pytest.raises(FileNotFoundError, match=re.escape(f"{bundle}/model/config.json is missing")):
            Bundle.load(bundle)

    def no_ray() -> None:
        raise AssertionError("Ray started for a bundle that cannot be served")

    monkeypatch.setattr(raytr.ray_runtime, "ensure_ray", no_ray)
    assert raytr.cli.main(["serve", "--model", str(bundle)]) == 2
    err = capsys.readouterr().err
    named = "model.safetensors" if missing == "model.safetensors" else "model/config.json is missing"
    assert err.startswith("raytr serve: error:") and named in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["taken", 70000, -1, 0])
def test_serve_names_a_port_it_cannot_listen_on_before_starting_ray(local_bundle, monkeypatch, capsys, port):
    """A taken port was a proxy actor's `RayTaskError(RuntimeError): Failed to bind ...`, 70000 an
    OverflowError from bind(): both tracebacks after Ray had started."""
    import socket

    import raytr.cli
    import raytr.ray_runtime

    def no_ray() -> None:
        raise AssertionError("Ray started for a port that cannot be served on")

    monkeypatch.setattr(raytr.ray_runtime, "ensure_ray", no_ray)
    taken = port == "taken"
    with socket.socket() as holder:
        if taken:  # a server listening, as another `raytr serve` would be
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
        code = raytr.cli.main(["serve", "--model", str(local_bundle), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--port" in err, err
    expected = (f"cannot serve on 127.0.0.1:{port}: Address already in use" if taken
                else f"port {port}: expected a TCP port from 1 to 65535")
    assert err.startswith(f"raytr serve: error: {expected}"), err


def test_check_port_takes_a_free_port_and_names_a_host_that_is_not_this_machines():
    from serve.app import check_port, free_port

    check_port("127.0.0.1", free_port())  # nothing listens: no error
    with pytest.raises(ValueError, match=r"host 'no-such-host\.invalid': .*\(--host"):
        check_port("no-such-host.invalid", 8000)


def test_items_the_model_scores_minus_inf_or_nan_are_never_recommended(local_bundle, raw_items):
    """Such items are unrecommendable (the metrics count them as misses): a session gets fewer than
    k items rather than one of them, and the answer stays well-formed JSON (finite scores)."""
    from raytr.features import FIRST_ITEM_ID
    from serve.core import Query, Recommendations
    from serve.engine import LocalBackend

    backend = LocalBackend(str(local_bundle))
    scorer = backend._states.latest.scorer
    score_next = scorer.score_next

    def some_unscorable(batch):
        scores = score_next(batch).clone()
        scores[:, FIRST_ITEM_ID:FIRST_ITEM_ID + 10] = float("-inf")
        scores[:, FIRST_ITEM_ID + 10] = float("nan")
        return scores

    scorer.score_next = some_unscorable
    catalog = len(raw_items)
    session = [{"item_id": raw_items[-1], "timestamp": 1_714_550_000.0, "category": None, "price": 9.5}]
    outcome = backend.recommend_sync([Query(events=session, k=catalog, exclude_seen=False),
                                      Query(events=session, k=catalog, exclude_seen=True),
                                      Query(events=session, k=5, exclude_seen=False)])
    assert isinstance(outcome, Recommendations)
    everything, unseen, five = outcome.responses
    assert len(everything.items) == catalog - 11 and len(unseen.items) == catalog - 12 and len(five.items) == 5
    assert all(math.isfinite(i.score) for r in outcome.responses for i in r.items)
    assert len({i.item_id for i in everything.items}) == catalog - 11


def test_standalone_server_names_a_missing_bundle(tmp_path, capsys):
    from serve.standalone import main

    assert main(["--bundle", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve.standalone: error:") and "nowhere" in err and "Traceback" not in err


def test_standalone_server_names_a_token_file_that_is_a_directory(local_bundle, tmp_path, capsys):
    from serve.standalone import main

    assert main(["--bundle", str(local_bundle), "--admin-token-file", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"serve.standalone: error: serve.admin_token_file={str(tmp_path)!r} is a directory: name the "
                   "file holding the token\n"), err


def test_standalone_server_names_the_path_of_an_os_error_at_startup(local_bundle, monkeypatch, capsys):
    """E.g. a bundle file it may not read (root reads everything, so the error is raised here)."""
    import serve.standalone as standalone

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(local_bundle / "model" / "model.pt"))

    monkeypatch.setattr(standalone, "build_standalone_app", unreadable)
    assert standalone.main(["--bundle", str(local_bundle)]) == 2
    assert capsys.readouterr().err == (f"serve.standalone: error: {str(local_bundle / 'model' / 'model.pt')!r}: "
                                       "Permission denied\n")


def test_standalone_reload_needs_the_token(local_bundle, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.standalone import build_standalone_app

    monkeypatch.setenv("RAYTR_ADMIN_TOKEN", TOKEN)
    client = TestClient(build_standalone_app(str(local_bundle)))
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"X-Admin-Token": "wrong"}).status_code == 403
    same = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert same.status_code == 200 and same.json()["changed"] is False


def _model_needing_another_column(bundle: Path) -> None:
    """Replace the bundle's model with one (new weights, so a new version) whose features include a
    column the bundle's workflow does not produce: the bundle would load, yet could serve nothing."""
    from dataclasses import replace as replace_spec

    from raytr.models import SessionModel

    model = SessionModel.load(bundle / "model")
    spec = replace_spec(model.spec, categorical={**model.spec.categorical, "brand-list": 7})
    SessionModel(spec, model.config, seed=5).save(bundle / "model")


@pytest.mark.parametrize("change", ["data config", "model features", "broken weights", "no data config"])
def test_standalone_reload_refuses_a_bundle_it_could_not_serve(local_bundle, tmp_path, monkeypatch, raw_items, change):
    """409 naming why, and the loaded bundle keeps serving (never a 500 or a half switch)."""
    from fastapi.testclient import TestClient

    from serve.standalone import build_standalone_app

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    monkeypatch.setenv("RAYTR_ADMIN_TOKEN", TOKEN)
    client = TestClient(build_standalone_app(str(bundle)))
    before = client.get("/model").json()["model_version"]
    info = json.loads((bundle / "prepare.json").read_text())
    if change == "data config":
        info["data"]["continuous"] = [*info["data"]["continuous"], "discount"]
        (bundle / "prepare.json").write_text(json.dumps(info))
        match = "different data config"
    elif change == "model features":
        _model_needing_another_column(bundle)
        match = "brand-list"
    elif change == "broken weights":  # a half-copied file: a new version that cannot load
        (bundle / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
        match = "cannot reload"
    else:
        (bundle / "prepare.json").write_text(json.dumps({"summary": {}}))
        match = "prepare.json has no data config"
    answer = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert answer.status_code == 409 and match in answer.json()["detail"], answer.text
    served = client.post("/recommend", json={"events": [{"item_id": raw_items[0], "timestamp": 1_714_550_000.0}]})
    assert served.status_code == 200 and served.json()["model_version"] == before


def test_standalone_reload_takes_a_bundle_prepared_with_other_settings_but_the_same_event_fields(
        local_bundle, tmp_path, monkeypatch, raw_items):
    """Only the event fields must match: min_session_length or read_format concern preparation."""
    from fastapi.testclient import TestClient

    from serve.standalone import build_standalone_app

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    monkeypatch.setenv("RAYTR_ADMIN_TOKEN", TOKEN)
    client = TestClient(build_standalone_app(str(bundle)))
    info = json.loads((bundle / "prepare.json").read_text())
    info["data"].update(min_session_length=3, read_format="parquet")
    (bundle / "prepare.json").write_text(json.dumps(info))
    (bundle / "train_result.json").write_text(json.dumps({"run_name": "retrained", "metrics": {}}))
    answer = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert answer.status_code == 200 and answer.json()["changed"], answer.text
    served = client.post("/recommend", json={"events": [{"item_id": raw_items[0], "timestamp": 1_714_550_000.0}]})
    assert served.status_code == 200 and served.json()["model_version"].startswith("retrained")


def test_timestamps_beyond_the_year_5000_are_a_422_naming_the_field(local_bundle, raw_items, monkeypatch):
    """Milliseconds (or 1e20, +-1e300) sent as unix seconds changed the answer silently: refused as
    `raytr prepare` refuses them (beyond MAX_UNIX_SECONDS), with the value echoed."""
    from fastapi.testclient import TestClient

    from raytr.data.events import MAX_UNIX_SECONDS
    from serve.standalone import build_standalone_app

    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    client = TestClient(build_standalone_app(str(local_bundle)))
    first = {"item_id": raw_items[0], "timestamp": 1_714_550_000.0}
    for ts in (1_714_550_060_000.0, 1e20, 1e300, -1e300, -1.5 * MAX_UNIX_SECONDS):
        later = {"item_id": raw_items[1], "timestamp": ts}
        for path, body, loc in (("/recommend", {"events": [first, later]}, ["body", "events", 1, "timestamp"]),
                                ("/recommend/batch", {"requests": [{"events": [first]}, {"events": [later]}]},
                                 ["body", "requests", 1, "events", 0, "timestamp"])):
            answer = client.post(path, json=body)
            assert answer.status_code == 422, (ts, path, answer.text)
            [error] = answer.json()["detail"]
            assert error["loc"] == loc and error["input"] == ts, error
            assert "unix seconds" in error["msg"] and "looks like milliseconds" in error["msg"], error
    edge = client.post("/recommend", json={"events": [first, {**first, "timestamp": MAX_UNIX_SECONDS}]})
    assert edge.status_code == 200, edge.text  # the bound itself is a time prepare accepts too
    price = client.post("/recommend", json={"events": [{**first, "price": -5.0}]})  # found after parsing too
    assert price.status_code == 422 and price.json()["detail"][0]["input"] == -5.0, price.text


def test_serve_names_a_missing_admin_token_file_before_starting_ray(local_bundle, tmp_path, monkeypatch, capsys):
    """It was read in each Ingress replica only: 23 s of deploying, then ServeController tracebacks."""
    import raytr.cli
    import raytr.ray_runtime

    def no_ray() -> None:
        raise AssertionError("Ray started for a token file that does not exist")

    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(raytr.ray_runtime, "ensure_ray", no_ray)
    missing = tmp_path / "nope"
    code = raytr.cli.main(["serve", "--model", str(local_bundle), "--set", f"serve.admin_token_file={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"raytr serve: error: serve.admin_token_file={str(missing)!r} does not exist\n", err


@pytest.mark.parametrize("content, named", [('{"run_name": "x", "metrics": [1]}', "'metrics' is [1], expected an object"),
                                            ("[]", "holds [], expected a JSON object"),
                                            ('{"run_name": 5, "metrics": {}}', "'run_name' is 5, expected a string"),
                                            ('{"run_name": "x", ', "is not valid JSON")])
def test_a_malformed_train_result_is_refused_at_load_reload_and_startup(local_bundle, tmp_path, monkeypatch, capsys,
                                                                        raw_items, content, named):
    """A reload answered 200 (or 500) and GET /model failed after: now 409 naming the file and key,
    the loaded bundle keeps serving, and the server refuses to start in one line."""
    from fastapi.testclient import TestClient

    from raytr.bundle import Bundle
    from serve.core import BUNDLE_LOAD_ERRORS
    from serve.standalone import build_standalone_app, main

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    monkeypatch.setenv("RAYTR_ADMIN_TOKEN", TOKEN)
    client = TestClient(build_standalone_app(str(bundle)))
    before = client.get("/model").json()["model_version"]
    (bundle / "train_result.json").write_text(content)
    with pytest.raises(BUNDLE_LOAD_ERRORS) as error:
        Bundle.load(bundle)
    assert f"{bundle}/train_result.json" in str(error.value) and named in str(error.value), error.value
    answer = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert answer.status_code == 409 and named in answer.json()["detail"], answer.text
    info = client.get("/model")
    assert info.status_code == 200 and info.json()["model_version"] == before, info.text
    served = client.post("/recommend", json={"events": [{"item_id": raw_items[0], "timestamp": 1_714_550_000.0}]})
    assert served.status_code == 200 and served.json()["model_version"] == before
    assert main(["--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve.standalone: error:") and named in err and err.count("\n") == 1, err


def test_a_default_k_above_the_catalog_is_refused_at_startup_and_on_reload(local_bundle, raw_items, tmp_path,
                                                                           monkeypatch, capsys):
    """Every request without k was a 422 blaming `k`: the service refuses such a default_k when it
    starts (before Ray), and a reload to a bundle with fewer items than it (409, still serving)."""
    import asyncio

    from fastapi.testclient import TestClient

    import raytr.cli
    import raytr.ray_runtime
    from raytr.bundle import Bundle
    from raytr.config import ServeConfig
    from serve.app import BundleRegistry
    from serve.core import Rejection
    from serve.standalone import build_standalone_app

    catalog = len(raw_items)
    refusal = f"serve.default_k={catalog + 1} is larger than the catalog of {local_bundle} ({catalog} items)"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        build_standalone_app(str(local_bundle), ServeConfig(model_dir=str(local_bundle), default_k=catalog + 1))

    def no_ray() -> None:
        raise AssertionError("Ray started for a default_k it cannot serve")

    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(raytr.ray_runtime, "ensure_ray", no_ray)
    assert raytr.cli.main(["serve", "--model", str(local_bundle), "--set", f"serve.default_k={catalog + 1}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raytr serve: error: {refusal}") and err.count("\n") == 1, err

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    monkeypatch.setenv("RAYTR_ADMIN_TOKEN", TOKEN)
    client = TestClient(build_standalone_app(str(bundle), ServeConfig(model_dir=str(bundle), default_k=catalog)))
    registry = object.__new__(BundleRegistry.func_or_class)  # the Serve app's reload, without Ray
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(registry.__init__(str(bundle), Bundle.load(bundle).data, catalog))
        small = _build_local_bundle(tmp_path / "small" / "bundle", lambda item: item % 5)
        assert Bundle.load(small).catalog_size < catalog
        shutil.rmtree(bundle)
        shutil.copytree(small, bundle)
        refused = loop.run_until_complete(registry.reload())
    finally:
        loop.close()
    assert isinstance(refused, Rejection) and refused.status == 409, refused
    assert f"serve.default_k={catalog} is larger" in refused.detail, refused
    answer = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert answer.status_code == 409 and f"serve.default_k={catalog} is larger" in answer.json()["detail"], answer.text
    served = client.post("/recommend", json={"events": [{"item_id": raw_items[0], "timestamp": 1_714_550_000.0}]})
    assert served.status_code == 200 and len(served.json()["items"]) == catalog - 1, served.text[:300]


def _model_of_another_catalog(bundle: Path) -> None:
    """Replace the bundle's model with one built for more items than its workflow's vocabulary (a
    model of another `raytr prepare` run)."""
    from dataclasses import replace as replace_spec

    from raytr.models import SessionModel

    model = SessionModel.load(bundle / "model")
    SessionModel(replace_spec(model.spec, item_cardinality=model.spec.item_cardinality + 9), model.config,
                 seed=5).save(bundle / "model")


def _truncate(path: Path, size: int = 1000) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, named", [
    ("truncated weights", "model/model.safetensors cannot be read"),
    ("truncated category file", "workflow/categories/unique.item_id.parquet cannot be read"),
    ("model of another catalog", "the model and workflow come from different `raytr prepare` runs"),
])
def test_serve_refuses_a_bundle_its_replicas_could_not_load_before_starting_ray(local_bundle, tmp_path, monkeypatch,
                                                                                 capsys, damage, named):
    """Each was ~48 s of replicas failing, then ~239 lines of Ray tracebacks ending in `Deploying
    application raytr failed`: the builder now runs the registry's reload checks first (one line, exit 2)."""
    import raytr.cli
    import raytr.ray_runtime
    from serve.app import app_builder

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    if damage == "truncated weights":
        _truncate(bundle / "model" / "model.safetensors")
    elif damage == "truncated category file":
        _truncate(bundle / "workflow" / "categories" / "unique.item_id.parquet", 10)
    else:
        _model_of_another_catalog(bundle)

    def no_ray() -> None:
        raise AssertionError("Ray started for a bundle that cannot be served")

    monkeypatch.delenv("RAYTR_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(raytr.ray_runtime, "ensure_ray", no_ray)
    with pytest.raises(ValueError, match=re.escape(named)):
        app_builder({"bundle_dir": str(bundle)})  # `serve run serve.app:app_builder` / `serve deploy` too
    assert raytr.cli.main(["serve", "--model", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytr serve: error:") and named in err and err.count("\n") == 1, err


class _Handle:
    """A DeploymentHandle over an object in this event loop: `await handle.method.remote(*args)`."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str):
        import inspect
        from types import SimpleNamespace

        method = getattr(self._target, name)

        async def remote(*args):
            outcome = method(*args)
            return await outcome if inspect.isawaitable(outcome) else outcome

        return SimpleNamespace(remote=remote)


class _Unbatched:
    """The Recommender's `_score_batch` without @serve.batch: each request scored alone."""

    def __init__(self, recommender: object) -> None:
        from serve.app import Recommender

        self._recommender = recommender
        self._score_batch = Recommender.func_or_class._score_batch.__wrapped__

    async def __call__(self, request):
        [result] = await self._score_batch(self._recommender, [request])
        return result

    def set_max_batch_size(self, size: int) -> None: ...

    def set_batch_wait_timeout_s(self, timeout_s: float) -> None: ...


def test_a_reload_a_recommender_cannot_load_keeps_answering_with_the_previous_version(local_bundle, raw_items,
                                                                                      tmp_path, monkeypatch):
    """The Serve app's deployments without Ray (fake handles, one event loop). The registry accepts
    bundle B, then the Recommender's load of B fails (as a CUDA OOM would): every request was a 503
    "replicas disagree" while /healthz said ok with B. Now the previous version answers, /healthz is
    a 503 naming both versions, the weights are not read again for each request, and B is served
    once it loads."""
    import asyncio
    from types import SimpleNamespace

    from ray import serve as ray_serve

    import serve.core
    from raytr.bundle import Bundle
    from raytr.config import ServeConfig
    from serve.app import BundleRegistry, Preprocessor, Recommender, ServeBackend
    from serve.core import Query, Recommendations, Rejection

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    replica = SimpleNamespace(replica_id=SimpleNamespace(unique_id="r"))
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: replica)
    reads = []
    load_compatible = serve.core.load_compatible
    monkeypatch.setattr(serve.core, "load_compatible", lambda *a: reads.append(a) or load_compatible(*a))
    config = ServeConfig(model_dir=str(bundle), reload_poll_s=0.2)
    query = [Query(events=[{"item_id": raw_items[0], "timestamp": 1_714_550_000.0, "category": None, "price": None}],
                   k=3, exclude_seen=True)]

    async def scenario() -> None:
        data = Bundle.load(bundle).data
        registry = object.__new__(BundleRegistry.func_or_class)
        await registry.__init__(str(bundle), data, config.default_k)
        recommender = object.__new__(Recommender.func_or_class)
        recommender._score_batch = _Unbatched(recommender)  # @serve.batch's queue would make the class unpicklable
        await recommender.__init__(str(bundle), data, _Handle(registry), config)
        preprocessor = object.__new__(Preprocessor.func_or_class)
        await preprocessor.__init__(str(bundle), data, _Handle(recommender), _Handle(registry), config)
        backend = ServeBackend(_Handle(preprocessor), _Handle(registry))
        try:
            old = (await backend.health()).model_version
            _rewrite_weights(bundle)
            reloaded = await backend.reload()
            assert not isinstance(reloaded, Rejection) and reloaded.changed, reloaded
            new = reloaded.model_version
            config_json = bundle / "model" / "config.json"  # no await since the reload: no replica followed yet
            saved = config_json.read_text()
            broken = json.loads(saved)
            broken["model_config"]["dropout"] = "x"
            config_json.write_text(json.dumps(broken))
            await asyncio.sleep(0.5)  # the replicas follow: the Preprocessor loads B, the Recommender fails to
            assert preprocessor._states.versions[0] == new and recommender._states.versions == [old]

            reads.clear()
            for _ in range(10):
                answer = await backend.recommend(query)
                assert isinstance(answer, Recommendations) and answer.version == old, answer
                assert answer.responses[0].model_version == old and len(answer.responses[0].items) == 3
            await asyncio.sleep(1.0)  # 5 polls: the Recommender retries loading B, reading no file it read already
            assert not reads, f"the bundle was read (the weights hashed) {len(reads)} times, its files unchanged"
            health = await backend.health()
            assert isinstance(health, Rejection) and health.status == 503, health
            assert "disagree" in health.detail and new in health.detail and old in health.detail, health.detail

            config_json.write_text(saved)  # the cause goes away: B is served within a poll or two
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                answer = await backend.recommend(query)
                if answer.version == new:
                    break
                await asyncio.sleep(0.1)
            assert answer.version == new, answer
            health = await backend.health()
            assert not isinstance(health, Rejection) and health.model_version == new, health
        finally:
            recommender._follow.cancel()
            preprocessor._follow.cancel()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------ Ray Serve (slow)
@pytest.fixture(scope="module")
def bundle_dir(ray_cluster, prepared_dir, tmp_path_factory) -> Path:
    """A model bundle: one epoch on the shared prepared data, plus its workflow and schema."""
    from raytr.bundle import attach_preprocessing
    from raytr.config import load_config
    from raytr.data.schema import feature_spec, load_schema
    from raytr.models import SessionModel
    from raytr.training.trainer import Trainer

    config = load_config(REPO_ROOT / "configs" / "synthetic.yaml")
    out = tmp_path_factory.mktemp("serve") / "bundle"
    model = SessionModel(feature_spec(load_schema(prepared_dir)), config.model, seed=0)
    args = replace(config.training, output_dir=str(out), launcher="local", num_train_epochs=1, max_steps=3, disable_tqdm=True)
    Trainer(model, args, train_dataset_or_path=str(prepared_dir)).train()
    attach_preprocessing(prepared_dir, out)
    return out


@pytest.fixture(scope="module")
def url(bundle_dir, tmp_path_factory):
    from serve.app import free_port, start_local, stop_local

    token_file = tmp_path_factory.mktemp("secrets") / "admin-token"
    token_file.write_text(TOKEN + "\n")
    base = start_local(
        str(bundle_dir), port=free_port(), recommender_replicas=2, ingress_num_cpus=0.25,
        preprocessor_num_cpus=0.25, recommender_num_cpus=0.25, max_batch_size=16, batch_wait_timeout_s=0.05,
        reload_poll_s=0.5, admin_token_file=str(token_file),
    )
    try:
        yield base
    finally:
        stop_local()


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def session_events(raw_events) -> list[dict]:
    """The events of a real session (raw ids) as API events, in reverse order."""
    sizes = raw_events.groupby("session_id").size()
    rows = raw_events[raw_events["session_id"] == sizes[sizes >= 4].index[0]]
    events = [{"item_id": int(r.item_id), "timestamp": float(r.timestamp), "category": int(r.category),
               "price": float(r.price)} for r in rows.itertuples()]
    return events[::-1]


def _ok(client: httpx.Client, body: dict, path: str = "/recommend") -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------ answers
@pytest.mark.ray
@pytest.mark.slow
def test_recommend_returns_k_raw_ids_best_first(client, session_events, raw_events):
    health = client.get("/healthz").json()
    answer = _ok(client, {"session_id": "s-1", "events": session_events, "k": 5})
    assert answer["session_id"] == "s-1"
    assert answer["model_version"] == health["model_version"]
    ids = [item["item_id"] for item in answer["items"]]
    scores = [item["score"] for item in answer["items"]]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert set(ids) <= set(raw_events["item_id"].tolist()), "ids must be raw ids of the data, not encoded ids"
    assert scores == sorted(scores, reverse=True)


@pytest.mark.ray
@pytest.mark.slow
def test_exclude_seen_drops_every_item_of_the_session(client, raw_events):
    catalog = client.get("/model").json()["catalog_size"]
    items = raw_events["item_id"].drop_duplicates().tolist()[:25]  # more than T = 20 events
    events = [{"item_id": int(item), "timestamp": 1_714_550_000.0 + 60 * i} for i, item in enumerate(items)]
    excluded = _ok(client, {"events": events, "k": catalog - len(items)})
    assert not {i["item_id"] for i in excluded["items"]} & set(items), "events before the last T count too"
    everything = _ok(client, {"events": events, "k": catalog, "exclude_seen": False})
    assert set(items) <= {i["item_id"] for i in everything["items"]}
    capped = _ok(client, {"events": events, "k": catalog})  # fewer items than k are left
    assert len(capped["items"]) == catalog - len(items)


@pytest.mark.ray
@pytest.mark.slow
def test_unknown_items_and_null_features_are_served(client):
    events = [{"item_id": 1, "timestamp": 1_714_550_000.0},
              {"item_id": "never-seen-sku", "timestamp": 1_714_550_010.0, "category": "new", "price": None},
              {"item_id": 424242424242, "timestamp": 1_714_550_020.0, "category": None, "price": 3.5}]
    answer = _ok(client, {"events": events, "k": 3})
    assert len(answer["items"]) == 3


@pytest.mark.ray
@pytest.mark.slow
def test_batch_endpoint_answers_each_request_in_order(client, session_events):
    body = {"requests": [{"session_id": "a", "events": session_events, "k": 2},
                         {"session_id": 7, "events": session_events[:1], "k": 4, "exclude_seen": False},
                         {"events": session_events[1:3]}]}
    answer = _ok(client, body, "/recommend/batch")
    assert [r["session_id"] for r in answer["results"]] == ["a", 7, None]
    assert [len(r["items"]) for r in answer["results"]] == [2, 4, 10]  # default k = 10
    assert all(r["model_version"] == answer["model_version"] for r in answer["results"])


@pytest.mark.ray
@pytest.mark.slow
def test_model_info_and_docs(client, bundle_dir):
    info = client.get("/model").json()
    train_result = json.loads((bundle_dir / "train_result.json").read_text())
    assert info["run_name"] == train_result["run_name"]
    assert info["catalog_size"] == info["item_cardinality"] - 3
    assert info["max_sequence_length"] == 20
    assert info["event_fields"] == ["item_id", "timestamp", "category", "price"]
    assert "category-list" in info["features"]["categorical"] and "price-list" in info["features"]["continuous"]
    assert info["metrics"] == pytest.approx(train_result["metrics"]) and info["metrics"]
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "price" in json.dumps(schema["components"]["schemas"]["Event"])


def test_a_running_proxy_answers_at_its_port_on_any_name_of_its_host():
    """A proxy on 0.0.0.0:8000 (serve/config.yaml's host) answers raytr serve's default
    127.0.0.1:8000, and one on 127.0.0.1 answers localhost: only another port or host is refused."""
    from serve.app import same_address

    assert same_address(("0.0.0.0", 8000), ("127.0.0.1", 8000))
    assert same_address(("::", 8000), ("localhost", 8000))
    assert same_address(("127.0.0.1", 8000), ("localhost", 8000))
    assert not same_address(("0.0.0.0", 8000), ("127.0.0.1", 8001))
    assert not same_address(("127.0.0.1", 8000), ("no-such-host.invalid", 8000))


@pytest.mark.ray
@pytest.mark.slow
def test_serving_again_on_another_port_names_the_running_proxys_address(url, bundle_dir):
    """Serve keeps its running proxy's address whatever serve.start is asked: waiting for /healthz on
    another port would time out (after 180 s) instead of saying so."""
    from serve.app import free_port, start_local

    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"Ray Serve already runs in this Ray cluster with its HTTP proxy on "
                                         rf"{host}:{port}, .* \(--host {host} --port {port}\)"):
        start_local(str(bundle_dir), host=host, port=free_port())
    assert time.monotonic() - started < 30
    assert httpx.get(f"{url}/healthz", timeout=10.0).status_code == 200  # the running app is untouched


@pytest.mark.ray
@pytest.mark.slow
def test_every_bad_input_is_a_4xx_naming_the_field(client, session_events):
    _assert_bad_inputs_rejected(client.post)
    _assert_lone_surrogates_rejected(client.post)
    assert client.get("/nope").status_code == 404
    _ok(client, {"events": session_events, "k": 3})  # still serving


# ------------------------------------------------------------------------------------ batching
@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_requests_share_model_calls(client, session_events):
    """Different sessions and k scored together in dynamic batches: each answer is the one the same
    request gets alone (no request is handed another's rows)."""
    bodies = [{"session_id": i, "events": session_events[: 1 + i % len(session_events)], "k": 2 + i % 5}
              for i in range(32)]
    alone = [_ok(client, body) for body in bodies[:8]]

    def one(body: dict) -> httpx.Response:
        return client.post("/recommend", json=body)

    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, bodies))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-raytr-batch-size"]) for r in responses]
    assert max(sizes) > 1, f"no dynamic batch had more than one request: {sizes}"
    for single, together in zip(alone, responses):
        # Scores equal up to the batch's float noise (near-tied items may swap places).
        got = {i["item_id"]: i["score"] for i in together.json()["items"]}
        want = {i["item_id"]: i["score"] for i in single["items"]}
        assert sorted(got.values()) == pytest.approx(sorted(want.values()), rel=1e-4, abs=1e-5)
        shared = got.keys() & want.keys()
        assert len(shared) >= len(want) - 1 and all(got[i] == pytest.approx(want[i], rel=1e-4, abs=1e-5) for i in shared)
    stats = client.get("/model").json()["batching"]
    assert stats["requests"] >= stats["batches"] >= 1


# ------------------------------------------------------------------------------------ reload
def _rewrite_weights(bundle_dir: Path) -> None:
    """A retrained model in place: new weights, same vocabularies; files replaced atomically."""
    import torch

    from raytr.models import SessionModel

    model = SessionModel.load(bundle_dir / "model")
    with torch.no_grad():
        model.inputs.item_embedding.weight.mul_(1.5)
    staging = bundle_dir / "model.staging"
    model.save(staging)
    os.replace(staging / "model.safetensors", bundle_dir / "model" / "model.safetensors")


@pytest.mark.ray
@pytest.mark.slow
def test_admin_reload_needs_the_token_and_swaps_the_model(client, bundle_dir, session_events):
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"X-Admin-Token": "wrong"}).status_code == 403
    same = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert same.status_code == 200 and same.json()["changed"] is False
    old = same.json()["model_version"]

    _rewrite_weights(bundle_dir)
    reloaded = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert reloaded.status_code == 200, reloaded.text
    new = reloaded.json()["model_version"]
    assert reloaded.json()["changed"] is True and new != old and reloaded.json()["previous_version"] == old

    deadline = time.monotonic() + 30
    versions: list[str] = []
    while time.monotonic() < deadline:  # replicas follow within reload_poll_s
        versions = [_ok(client, {"events": session_events, "k": 2})["model_version"] for _ in range(6)]
        if set(versions) == {new}:
            break
        assert set(versions) <= {old, new}
        time.sleep(0.5)
    assert set(versions) == {new}
    assert client.get("/model").json()["model_version"] == new

    # A bundle that loads but cannot serve (its model needs a column the workflow lacks) is refused
    # by the registry before any replica sees it; restored after, for the tests that follow.
    saved = bundle_dir.parent / "model-saved"
    shutil.copytree(bundle_dir / "model", saved)
    try:
        _model_needing_another_column(bundle_dir)
        refused = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
        assert refused.status_code == 409 and "brand-list" in refused.json()["detail"], refused.text
        assert _ok(client, {"events": session_events, "k": 2})["model_version"] == new
    finally:
        shutil.rmtree(bundle_dir / "model")
        shutil.copytree(saved, bundle_dir / "model")


# ------------------------------------------------------------------------------------ failure
def _recommender_replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "#Recommender#" in a["name"]]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_recommender_replica_costs_at_most_the_requests_in_flight(client, session_events):
    import ray
    from ray import serve

    from serve.app import APP_NAME

    assert len(_recommender_replicas()) == 2
    threads, per_thread, period_s = 4, 50, 0.2  # 200 requests over ~10 s
    failures: list[str] = []

    def load(worker: int) -> int:
        ok = 0
        with httpx.Client(base_url=str(client.base_url), timeout=30.0) as c:
            for i in range(per_thread):
                started = time.monotonic()
                try:
                    r = c.post("/recommend", json={"session_id": f"{worker}-{i}", "events": session_events, "k": 3})
                    if r.status_code == 200:
                        ok += 1
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                time.sleep(max(0.0, period_s - (time.monotonic() - started)))
        return ok

    with cf.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(load, w) for w in range(threads)]
        time.sleep(3.0)
        victim = _recommender_replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        oks = sum(f.result() for f in futures)
    assert len(failures) <= threads, f"more failures than requests in flight: {failures}"
    assert oks >= threads * per_thread - threads

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve replaces the replica
        replicas = serve.status().applications[APP_NAME].deployments["Recommender"].replica_states
        if replicas.get("RUNNING", 0) == 2 and victim not in _recommender_replicas():
            break
        time.sleep(1.0)
    assert replicas.get("RUNNING", 0) == 2, replicas
    _ok(client, {"events": session_events, "k": 3})


def test_local_backend_with_the_exported_scorer_answers_as_the_eager_model(local_bundle, raw_items):
    from raytr.config import ServeConfig
    from serve.core import Query
    from serve.engine import LocalBackend

    session = [{"item_id": item, "timestamp": 1_714_550_000.0 + 60 * i, "category": None, "price": 9.5}
               for i, item in enumerate(raw_items[:7])]
    queries = [Query(events=session, k=10, exclude_seen=True), Query(events=session[:2], k=10, exclude_seen=False)]
    eager = LocalBackend(str(local_bundle)).recommend_sync(queries)
    exported = LocalBackend(str(local_bundle), ServeConfig(scorer="exported")).recommend_sync(queries)
    for a, b in zip(eager.responses, exported.responses):
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
        assert [i.score for i in a.items] == pytest.approx([i.score for i in b.items], abs=1e-4)


def test_the_bundle_read_is_reused_only_while_its_files_and_workflow_are_unchanged(local_bundle, tmp_path):
    """A poll reuses the last Bundle.load while the files it reads are unchanged; a new workflow
    (its digest is part of the version) must be read again, also under unchanged weights."""
    import shutil

    from serve.core import _files_key

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    key = _files_key(str(bundle))
    assert key is not None and key == _files_key(str(bundle))
    category = next((bundle / "workflow").rglob("*.parquet"))
    category.write_bytes(category.read_bytes())  # the same bytes, a new write
    assert _files_key(str(bundle)) != key
    assert _files_key("s3://bucket/bundle") is None


def test_a_bundle_replaced_while_it_loads_is_loaded_again_under_its_own_version(local_bundle, tmp_path):
    """The version is read before the model loads; a bundle moved into place in between must not be
    served under the name of the files read first (the Preprocessor would encode with the other
    version's workflow)."""
    import shutil

    from raytr.bundle import Bundle, read_data_config
    from serve.core import BundleChanging, VersionedStates

    bundle = tmp_path / "bundle"
    shutil.copytree(local_bundle, bundle)
    data = read_data_config(bundle)
    first = Bundle.load(bundle).version
    loaded: list[tuple[str, bytes]] = []

    def load_then_replace(b: Bundle) -> Bundle:
        weights = (b.model_dir / "model.safetensors").read_bytes()
        loaded.append((b.version, weights))
        if len(loaded) == 1:  # a new model moved into place while the first load ran
            staged = tmp_path / "staged"
            shutil.copytree(bundle, staged)
            (staged / "model" / "model.safetensors").write_bytes(weights + b" ")  # other bytes, other version
            shutil.rmtree(bundle)
            staged.rename(bundle)
        return b

    states = VersionedStates(str(bundle), load_then_replace, keep=2, data=data)
    state = states.load_sync()
    assert [v for v, _ in loaded] == [first, state.version] and state.version != first
    assert states.versions == [state.version] == [Bundle.load(bundle).version]

    def always_replace(b: Bundle) -> Bundle:
        path = b.model_dir / "model.safetensors"
        path.write_bytes(path.read_bytes() + b" ")
        return b

    changing = VersionedStates(str(bundle), always_replace, keep=2, data=data)
    with pytest.raises(BundleChanging, match=f"{bundle} changed during each of 3 loads: finish writing"):
        changing.load_sync()
    assert changing.versions == []
