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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytr.config import DataConfig, from_dict

MODEL_DIR = "model"
WORKFLOW_DIR = "workflow"
COPIED_FROM_PREPARE = ("workflow", "schema.json", "schema.pbtxt", "prepare.json")


def attach_preprocessing(prepared_dir: str | Path, output_dir: str | Path) -> None:
    """Copy the fitted workflow, schema and data config of `prepared_dir` next to the model."""
    prepared_dir, output_dir = Path(prepared_dir), Path(output_dir)
    for name in COPIED_FROM_PREPARE:
        src, dst = prepared_dir / name, output_dir / name
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing: {prepared_dir} is not a `raytr prepare` output")
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)


@dataclass(frozen=True)
class Bundle:
    root: Path
    data: DataConfig
    version: str  # run name + a digest of the weights: changes whenever the model does
    train_result: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def workflow_dir(self) -> Path:
        return self.root / WORKFLOW_DIR

    @classmethod
    def load(cls, root: str | Path) -> "Bundle":
        root = Path(root).resolve()
        missing = [n for n in (MODEL_DIR, WORKFLOW_DIR, "prepare.json") if not (root / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"{root} is not a model bundle: {missing} missing (train with `raytr train --data PREPARED_DIR`)"
            )
        prepare_info = json.loads((root / "prepare.json").read_text())
        data = from_dict(DataConfig, prepare_info["data"], where=f"{root}/prepare.json data")
        result_path = root / "train_result.json"
        train_result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        digest = hashlib.sha256((root / MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()[:12]
        version = f"{train_result.get('run_name', 'model')}-{digest}"
        return cls(root=root, data=data, version=version, train_result=train_result)
