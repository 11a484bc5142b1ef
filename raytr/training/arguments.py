"""TrainingArguments: Hugging Face names and meanings where they exist, plus session options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's
COMPILE_MODES = get_args(CompileMode)
LossKernel = Literal["auto", "torch", "triton"]  # training.loss_kernel: see TrainingArguments
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # these replay their graphs as CUDA graphs on a GPU
# training.report_to: the integrations the loop writes to (loop._tensorboard); "none" (or []) writes none.
REPORT_TO = ("tensorboard", "none")
# training.seed (and `raytr synth --seed`) is below this: the loaders seed torch and numpy generators
# with seed * 1_000_003 + epoch * 7_919 + rank (the loop with seed * 7_919 + rank), which then stays
# far below 2**63 (a torch generator's limit), and numpy refuses a negative seed.
SEED_BOUND = 2**32


@dataclass(frozen=True)
class TrainingArguments:
    """What to train for and how.

    Names follow `transformers.TrainingArguments` where the concept exists there (output_dir,
    num_train_epochs, per_device_train_batch_size, learning_rate, lr_scheduler_type, warmup_ratio,
    fp16, bf16, seed, logging_steps, eval_steps, save_total_limit, ...).
    Checkpoints are written at the end of every epoch; `save_total_limit` keeps the best by
    `metric_for_best_model` (evaluated on the eval data, key without the `eval_` prefix).

    Session-specific:
        torch_compile_mode: torch.compile's mode for the compiled regions (None: "default");
            "reduce-overhead" replays the input layer and body, forward and backward, as CUDA
            graphs on a GPU (Hugging Face's name; setting it turns torch_compile on).
        loss_kernel: how the full softmax's chunks are computed. "torch": torch ops (Inductor's fused
            kernel under torch_compile on a GPU); "triton": raytr's Triton kernel on a GPU (the
            softmax and its gradient in place over a chunk's logits, `raytr.models.triton_loss`;
            needs the triton package, which CUDA builds of torch install); "auto": "triton" on a
            GPU where the triton package is installed, else "torch" (the 1M config's step on an
            H100: 1.29x the torch kernel's, bench/REPORT.md). Same loss and gradients.
        max_sequence_length: None reads it from the prepared schema (the one source of truth);
            a number (>= 2) overrides it.
        data_loader_engine: "merlin" (merlin-dataloader), "pyarrow", or "ray" (Ray Data shards).
        compute_metrics_each_n_steps: ranking metrics on the training batch every N steps (0: off).
        stop_after_epoch: end the run after this many epochs of the `num_train_epochs` (or
            `max_steps`) schedule, which the learning rate still follows (0: train it all). Refits
            an epoch chosen on validation, on more data, along the same trajectory: `max_steps`
            would squeeze the schedule into the shorter run instead.
        metrics_top_k: cut-offs for Precision/Recall/NDCG/MAP/MRR@k (distinct integers >= 1).
        report_to: ["tensorboard"] (scalars under output_dir/tensorboard/<run>), or [] / ["none"]
            for no logging; as in Hugging Face, one name alone ("none", "tensorboard") is a list of
            it. Other Hugging Face integrations (wandb, mlflow, ...) are not supported.
        predict_top_k: how many items `predict()` returns per session.
    Ray Train:
        launcher: "ray" runs the loop on Ray Train's TorchTrainer (DDP over `num_workers`);
            "local" runs the same loop in this process (one worker, no Ray; quick experiments).
        num_workers, use_gpu, resources_per_worker, max_failures (worker-group restarts, resuming
        from the last checkpoint), resume_from_checkpoint (a checkpoint directory to continue from),
        run_name (None: a new unique name, so a new run never resumes an old one by accident; a
        name is one directory under output_dir/runs/, so no "/", "\\", "." or "..").
    fp16 needs use_gpu (autocast to float16 and GradScaler run on CUDA only); bf16 also runs on the CPU.
    """

    output_dir: str = "runs/train"
    num_train_epochs: int = 3
    max_steps: int = -1
    stop_after_epoch: int = 0
    per_device_train_batch_size: int = 128
    per_device_eval_batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # "adamw_torch_fused": one fused kernel per parameter group on CUDA (CPU always runs the plain one).
    optim: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch_fused"
    max_grad_norm: float = 1.0
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    fp16: bool = False
    bf16: bool = False
    torch_compile: bool = False
    torch_compile_mode: CompileMode | None = None
    loss_kernel: LossKernel = "auto"
    seed: int = 42
    dataloader_drop_last: bool = False
    logging_steps: int = 50
    eval_steps: int = 0
    save_total_limit: int = 2
    metric_for_best_model: str = "ndcg@10"
    greater_is_better: bool = True
    report_to: tuple[str, ...] | str = ("tensorboard",)  # one name: a list of it (a tuple after __post_init__)
    disable_tqdm: bool = False
    max_sequence_length: int | None = None
    data_loader_engine: Literal["merlin", "pyarrow", "ray"] = "merlin"
    compute_metrics_each_n_steps: int = 0
    metrics_top_k: tuple[int, ...] = (5, 10, 20)
    predict_top_k: int = 20
    exclude_seen: bool = False
    launcher: Literal["ray", "local"] = "ray"
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0
    resume_from_checkpoint: str | None = None
    run_name: str | None = None

    def __post_init__(self) -> None:
        from raytr.config import ConfigError  # local: config imports this module

        if self.torch_compile_mode is not None:
            if self.torch_compile_mode not in COMPILE_MODES:
                raise ConfigError(f"training.torch_compile_mode={self.torch_compile_mode!r}: expected one of "
                                  f"{list(COMPILE_MODES)}")
            object.__setattr__(self, "torch_compile", True)  # as in Hugging Face: a mode implies compiling
        if self.fp16 and self.bf16:
            raise ConfigError("training.fp16 and training.bf16 are both true: choose one")
        if self.fp16 and not self.use_gpu:  # else the workers fail on it, after the run's directories are written
            raise ConfigError("training.fp16=true needs a GPU (training.use_gpu=true); on the CPU use "
                              "training.bf16=true, or neither")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_BOUND:
            raise ConfigError(f"training.seed={self.seed!r}: expected an integer from 0 to 2**32 - 1 "
                              f"({SEED_BOUND - 1})")
        if self.max_sequence_length is not None and self.max_sequence_length < 2:  # 0 would mean the schema's
            raise ConfigError(f"training.max_sequence_length={self.max_sequence_length}: expected >= 2 (an input "
                              "and a target), or null for the prepared schema's")
        self._check_run_name()
        if self.num_train_epochs < 1 and self.max_steps <= 0:
            raise ConfigError(f"training.num_train_epochs={self.num_train_epochs}: expected >= 1")
        if self.stop_after_epoch < 0 or (self.max_steps <= 0 and self.stop_after_epoch > self.num_train_epochs):
            raise ConfigError(f"training.stop_after_epoch={self.stop_after_epoch}: expected 0 (off) or an epoch "
                              f"of the schedule, 1..num_train_epochs={self.num_train_epochs}")
        if self.per_device_train_batch_size < 1 or self.per_device_eval_batch_size < 1:
            raise ConfigError("training.per_device_*_batch_size must be >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"training.learning_rate={self.learning_rate}: expected a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"training.weight_decay={self.weight_decay}: expected a finite number >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:  # NaN fails it too
                raise ConfigError(f"training.{key}={getattr(self, key)}: expected 0 <= beta < 1")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ConfigError(f"training.max_grad_norm={self.max_grad_norm}: expected a finite number >= 0 "
                              "(0: no clipping)")
        for key in ("warmup_steps", "logging_steps", "eval_steps", "compute_metrics_each_n_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"training.{key}={getattr(self, key)}: expected >= 0 (0: off)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"training.warmup_ratio={self.warmup_ratio}: expected 0 <= r < 1")
        self._check_metrics_top_k()
        self._check_report_to()
        from raytr.metrics import METRIC_NAMES

        reported = [f"{name}@{k}" for k in self.metrics_top_k for name in METRIC_NAMES]
        if self.metric_for_best_model not in reported:  # else every checkpoint would rank the same
            raise ConfigError(f"training.metric_for_best_model={self.metric_for_best_model!r} is not among the "
                              f"metrics evaluation reports with training.metrics_top_k={list(self.metrics_top_k)}: "
                              f"choose one of {reported}")
        if self.save_total_limit < 1:  # the launchers would keep one anyway, or none at all
            raise ConfigError(f"training.save_total_limit={self.save_total_limit}: expected >= 1 (checkpoints kept)")
        if self.predict_top_k < 1:
            raise ConfigError(f"training.predict_top_k={self.predict_top_k}: expected >= 1")
        if self.num_workers < 1:
            raise ConfigError(f"training.num_workers={self.num_workers}: expected >= 1")
        if self.launcher == "local" and self.num_workers > 1:
            raise ConfigError(f"training.launcher='local' runs one worker; num_workers={self.num_workers} needs 'ray'")
        if self.max_failures < 0:
            raise ConfigError(f"training.max_failures={self.max_failures}: expected >= 0")
        bad = {k: v for k, v in self.resources_per_worker.items()
               if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))
               or not (math.isfinite(v) and v >= 0)}
        if bad:  # else Ray Train fails on them after the run started
            raise ConfigError(f"training.resources_per_worker={dict(self.resources_per_worker)}: expected a resource "
                              f"name mapped to a finite number >= 0 for each resource, got {bad}; e.g. "
                              "{CPU: 2, GPU: 1} (YAML needs a space after each colon)")
        if self.launcher == "local" and self.data_loader_engine == "ray":  # Ray Data shards come from Ray Train
            raise ConfigError("training.data_loader_engine='ray' needs training.launcher='ray' (Ray Data feeds Ray "
                              "Train's workers); with training.launcher='local' use data_loader_engine 'merlin' or "
                              "'pyarrow'")

    def _check_metrics_top_k(self) -> None:
        from raytr.config import ConfigError

        top_k = list(self.metrics_top_k)
        # Metrics are keyed by cut-off: a repeated one would be computed twice under one name.
        if (not top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in top_k)
                or len(set(top_k)) != len(top_k)):
            raise ConfigError(f"training.metrics_top_k={top_k}: expected a non-empty list of distinct integers "
                              ">= 1, e.g. [5, 10, 20]")

    def _check_run_name(self) -> None:
        from raytr.config import ConfigError

        name = self.run_name
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            # The run's directory is output_dir/runs/<run_name>: a path there would put it elsewhere.
            raise ConfigError(f"training.run_name={name!r}: expected one plain directory name (not empty, '.' or "
                              "'..', no '/' or '\\'), e.g. gpt2-day6; the run is written to <output>/runs/<run_name>")

    def _check_report_to(self) -> None:
        from raytr.config import ConfigError

        if isinstance(self.report_to, str):  # Hugging Face also takes one name: "none", "tensorboard"
            object.__setattr__(self, "report_to", (self.report_to,))
        names = list(self.report_to)
        unknown = [name for name in names if name not in REPORT_TO]
        if unknown or ("none" in names and len(names) > 1):
            raise ConfigError(f"training.report_to={names}: supported are ['tensorboard'] and [] or ['none'] "
                              f"(no logging){f'; {unknown} not supported' if unknown else ''}")

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled regions replay as CUDA graphs (on a GPU): each step must then tell
        torch that the previous step's graph outputs may be overwritten."""
        return self.torch_compile_mode in CUDAGRAPH_MODES  # a mode always turns torch_compile on

    @property
    def mixed_precision(self) -> str | None:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else None
