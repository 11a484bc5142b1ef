"""The full-softmax loss alone: raytr's chunked loss with each way of compiling its chunk kernel,
against the bare loop's compiled cross-entropy, forward and backward, at one catalog size.

    python bench/head_kernels.py                        # GPU, the 1M config's head -> results/head-kernels-cuda.json
    python bench/head_kernels.py --precision bf16 --variants bare,compiled,compiled-two-pass

Why: in the 1M config's step (H200, 2026-11-27, bench/profile_gpu.py) raytr's GPU time went 32.5 ms
a step to the compiled chunk kernel's one fused softmax kernel (three chunks), where the bare loop's
two softmax kernels took 13.2 ms over the same logits. Each variant changes one thing about the
chunk kernel, so the figures say what the time goes to:

- `bare`: the bare loop's head (`F.cross_entropy` of the whole [N, V] logits), compiled;
- `eager`: raytr's in-place kernel, not compiled (what the CPU and an uncompiled model run);
- `compiled`: raytr's kernel under `torch_compile` today (`compiled_kernel()`: every size symbolic);
- `compiled-static`: the same function compiled for fixed sizes (one compile per row count);
- `compiled-auto`: torch.compile's default, sizes symbolic only once they change (the rows). A
  guess to check: with every size symbolic Inductor cannot prove a row's start 16-byte aligned
  (the row length Vp is symbolic) and loads the half logits one at a time; with Vp fixed (here and
  in `compiled-static`) it can vectorise, as in the bare loop's static kernels;
- `compiled-inplace`: the in-place (eager) kernel compiled;
- `compiled-no-online`: `compiled` without Inductor's online softmax (`online_softmax=False`: the row
  max and the sum of exponentials in two reductions instead of one running pair);
- `compiled-tuned`: `compiled` with Inductor's coordinate-descent tuning of its Triton kernels' block
  sizes and warps (`coordinate_descent_tuning=True`);
- `compiled-two-pass`: the half-precision logits made by one GEMM, then two compiled kernels, one
  for each row's max and sum, one writing the gradient, as the bare loop's compiled code does;
- `triton`: raytr's Triton kernel (`training.loss_kernel: triton`, `raytr.models.triton_loss`): the
  GEMM's logits read twice and overwritten by their gradient, 4,096 columns a block, 8 warps a row;
  one buffer per chunk, so chunks of twice the rows;
- `triton-2k`, `triton-8k`, `triton-32k`: the same with blocks of 2,048 columns and 4 warps, 8,192
  and 16, 32,768 and 32 (more programs per SM against fewer, longer loop iterations);
- `eager-repeat-bias`, `bare-repeat-bias`, `compiled-repeat-bias`, `triton-repeat-bias`: the loss of
  `model.repeat_bias`, a SparseBias of REPEAT_EVENTS session items per row added to the logits, through
  each kernel; `bare-repeat-bias` is the biased cross-entropy of the whole [N, V] logits (compiled),
  as raytr computed it until 2026-12-06. They compare with `eager-repeat-bias` (error) and
  `bare-repeat-bias` (speed); a variant that runs out of memory is recorded as such, not as an error.

Each row also says whether the variant computes eager's loss and gradients (relative error). On the
CPU (--device cpu) it runs at a small size; the tests run it that way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_code_argument,
    code_version,
    envelope,
    gpu_name,
    load_average,
    setup_logging,
    timestamp,
    write_result,
)

REPEAT = "-repeat-bias"  # the suffix of the variants with the repeat bias's SparseBias
VARIANTS = ("bare", "eager", "compiled", "triton", "triton-2k", "triton-8k", "triton-32k", "compiled-static",
            "compiled-auto", "compiled-inplace", "compiled-no-online", "compiled-tuned", "compiled-two-pass",
            "bare" + REPEAT, "eager" + REPEAT, "compiled" + REPEAT, "triton" + REPEAT)
REPEAT_EVENTS = 20  # the 1M config's sequence length: the session items a row's repeat bias names


def measurement_order(variants: list[str]) -> list[str]:
    """Each family (plain, then with the repeat bias) in turn: its eager variant first (the others'
    loss and gradients are compared with its; measured even when not asked for), then its bare
    loop (the others' speed), then the rest as given."""
    order = []
    for suffix in ("", REPEAT):
        members = [v for v in variants if v.endswith(REPEAT) == bool(suffix)]
        if members:
            firsts = ["eager" + suffix] + [v for v in ("bare" + suffix,) if v in members]
            order += firsts + [v for v in members if v not in firsts]
    return order


def _softmax_stats(logits, targets, valid, num_classes: int, smoothing: float):
    """[c] row max, sum of exponentials and loss of half-precision logits [c, Vp] (fp32 inside)."""
    import torch

    x = torch.where(valid, logits.float(), float("-inf"))
    top = x.amax(dim=1, keepdim=True)
    total = torch.exp(x - top).sum(dim=1, keepdim=True)
    lse = (top + total.log()).squeeze(1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - torch.where(valid, x, 0.0).sum(dim=1) / num_classes)
    return top, total, loss


def _softmax_grad(logits, top, total, targets, valid, num_classes: int, smoothing: float):
    """d loss / d logits [c, Vp] in the logits' dtype."""
    import torch

    x = torch.where(valid, logits.float(), float("-inf"))
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = torch.exp(x - top) / total - (1.0 - smoothing) * onehot - (smoothing / num_classes) * valid
    return grad.to(logits.dtype)


def two_pass_kernel():
    """A chunk kernel (`_chunk_loss_and_grads`' signature) whose softmax is two compiled kernels
    around GEMMs left to cuBLAS, like the bare loop's compiled code."""
    import torch

    from raytr.models.head import ChunkKernel

    stats = torch.compile(_softmax_stats, dynamic=True)
    softmax_grad = torch.compile(_softmax_grad, dynamic=True)

    def chunk(hidden, weight, targets, valid, num_classes, smoothing, with_grad, bias=None):
        if bias is not None:
            raise ValueError("the two-pass benchmark kernel measures the plain loss: it takes no SparseBias")
        logits = hidden @ weight.T  # [c, Vp] in the compute dtype
        top, total, loss = stats(logits, targets, valid, num_classes, smoothing)
        if not with_grad:
            return loss.sum(), None, None, None
        grad = softmax_grad(logits, top, total, targets, valid, num_classes, smoothing)
        return loss.sum(), grad @ weight, grad.T @ hidden, None

    return ChunkKernel(chunk, buffers="logits_and_grad")


def loss_function(variant: str, chunk_size: int | None, device, repeat) -> tuple[Callable, Any]:
    """((hidden [N, D], weight [V, D], targets [N]) -> mean loss, the chunk kernel or None) for `variant`;
    `repeat` is the SparseBias the -repeat-bias variants add."""
    import torch
    import torch.nn.functional as F

    from raytr.models import head

    bias = repeat if variant.endswith(REPEAT) else None
    variant = variant.removesuffix(REPEAT)
    if variant == "bare" and bias is None:
        return torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t)), None
    if variant == "bare":
        return torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float().scatter_add(1, *bias), t)), None
    def fused(**compile_args) -> head.ChunkKernel:
        return head.ChunkKernel(torch.compile(head._fusable_chunk_loss_and_grads, dynamic=True, **compile_args),
                                buffers="logits_and_grad")

    kernels = {
        "eager": lambda: head.EAGER_KERNEL,
        "compiled": head.compiled_kernel,
        "compiled-static": lambda: head.ChunkKernel(torch.compile(head._fusable_chunk_loss_and_grads, dynamic=False),
                                                    buffers="logits_and_grad"),
        "compiled-auto": lambda: head.ChunkKernel(torch.compile(head._fusable_chunk_loss_and_grads), buffers="logits_and_grad"),
        "compiled-inplace": lambda: head.ChunkKernel(torch.compile(head._chunk_loss_and_grads, dynamic=True),
                                                     buffers="fp32_copy"),
        "compiled-no-online": lambda: fused(options={"online_softmax": False}),
        "compiled-tuned": lambda: fused(options={"coordinate_descent_tuning": True}),
        "compiled-two-pass": two_pass_kernel,
        "triton": lambda: head.triton_kernel(device),
        "triton-2k": lambda: head.triton_kernel(device, block=2048, num_warps=4),
        "triton-8k": lambda: head.triton_kernel(device, block=8192, num_warps=16),
        "triton-32k": lambda: head.triton_kernel(device, block=32768, num_warps=32),
    }
    if variant not in kernels:
        raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    kernel = kernels[variant]()
    return (lambda h, w, t: head.chunked_cross_entropy(h, w, t, chunk_size, check_targets=False, kernel=kernel,
                                                       bias=bias)), kernel


