"""One chunk of the full softmax's cross-entropy as a Triton kernel: each row's logits are read twice
(its running max and sum of exponentials, then its gradient) and overwritten by their gradient in
place, so the loss and gradient of a [c, Vp] chunk move 6 bytes per half-precision logit and need
no buffer beside the GEMM's logits.

Why: on the 1M config (H200, 2026-11-27, bench/profile_gpu.py) Inductor's fused kernel for the same
work (`head._fusable_chunk_loss_and_grads` compiled, every size symbolic) took 32.5 ms a step where
the bare loop's two softmax kernels took 13.2 ms over the same ~6,400 x 10^6 logits: ~1.2 against
~2.9 TB/s if each moves 6 bytes per logit (counted from the code, not measured), of the H200's 4.8.

CUDA only, and only where the `triton` package is installed (CUDA builds of torch bring it). With
TRITON_INTERPRET=1 set before this module is imported, Triton interprets the kernel on CPU tensors,
slowly: that is how the CPU tests check it.

Shape legend: c = rows of the chunk, Vp = catalog size padded to head.CLASS_ALIGNMENT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Columns per loop iteration (a power of two) and warps per row (one program per row: a chunk has
# thousands of rows). 4,096 half-precision logits over 8 warps are two 16-byte loads per thread, in
# 48-54 registers (ptxas for sm_90, without and with label smoothing): 4-5 programs fit an SM, 32-40
# KB of loads in flight, about what an H100 needs to near its bandwidth (~3.35 TB/s x ~1.3 us of
# latency / 132 SMs = ~33 KB). 8,192 over 16 warps takes 64 registers: 2 programs, 32 KB. Estimates
# from the compiler's output, not timings: bench/head_kernels.py's triton-* variants measure them.
DEFAULT_BLOCK = 4096
DEFAULT_WARPS = 8


@triton.jit
def _cross_entropy_rows(logits_ptr, row_stride, targets_ptr, loss_ptr, num_cols, first_class, end_class,
                        smoothing, BLOCK: tl.constexpr, SMOOTHING: tl.constexpr, WITH_GRAD: tl.constexpr):
    """Row `program_id` of logits [c, Vp]: its loss (fp32) into loss_ptr, and with WITH_GRAD the
    gradient of that loss for the row's logits over them. Classes are columns first_class..end_class-1;
    the others get probability and gradient 0. Loads are masked by `num_cols` alone (a multiple of 16:
    the loads stay vectorised) and the classes picked out afterwards."""
    row = tl.program_id(0).to(tl.int64)  # row * row_stride passes 2^31 at 10^6 items
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    num_classes = end_class - first_class
    # Read before pass 1: its reductions' barriers then order this read before any warp's pass-2
    # store, which may overwrite the target's column (another warp's) with its gradient.
    target_logit = tl.load(row_ptr + target).to(tl.float32)

    # Pass 1: the running max and the sum of exponentials below it (online softmax), in fp32. While
    # every class seen is -inf (overflowed logits) the max is -inf too: exponentials are then taken
    # against 0, never -inf - -inf.
    top = float("-inf")
    total = 0.0
    logit_sum = 0.0
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
        is_class = (cols >= first_class) & (cols < end_class)
        x = tl.where(is_class, x, float("-inf"))
        new_top = tl.maximum(top, tl.max(x, axis=0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(x - shift), axis=0)
        top = new_top
        if SMOOTHING:
            logit_sum += tl.sum(tl.where(is_class, x, 0.0), axis=0)
    lse = top + tl.log(total)
    loss = lse - target_logit
    if SMOOTHING:  # (1 - s) * -log p(target) + s * mean over the classes of -log p
        loss = (1.0 - smoothing) * loss + smoothing * (lse - logit_sum / num_classes)
    tl.store(loss_ptr + row, loss)

    # Pass 2: d loss / d logit = softmax - (1 - s) * onehot(target) - s / C over the classes, 0 elsewhere.
    if WITH_GRAD:
        scale = 1.0 / total
        for start in range(0, num_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < num_cols
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            is_class = (cols >= first_class) & (cols < end_class)
            grad = tl.where(is_class, tl.exp(x - top) * scale - smoothing / num_classes, 0.0)
            grad = tl.where(cols == target, grad - (1.0 - smoothing), grad)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def runs_on(device: torch.device) -> bool:
    """Whether the kernel runs on `device`'s tensors: CUDA ones, or any under Triton's interpreter."""
    return device.type == "cuda" or isinstance(_cross_entropy_rows, InterpretedFunction)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, first_class: int, end_class: int,
                        smoothing: float, with_grad: bool, block: int = DEFAULT_BLOCK,
                        num_warps: int = DEFAULT_WARPS) -> torch.Tensor:
    """Per-row label-smoothed cross-entropy of logits [c, Vp] (fp16, bf16 or fp32, rows contiguous)
    over the classes first_class..end_class-1, targets [c] among them -> loss [c] fp32. With
    `with_grad` the logits are overwritten by the gradient of the summed loss for them, in their
    dtype (entries in [-1, 1]); without it they are left as they are."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits: expected a [c, Vp] tensor with contiguous rows, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    if not 0 <= first_class < end_class <= logits.shape[1]:
        raise ValueError(f"classes {first_class}..{end_class - 1}: expected a non-empty range within the "
                         f"{logits.shape[1]} columns")
    block = min(block, triton.next_power_of_2(logits.shape[1]))
    if first_class >= block:
        raise ValueError(f"block={block}: the first block must hold the first class ({first_class})")
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_rows[(rows,)](
            logits, logits.stride(0), targets.contiguous(), loss, logits.shape[1], first_class, end_class,
            float(smoothing), BLOCK=block, SMOOTHING=bool(smoothing), WITH_GRAD=with_grad, num_warps=num_warps,
        )
    return loss
