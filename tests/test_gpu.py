"""GPU checks: mixed-precision training and the device-resident loader on CUDA.

Skipped without CUDA (see conftest). On a GPU machine: `pytest -m gpu -q`.
Data is written directly as session parquet (no NVTabular/Ray needed for the first two tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytr.config import ModelConfig
from raytr.data.loaders import DataLoader
from raytr.features import FIRST_ITEM_ID, FeatureSpec, SessionBatch
from raytr.models import SessionModel
from raytr.training.arguments import TrainingArguments
from raytr.training.trainer import Trainer

pytestmark = pytest.mark.gpu

ITEMS = 500
SPEC = FeatureSpec(item_id="item_id-list", item_cardinality=ITEMS, max_sequence_length=20,
                   categorical={"category-list": 20}, continuous=("price-list",))


def _write_sessions(path: Path, sessions: int, seed: int) -> str:
    """Sessions where item i is followed by i+1 (mod the catalog): learnable to near-perfect recall."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 15, size=sessions)
    starts = rng.integers(FIRST_ITEM_ID, ITEMS, size=sessions)
    items = [list(FIRST_ITEM_ID + (s - FIRST_ITEM_ID + np.arange(n)) % (ITEMS - FIRST_ITEM_ID))
             for s, n in zip(starts, lengths)]
    table = pa.table({
        "item_id-list": pa.array(items, pa.list_(pa.int64())),
        "category-list": pa.array([[3 + i % 17 for i in row] for row in items], pa.list_(pa.int64())),
        "price-list": pa.array([list(rng.normal(size=len(row))) for row in items], pa.list_(pa.float64())),
    })
    pq.write_table(table, path)
    return str(path)


@pytest.fixture(scope="module")
def session_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-data")
    return _write_sessions(root / "train.parquet", 8000, 0), _write_sessions(root / "eval.parquet", 1000, 1)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("loss_kernel", ["torch", "triton"])
def test_mixed_precision_training_learns_on_cuda(session_files, tmp_path, precision, loss_kernel):
    """Eager with the torch loss kernel; with the Triton one, under CUDA graphs as the 1M benchmark runs it."""
    train, evaluation = session_files
    model = SessionModel(SPEC, ModelConfig(body="gpt2", d_model=64, n_layers=2, n_heads=4), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), launcher="local", use_gpu=True, num_train_epochs=3,
                             per_device_train_batch_size=256, learning_rate=3e-3, disable_tqdm=True,
                             fp16=precision == "fp16", bf16=precision == "bf16", data_loader_engine="pyarrow",
                             loss_kernel=loss_kernel,
                             torch_compile_mode="reduce-overhead" if loss_kernel == "triton" else None)
    trainer = Trainer(model, args, train_dataset_or_path=train, eval_dataset_or_path=evaluation)
    result = trainer.train()
    assert np.isfinite(result.metrics["loss"])
    assert result.metrics["eval_recall@10"] > 0.8, result.metrics
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_loader_batches_on_cuda_equal_cpu(session_files):
    train, _ = session_files
    cpu = list(DataLoader(SPEC, [train], 512, shuffle=False, engine="pyarrow"))
    gpu = list(DataLoader(SPEC, [train], 512, shuffle=False, engine="pyarrow", device="cuda"))
    assert len(cpu) == len(gpu) > 1 and all(b.item_ids.is_cuda for b in gpu)
    for a, b in zip(cpu, gpu):  # every column, exactly: the same values moved to the device
        assert torch.equal(a.item_ids, b.item_ids.cpu())
        assert a.categorical.keys() == b.categorical.keys() and a.continuous.keys() == b.continuous.keys()
        assert all(torch.equal(a.categorical[k], b.categorical[k].cpu()) for k in a.categorical)
        assert all(torch.equal(a.continuous[k], b.continuous[k].cpu()) for k in a.continuous)


@pytest.mark.ray
@pytest.mark.slow
def test_torchtrainer_one_gpu_worker_fp16(ray_cluster, session_files, tmp_path):
    train, evaluation = session_files
    model = SessionModel(SPEC, ModelConfig(body="gpt2", d_model=64, n_layers=2, n_heads=4), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), launcher="ray", num_workers=1, use_gpu=True, fp16=True,
                             num_train_epochs=2, per_device_train_batch_size=256, learning_rate=3e-3,
                             disable_tqdm=True, data_loader_engine="merlin")
    result = Trainer(model, args, train_dataset_or_path=train, eval_dataset_or_path=evaluation).train()
    assert result.metrics["eval_recall@10"] > 0.5, result.metrics
    assert Path(result.model_dir, "model.safetensors").is_file()


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def test_cuda_graph_training_learns_on_cuda(session_files, tmp_path):
    """torch_compile_mode="reduce-overhead": the input layer and body replay as CUDA graphs (none
    skipped), evaluation included, and the model learns as the eager loop does."""
    train, evaluation = session_files
    model = SessionModel(SPEC, ModelConfig(body="gpt2", d_model=64, n_layers=2, n_heads=4), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), launcher="local", use_gpu=True, num_train_epochs=3,
                             per_device_train_batch_size=256, learning_rate=3e-3, disable_tqdm=True, fp16=True,
                             data_loader_engine="pyarrow", torch_compile_mode="reduce-overhead")
    torch._dynamo.reset()  # skips are counted when torch compiles: code compiled by an earlier test would hide them
    skips = _cudagraph_skips()
    result = Trainer(model, args, train_dataset_or_path=train, eval_dataset_or_path=evaluation).train()
    assert _cudagraph_skips() == skips, "torch ran a region without CUDA graphs (TORCH_LOGS=perf_hints says why)"
    assert result.metrics["eval_recall@10"] > 0.8, result.metrics