def measure(variant: str, inputs: tuple, args, reference: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    from bench.train import _autocast
    from raytr.models.head import chunk_rows

    hidden, weight, targets, repeat = inputs
    fn, kernel = loss_function(variant, args.chunk_size, hidden.device, repeat)
    cuda = hidden.device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]  # sizes the chunks

    def step():
        hidden.grad = weight.grad = None
        with _autocast(args.precision, hidden.device):  # as the bare loops of bench/train.py
            loss = fn(hidden, weight, targets)
        loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    row = {"variant": variant, "ms_per_step": ms,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "loss": float(loss.detach()), "grad_hidden": hidden.grad.detach().clone(), "grad_weight": weight.grad.detach().clone()}
    if kernel is not None:
        row["chunk_rows"] = chunk_rows(args.chunk_size, weight.shape[0], hidden.device, kernel.bytes_per_logit(dtype))
    if reference is not None:  # the same loss and gradients as eager's?
        row["loss_rel_error"] = abs(row["loss"] - reference["loss"]) / abs(reference["loss"])
        for name in ("grad_hidden", "grad_weight"):
            ref = reference[name].float()
            row[f"{name}_rel_error"] = float((row[name].float() - ref).norm() / ref.norm().clamp_min(1e-30))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--items", type=int, default=None, help="catalog size (default: 1,000,000 on cuda, 5,000 on cpu)")
    p.add_argument("--d-model", type=int, default=None, help="default: 256 on cuda, 32 on cpu")
    p.add_argument("--targets", type=int, default=None,
                   help="rows (target positions) per step (default: 6,400 on cuda, ~ the 1M config's; 256 on cpu)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--chunk-size", type=int, default=None, help="cap on the rows per chunk (default: the memory budget's)")
    p.add_argument("--variants", default=None,
                   help="comma list (default: all; on the CPU the triton ones only under TRITON_INTERPRET=1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output", default=None, help="results/<name>.json (default: head-kernels-<device>)")
    add_code_argument(p)
    args = p.parse_args(argv)
    setup_logging()
    import torch
    from raytr.models.head import SparseBias

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here (use --device cpu)")
    gpu = args.device == "cuda"
    items = args.items or (1_000_000 if gpu else 5_000)
    d_model = args.d_model or (256 if gpu else 32)
    n = args.targets or (6_400 if gpu else 256)
    started, load_before = time.time(), load_average()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d_model, generator=gen).to(args.device).requires_grad_()
    weight = (torch.randn(items, d_model, generator=gen) * 0.02).to(args.device).requires_grad_()
    targets = torch.randint(3, items, (n,), generator=gen).to(args.device)
    # A repeat bias over REPEAT_EVENTS events per row: each item seen at two of them, scores of 0-3.
    columns = torch.randint(3, items, (n, REPEAT_EVENTS // 2), generator=gen).repeat(1, 2)
    repeat = SparseBias(columns.to(args.device), (torch.rand(n, REPEAT_EVENTS, generator=gen) * 3).to(args.device))
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.variants is None:
        from raytr.models.head import triton_kernel

        try:
            triton_kernel(torch.device(args.device))
        except ValueError as err:  # e.g. the CPU without Triton's interpreter
            print(f"leaving out the triton variants: {err}", flush=True)
            variants = [v for v in variants if not v.startswith("triton")]
    stamp = {"measured": timestamp(started), "code": args.code or code_version(), "gpu": gpu_name()}
    references, bares, results = {}, {}, []
    for variant in measurement_order(variants):
        family = REPEAT if variant.endswith(REPEAT) else ""
        torch._dynamo.reset()
        try:
            row = measure(variant, (hidden, weight, targets, repeat), args, references.get(family))
        except torch.OutOfMemoryError as err:  # a finding (the materialised loss at 10^6 items), not a failure
            row = {"variant": variant, "out_of_memory": str(err).split("\n")[0][:200]}
            hidden.grad = weight.grad = None  # what the failed step left, then the cache: the next variant gets both back
            torch.cuda.empty_cache()
        except Exception as err:  # one failing variant must not lose the others' figures
            row = {"variant": variant, "error": repr(err)[:400]}
        measured = "ms_per_step" in row
        if variant == "eager" + family and measured:
            references[family] = row
        if variant == "bare" + family and measured:
            bares[family] = row
            for earlier in results:  # its family's eager, measured before it
                if "ms_per_step" in earlier and earlier["variant"] == "eager" + family:
                    earlier["speed_vs_bare"] = row["ms_per_step"] / earlier["ms_per_step"]
        out = {k: v for k, v in row.items() if not k.startswith("grad_") or k.endswith("_rel_error")}
        if family in bares and measured:
            out["speed_vs_bare"] = bares[family]["ms_per_step"] / row["ms_per_step"]
        print(f"{variant:20} " + (f"ERROR {row['error']}" if "error" in row else
                                  f"OUT OF MEMORY {row['out_of_memory']}" if not measured else
              f"{row['ms_per_step']:9.2f} ms/step  speed/bare {out.get('speed_vs_bare', float('nan')):5.2f}  "
              f"peak {row['peak_mem_gb'] or float('nan'):6.2f} GB  chunk rows {row.get('chunk_rows', '-')}  "
              f"rel. error vs eager: loss {row.get('loss_rel_error', 0):.1e}, "
              f"d hidden {row.get('grad_hidden_rel_error', 0):.1e}, d weight {row.get('grad_weight_rel_error', 0):.1e}"),
              flush=True)
        if variant in variants:
            results.append({**out, **stamp})
        # written after every variant: a run cut short (a device session's time limit) keeps what it measured
        write_result(args.output or f"head-kernels-{args.device}",
                     envelope("head-kernels", started, load_before, device=args.device, items=items, d_model=d_model,
                              targets=n, precision=args.precision, warmup=args.warmup, steps=args.steps,
                              chunk_size=args.chunk_size, results=results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
