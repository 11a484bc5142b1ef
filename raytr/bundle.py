"""The model bundle: everything the online service needs, in one training output directory.

    <output_dir>/
        model/               SessionModel (model.safetensors + config.json)
        workflow/            the fitted NVTabular workflow from `raytr prepare` (copied)
        schema.json/.pbtxt   the Merlin schema of the training data (copied)
        prepare.json         the data config the workflow was fitted with (copied)
        train_result.json    metrics, run name, training arguments

`raytr train` writes it; `raytr serve` and the Ray Serve app read it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytr import storage
from raytr.config import DataConfig, from_dict
from raytr.data.layout import categories_digest

if TYPE_CHECKING:
    from raytr.features import FeatureSpec

MODEL_DIR = "model"
WORKFLOW_DIR = "workflow"
COPIED_FROM_PREPARE = ("workflow", "schema.json", "schema.pbtxt", "prepare.json")


def attach_preprocessing(prepared_dir: str | Path, output_dir: str | Path) -> None:
    """Copy the fitted workflow, schema and data config of `prepared_dir` next to the model (either
    may be a local path or a URL), replacing earlier copies of them only: every source is checked
    before anything is replaced, and no replaced entry may hold `prepared_dir`."""
    if storage.normalize(prepared_dir) == storage.normalize(output_dir):  # each copy would delete its source
        raise ValueError(f"output {str(output_dir)!r} is the prepared data directory itself: choose another output")
    copies = [(storage.join(prepared_dir, name), storage.join(output_dir, name)) for name in COPIED_FROM_PREPARE]
    for _, dst in copies:
        # dst unresolved (storage.remove deletes a link itself), the source with its links resolved
        if storage.is_within(storage.normalize(prepared_dir), dst):  # replacing dst would delete the source
            raise ValueError(f"output {str(output_dir)!r}: its {storage.name(dst)} would replace the prepared data "
                             f"directory {str(prepared_dir)!r} itself: choose another output")
    missing = [src for src, _ in copies if not storage.exists(src)]
    if missing:  # before any copy: a half-replaced bundle would pair a new workflow with an old schema
        raise FileNotFoundError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
                                f"{prepared_dir} is not a `raytr prepare` output")
    for src, dst in copies:
        storage.remove(dst)  # a link itself, not what it names
        if storage.is_dir(src):
            with storage.local_copy(src) as local:
                storage.put_dir(local, dst)
        else:
            storage.copy_file(src, dst)


def bundle_files(root: str | Path) -> list[Path]:
    """The files `Bundle.load` reads from a local bundle (serving's poll watches them): the model's,
    the data config, the training result and every file of the workflow (part of the version)."""
    root = Path(root)
    workflow = sorted(p for p in (root / WORKFLOW_DIR).rglob("*") if p.is_file())
    return [root / MODEL_DIR / "model.safetensors", root / MODEL_DIR / "config.json", root / "train_result.json",
            root / "prepare.json", *workflow]


def read_data_config(bundle_dir: str | Path) -> DataConfig:
    """The data config in a bundle's prepare.json (a local path or a URL), without touching the
    weights: what the Serve app's ingress needs."""
    path = storage.join(bundle_dir, "prepare.json")
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} is missing: {bundle_dir} is not a model bundle (train with `raytr train`)")
    try:
        info = json.loads(storage.read_text(path))
    except ValueError as error:  # invalid JSON or UTF-8
        raise ValueError(f"{path} is not valid JSON ({error}): copy it again from the `raytr prepare` output "
                         "(or train again)") from None
    if not isinstance(info, dict) or not isinstance(info.get("data"), dict):
        raise ValueError(f"{path} has no data config (expected the file `raytr prepare` writes)")
    return from_dict(DataConfig, info["data"], where=f"{path} data")