def _grads_after_steps(model: SessionModel, batches: list[SessionBatch], dtype: torch.dtype | None):
    """Loss and gradients of the last step of one step per batch (cudagraph trees: a warm-up run, a
    recording, then replays), the weights scaled by 0.9 before every step but the first: a replay that
    used the recorded inputs or weights instead of the current ones gives another step's gradients."""
    for i, batch in enumerate(batches):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9)
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(batch.item_ids.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(batch).loss
        loss.backward()
    return loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


def assert_compiled_matches_eager(dtype: torch.dtype, device: str) -> None:
    """compile_regions, default mode and "reduce-overhead" (CUDA graphs, none skipped on CUDA): the
    last of four steps (new batch, new weights) gives eager's loss, and every gradient is as close
    to the fp32 one as eager mixed precision's is, relative to each gradient's size (eager fp16's
    layer-norm weight gradients, ~1e-5, are 25-39% off on an H200: their per-position terms
    underflow without a GradScaler; bf16's are within 1%, eager or compiled); the graph replays give
    what the compiled code gives. A failure lists every gradient out of bounds, not only the first."""
    torch._dynamo.reset()  # fresh compiles: cudagraph skips are counted when torch compiles
    config = ModelConfig(body="gpt2", d_model=64, n_layers=2, n_heads=4, dropout=0.0, logits_chunk_size=256)
    initial = SessionModel(SPEC, config, seed=0).state_dict()
    gen = torch.Generator().manual_seed(0)
    batches = [SessionBatch(item_ids=torch.randint(FIRST_ITEM_ID, ITEMS, (64, 20), generator=gen),
                            categorical={"category-list": torch.randint(3, 20, (64, 20), generator=gen)},
                            continuous={"price-list": torch.randn(64, 20, generator=gen)}).to(device)
               for _ in range(4)]

    def copy(mode: str | None = None, compiled: bool = True) -> SessionModel:
        model = SessionModel(SPEC, config, seed=0).to(device)
        model.load_state_dict(initial)
        return model.compile_regions(mode) if compiled else model

    _, exact = _grads_after_steps(copy(compiled=False), batches, None)
    eager_loss, eager = _grads_after_steps(copy(compiled=False), batches, dtype)
    compiled_run = _grads_after_steps(copy(None), batches, dtype)
    skips = _cudagraph_skips()
    runs = {None: compiled_run, "reduce-overhead": _grads_after_steps(copy("reduce-overhead"), batches, dtype)}
    if device == "cuda":
        assert _cudagraph_skips() == skips, "a region ran without CUDA graphs (TORCH_LOGS=perf_hints says why)"
    for mode, (loss, grads) in runs.items():
        assert torch.allclose(loss, eager_loss, rtol=2e-2), (mode, loss, eager_loss)
        assert grads.keys() == eager.keys(), mode
        errors = {name: (_relative_error(g, exact[name]), 3 * _relative_error(eager[name], exact[name]) + 0.05)
                  for name, g in grads.items()}  # name: (error, allowed)
        assert not {n: e for n, e in errors.items() if e[0] > e[1]}, (
            mode, {n: f"{e[0]:.4f} > {e[1]:.4f}" for n, e in errors.items() if e[0] > e[1]})
    replayed, compiled = runs["reduce-overhead"][1], runs[None][1]
    for name in compiled:
        assert _relative_error(replayed[name], compiled[name]) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_regions_match_eager_on_cuda(dtype):
    """compile_regions on CUDA also compiles the loss's chunk kernel (Triton); "reduce-overhead"
    replays the input layer and body as CUDA graphs."""
    assert_compiled_matches_eager(dtype, "cuda")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("loss_kernel", ["torch", "triton"])
def test_a_compiled_clm_step_on_loader_batches_never_waits_for_the_gpu(session_files, precision, loss_kernel):
    """The training loop's step (compiled regions, autocast, GradScaler for fp16, grad-norm clip,
    fused AdamW) on the CUDA loader's batches makes no host sync: the loader counted each batch's
    targets on the host. A sync would leave the GPU idle while the host queues the next kernels.
    Both loss kernels: the compiled torch one, and the Triton one `loss_kernel: auto` takes on a GPU."""
    from raytr.training.loop import _use_loss_kernel, build_optimizer

    train, _ = session_files
    batches = list(DataLoader(SPEC, [train], 256, shuffle=True, engine="pyarrow", device="cuda"))[:6]
    model = SessionModel(SPEC, ModelConfig(body="gpt2", d_model=64, n_layers=2, n_heads=4), seed=0).cuda()
    model.train().compile_regions()
    _use_loss_kernel(model, loss_kernel, torch.device("cuda"))  # as the loop does after compile_regions
    optimizer = build_optimizer(model, TrainingArguments(output_dir="unused", optim="adamw_torch_fused"))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    def step(batch: SessionBatch) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            out = model(batch)
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        return out.loss.detach()

    for batch in batches[:3]:  # compilation (its own syncs) and the optimizer's lazy state
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(batch) for batch in batches[3:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(loss) for loss in losses)