@dataclass(frozen=True)
class Bundle:
    root: Path
    data: DataConfig
    version: str  # run name + a digest of the weights and the workflow: changes whenever either does
    train_result: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def workflow_dir(self) -> Path:
        return self.root / WORKFLOW_DIR

    @property
    def feature_spec(self) -> FeatureSpec:
        """The model's FeatureSpec, from its config.json without loading the model."""
        from raytr.features import FeatureSpec  # imports torch: only where this is asked

        path = self.model_dir / "config.json"
        try:
            values = json.loads(path.read_text())["feature_spec"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{path}: its feature_spec is missing or malformed (expected the file `raytr train` "
                             "writes)") from None
        return from_dict(FeatureSpec, values, where=f"{path}:feature_spec")  # as SessionModel.load reads it

    @property
    def catalog_size(self) -> int:
        """Recommendable items (the largest k)."""
        from raytr.features import FIRST_ITEM_ID

        return self.feature_spec.item_cardinality - FIRST_ITEM_ID

    @classmethod
    def load(cls, root: str | Path) -> "Bundle":
        """Read a bundle; from a URL, its files are first copied to a new local directory that
        stays for the life of the process (the workflow reads its category files lazily)."""
        source = storage.normalize(root)
        missing = [n for n in (MODEL_DIR, WORKFLOW_DIR, "prepare.json") if not storage.exists(storage.join(source, n))]
        if missing:
            raise FileNotFoundError(
                f"{source} is not a model bundle: {missing} missing (train with `raytr train --data PREPARED_DIR`)"
            )
        root = Path(source)
        if storage.is_url(source):
            root = Path(tempfile.mkdtemp(prefix="raytr-bundle-"))
            for name in (*COPIED_FROM_PREPARE, MODEL_DIR, "train_result.json"):
                if storage.exists(storage.join(source, name)):
                    storage.download(storage.join(source, name), root / name if name in (MODEL_DIR, WORKFLOW_DIR)
                                     else root)
        data = read_data_config(root)
        for name in ("model.safetensors", "config.json"):  # what SessionModel.load reads in each replica
            if not (root / MODEL_DIR / name).is_file():
                raise FileNotFoundError(f"{storage.join(source, MODEL_DIR, name)} is missing: {source} is not a "
                                        "complete model bundle (train again with `raytr train`)")
        result_path = root / "train_result.json"
        train_result = (_read_train_result(result_path, storage.join(source, "train_result.json"))
                        if result_path.is_file() else {})
        workflow = categories_digest(root)
        trained_with = train_result.get("workflow_digest")
        if trained_with is not None and workflow != trained_with:
            raise ValueError(f"{storage.join(source, WORKFLOW_DIR)} is not the workflow the model in "
                             f"{storage.join(source, MODEL_DIR)} was trained with (another `raytr prepare` run): "
                             "its ids stand for other items; copy the workflow of the model's training data "
                             "(`raytr train` does)")
        # The weights and the workflow: a new workflow (its vocabularies) is a new version too.
        digest = hashlib.sha256((root / MODEL_DIR / "model.safetensors").read_bytes())
        digest.update((workflow or "").encode())
        version = f"{train_result.get('run_name', 'model')}-{digest.hexdigest()[:12]}"
        if storage.is_url(source):
            root = _keep_copy(root, source, version)
        return cls(root=root, data=data, version=version, train_result=train_result)


def _read_train_result(path: Path, shown: str) -> dict[str, Any]:
    """train_result.json, checked where the service reads it (run_name, metrics): a malformed file is
    a ValueError naming it and the key, so a reload is refused rather than serving errors later."""
    try:
        result = json.loads(path.read_text())
    except ValueError as error:  # invalid JSON or UTF-8
        raise ValueError(f"{shown} is not valid JSON ({error}): expected the file `raytr train` writes") from None
    if not isinstance(result, dict):
        raise ValueError(f"{shown} holds {json.dumps(result)[:80]}, expected a JSON object (the file `raytr train` "
                         "writes)")
    expected = {"run_name": (str, "a string"), "metrics": (dict, "an object of metric name -> number")}
    for key, (kind, what) in expected.items():
        if key in result and not isinstance(result[key], kind):
            raise ValueError(f"{shown}: {key!r} is {json.dumps(result[key])[:80]}, expected {what}")
    return result


def _keep_copy(fresh: Path, source: str, version: str) -> Path:
    """One local copy per (bundle URL, version) on this node: a reload of an unchanged bundle (or
    another replica loading it) reuses it instead of keeping one more copy."""
    kept = Path(tempfile.gettempdir()) / "raytr-bundles" / hashlib.sha256(source.encode()).hexdigest()[:16] / version
    if not kept.is_dir():
        kept.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(fresh, kept)
            return kept
        except OSError:  # another process on this node kept the same version first
            pass
    shutil.rmtree(fresh, ignore_errors=True)
    return kept
