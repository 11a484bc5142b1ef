"""The next-item head: scores are dot products with the item embedding table (weight tying).

Losses are named pure functions over (hidden, weight, targets):
- `chunked_cross_entropy`: full softmax over the catalog in row chunks, each chunk's gradients made
  in the same pass as its loss (a fused linear + cross-entropy), so [N, V] logits never exist at
  once and backward recomputes nothing; optionally with a `SparseBias` added to a few logits of
  each row (the repeat bias), which moves every row's normaliser, so it goes into each chunk;
- `repeat_explore_loss`: the repeat/explore mixture's NLL, the catalog reached only through a
  chunked summary of each row's logits (`summarise_logits`: logsumexp, a few picked, their sum);
- `sampled_softmax_loss`: shared log-uniform negatives with logQ correction.
Only ids FIRST_ITEM_ID..V-1 are classes: padding (0), null (1) and OOV (2) are never predicted.

Shape legend: N = positions with a target, D = d_model, V = item cardinality, K = negatives,
B = batch (sessions), k = recommendations per session.

Recommendation order (`top_k`): score descending, then id ascending (Categorify gives more frequent
items smaller ids). The metrics rank a held-out target after all items it ties with instead
(`raytr.metrics`): there the id order would reward ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from raytr.config import ModelConfig
from raytr.features import PAD_ID
from raytr.models.masking import FIRST_ITEM_ID


def _smoothed_nll(logp: torch.Tensor, target: torch.Tensor, smoothing: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row label-smoothed NLL, as F.cross_entropy defines it:
    (1 - s) * -logp[target] + s * mean over classes of -logp. `valid` [.., C] bool restricts the mean
    to real classes (e.g. excludes -inf accidental hits). logp [N, C], target [N] -> [N]."""
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    if smoothing == 0.0:
        return nll
    if valid is None:
        smooth = -logp.mean(dim=1)
    else:
        smooth = -logp.masked_fill(~valid, 0.0).sum(dim=1) / valid.sum(dim=1)
    return (1.0 - smoothing) * nll + smoothing * smooth


# On an accelerator a chunk's buffers take at most this many bytes ([rows, V] logits times the
# kernel's bytes per logit), and at most 1/CHUNK_MEMORY_SHARE of the device's memory: a batch of
# 20,480 targets is one chunk up to ~100k items (compiled, half precision), and a 1,000,000-item
# catalog gets 2,147-row chunks. Not smaller: every chunk costs its launches, reads the [V, D] weight
# twice and adds its weight gradient into the fp32 total (~4 GB of traffic at 10^6 items x 256).
CHUNK_BYTES = 8 * 2**30
CHUNK_MEMORY_SHARE = 8
# Other accelerators (mps, xpu, ...) report no memory size here: a quarter of CHUNK_BYTES, the
# 2 GiB the logit cap of 2^29 fp32 logits allowed before.
OTHER_ACCELERATOR_CHUNK_BYTES = 2 * 2**30
# On the CPU far fewer (16 MiB of fp32 logits): glibc gives big freed buffers back to the system, so
# a larger chunk's buffers fault their pages in again for every chunk, and never stay in cache.
# The loss at 50k items and 2,600 targets ran 1.8x faster than with 2^29 logits. At least 64 rows, for the
# same [V, D] pass per chunk (at 10^6 items 8-row chunks were 3x slower than 64).
CPU_CHUNK_LOGITS = 2**22
CPU_MIN_CHUNK_ROWS = 64
# The class dimension is padded to a multiple of this: with an odd catalog size (or the reserved
# rows sliced off) cuBLAS falls back to unaligned GEMM kernels several times slower on an H100.
CLASS_ALIGNMENT = 64


class SparseBias(NamedTuple):
    """Scores added to a few logits of each row before the softmax: row n gets values[n, t] at
    column columns[n, t] (item ids; a column named twice gets both values). columns [N, T] int64,
    values [N, T] fp32. The losses return d loss / d values, so the values may be learned."""

    columns: torch.Tensor
    values: torch.Tensor

    def rows(self, start: int, stop: int) -> "SparseBias":
        return SparseBias(self.columns[start:stop], self.values[start:stop])


def _logsumexp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row logsumexp of fp32 logits [c, Vp] (-inf off the classes) by hand, turning `logits` in place
    into their unnormalised softmax: one exp pass and no second [c, Vp] buffer (torch.logsumexp makes
    one). Returns (lse [c], the unnormalised softmax (`logits` itself), its row sums [c])."""
    top = logits.amax(dim=1)
    probs = logits.sub_(top[:, None]).exp_()  # 0 where not a class
    total = probs.sum(dim=1)
    return top + total.log(), probs, total


def _chunk_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                          num_classes: int, smoothing: float, with_grad: bool, bias: SparseBias | None = None):
    """One chunk of the fused linear + cross-entropy.

    hidden [c, D] and weight [Vp, D] in the compute dtype (rows past the catalog are zero
    padding), targets [c] item ids, valid [Vp] bool marking the `num_classes` real items, `bias`
    the chunk's rows of a SparseBias added to the logits (or None). Returns (summed loss,
    d loss/d hidden [c, D], d loss/d weight [Vp, D], d loss/d bias.values [c, T] fp32), the
    gradients of the summed loss, None without `with_grad` (the last also without `bias`; no float
    scale argument: a compiled copy would specialise on it). The logits are made once, reduced in
    fp32 (bf16/fp16 logsumexp over 10^5 items loses the target's mass) and turned in place into
    their gradient softmax - (1 - s) * onehot - s / C, so a chunk costs one [c, Vp] fp32 buffer.
    """
    logits = (hidden @ weight.T).float()  # [c, Vp]
    if bias is not None:
        logits.scatter_add_(1, bias.columns, bias.values)
    if smoothing:  # the mean logit over the classes as a matrix-vector product: no [c, Vp] temporary
        mean = logits.mv(valid.float()) / num_classes
    logits.masked_fill_(~valid, float("-inf"))
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # [c]
    lse, probs, total = _logsumexp_(logits)
    loss = lse - target_logit  # [c] -log p(target)
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - mean)
    if not with_grad:
        return loss.sum(), None, None, None
    grad = probs.mul_(total.reciprocal()[:, None])  # softmax
    if smoothing:
        grad.sub_(valid * (smoothing / num_classes))
    grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], smoothing - 1.0))
    grad_bias = grad.gather(1, bias.columns) if bias is not None else None  # [c, T], before the cast
    grad = grad.to(hidden.dtype)  # [c, Vp], entries in [-1, 1]: safe in fp16
    return loss.sum(), grad @ weight, grad.T @ hidden, grad_bias


def _fusable_chunk_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  valid: torch.Tensor, num_classes: int, smoothing: float, with_grad: bool,
                                  bias: SparseBias | None = None):
    """`_chunk_loss_and_grads` written without in-place ops, for torch.compile: the compiler then
    fuses the softmax into two kernels that read the GEMM's [c, Vp] logits in the compute dtype (one
    for the row max and sum, one writing the gradient straight in that dtype) instead of keeping a
    [c, Vp] fp32 buffer between them: 12 bytes moved per logit instead of 18 (Inductor's generated
    code; compiled for the CPU, the loss at 50k items and 512-2,600-row chunks ran in 681-693 ms
    against the in-place kernel's 812-834). Eagerly it would make several fresh buffers, which is
    why the eager path keeps the in-place version; the two agree (tests/test_head.py)."""
    raw = (hidden @ weight.T).float()  # [c, Vp]
    if bias is not None:
        raw = raw.scatter_add(1, bias.columns, bias.values)
    logits = torch.where(valid, raw, float("-inf"))
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # [c]
    top = logits.amax(dim=1, keepdim=True)  # [c, 1]
    total = torch.exp(logits - top).sum(dim=1, keepdim=True)  # [c, 1]
    lse = (top + total.log()).squeeze(1)
    loss = lse - target_logit  # [c] -log p(target)
    if smoothing:
        mean = torch.where(valid, logits, 0.0).sum(dim=1) / num_classes
        loss = (1.0 - smoothing) * loss + smoothing * (lse - mean)
    if not with_grad:
        return loss.sum(), None, None, None
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]  # [c, Vp]
    grad = torch.exp(logits - top) / total - (1.0 - smoothing) * onehot - (smoothing / num_classes) * valid
    grad_bias = grad.gather(1, bias.columns) if bias is not None else None  # [c, T] fp32
    grad = grad.to(hidden.dtype)  # [c, Vp], entries in [-1, 1]: safe in fp16
    return loss.sum(), grad @ weight, grad.T @ hidden, grad_bias


# How a chunk kernel holds a [c, Vp] chunk, which sizes the chunks (`ChunkKernel.bytes_per_logit`).
ChunkBuffers = Literal["fp32_copy", "logits_and_grad", "in_place"]


@dataclass(frozen=True)
class ChunkKernel:
    """A per-chunk loss-and-gradients function (signature of `_chunk_loss_and_grads`) and the
    buffers it holds per chunk, which size the chunks (`chunk_rows`)."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
    buffers: ChunkBuffers

    def bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Peak bytes the kernel holds per [c, Vp] logit when the GEMMs run in `dtype`. fp32_copy:
        the half logits while their fp32 copy is made, then the fp32 buffer while its half gradient
        is made (in fp32 one buffer does for all three). logits_and_grad: the logits and the gradient.
        in_place: the logits, which become the gradient."""
        if self.buffers == "fp32_copy":
            return 4 if dtype.itemsize >= 4 else 4 + dtype.itemsize
        if self.buffers == "logits_and_grad":
            return 2 * dtype.itemsize
        return dtype.itemsize


EAGER_KERNEL = ChunkKernel(_chunk_loss_and_grads, buffers="fp32_copy")


def compiled_kernel() -> ChunkKernel:
    """`_fusable_chunk_loss_and_grads` through torch.compile (dynamic shapes: the last chunk's rows
    vary from step to step)."""
    return ChunkKernel(torch.compile(_fusable_chunk_loss_and_grads, dynamic=True), buffers="logits_and_grad")


def triton_kernel(device: torch.device, block: int | None = None, num_warps: int | None = None) -> ChunkKernel:
    """The chunk's softmax and gradient as one Triton kernel over the GEMM's logits, in place
    (`raytr.models.triton_loss`): 6 bytes moved per half-precision logit and one [c, Vp] buffer, so
    twice the rows per chunk of `compiled_kernel`. `block`/`num_warps` override the kernel's
    defaults (benchmarks). Raises ValueError saying why where it cannot run: without the `triton`
    package, or on a device other than CUDA (unless TRITON_INTERPRET=1 was set before the import)."""
    try:
        from raytr.models import triton_loss  # the triton package: only for this kernel
    except ImportError as err:
        raise ValueError(f"the Triton loss kernel needs the triton package, which CUDA builds of torch "
                         f"install ({err})") from err
    if not triton_loss.runs_on(device):
        raise ValueError(f"the Triton loss kernel runs on CUDA GPUs, not on {device.type!r}")
    tuning = {"block": block or triton_loss.DEFAULT_BLOCK, "num_warps": num_warps or triton_loss.DEFAULT_WARPS}

    def chunk(hidden, weight, targets, valid, num_classes, smoothing, with_grad, bias=None):
        logits = hidden @ weight.T  # [c, Vp] in the compute dtype; becomes the gradient
        if bias is not None:
            logits.scatter_add_(1, bias.columns, bias.values.to(logits.dtype))
        loss = triton_loss.cross_entropy_rows_(logits, targets, FIRST_ITEM_ID, FIRST_ITEM_ID + num_classes,
                                               smoothing, with_grad, **tuning)
        if not with_grad:
            return loss.sum(), None, None, None
        grad_bias = logits.gather(1, bias.columns).float() if bias is not None else None
        return loss.sum(), logits @ weight, logits.T @ hidden, grad_bias

    return ChunkKernel(chunk, buffers="in_place")


def _padded_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The [V, D] weight as [Vp, D] in `dtype` (Vp a multiple of CLASS_ALIGNMENT, zero rows after V)
    and the [Vp] mask of real classes (ids FIRST_ITEM_ID..V-1): one copy, as the cast alone would be."""
    V, D = weight.shape
    padded = -(-V // CLASS_ALIGNMENT) * CLASS_ALIGNMENT
    out = weight.new_zeros((padded, D), dtype=dtype)
    out[:V].copy_(weight)
    ids = torch.arange(padded, device=weight.device)
    return out, (ids >= FIRST_ITEM_ID) & (ids < V)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _chunked_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, smoothing: float,
                  chunk_fn, dtype: torch.dtype, with_grad: bool, bias: SparseBias | None = None):
    """The mean loss over row chunks of `rows`, and with `with_grad` the gradients of the summed loss
    for hidden [N, D], weight [V, D] and the bias values [N, T] (None otherwise, the last also
    without `bias`; backward scales them once, with the mean's 1/N, rather than passing over the
    [V, D] gradient twice). GEMMs in `dtype`, autocast off (the casts are explicit)."""
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(dtype)
        w, valid = _padded_weight(weight, dtype)
        if bias is not None:
            bias = SparseBias(bias.columns, bias.values.detach().float())
        n, num_classes = h.shape[0], weight.shape[0] - FIRST_ITEM_ID
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_bias = torch.empty_like(bias.values) if with_grad and bias is not None else None
        grad_weight = None
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            loss, g_h, g_w, g_b = chunk_fn(h[start:stop], w, targets[start:stop], valid, num_classes, smoothing,
                                           with_grad, bias.rows(start, stop) if bias is not None else None)
            total += loss
            if with_grad:
                grad_hidden[start:stop] = g_h
                # The first chunk's gradient starts the fp32 total: no zero-filled [Vp, D] pass.
                grad_weight = g_w.float() if grad_weight is None else grad_weight.add_(g_w)
                if grad_bias is not None:
                    grad_bias[start:stop] = g_b
    if with_grad:
        grad_weight = grad_weight[: weight.shape[0]].to(weight.dtype)
    return total / n, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` (plus the sparse bias, if any) over the real items,
    computed chunk by chunk with the gradients made during forward (backward only scales them):
    three GEMMs per chunk, no recomputation, and never more than one chunk of logits alive."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, smoothing, chunk_fn, dtype, bias_columns, bias_values):
        bias = SparseBias(bias_columns, bias_values) if bias_columns is not None else None
        loss, grad_hidden, grad_weight, grad_bias = _chunked_pass(hidden, weight, targets, rows, smoothing, chunk_fn,
                                                                  dtype, True, bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.rows_total = hidden.shape[0]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output / ctx.rows_total  # of the mean, one pass over each gradient
        grad_bias = grad_bias * scale if grad_bias is not None else None
        return grad_hidden * scale, grad_weight * scale, None, None, None, None, None, None, grad_bias


def chunk_budget_bytes(device: torch.device) -> int:
    """The bytes one loss chunk's buffers may take on an accelerator: on CUDA CHUNK_BYTES, and at most
    1/CHUNK_MEMORY_SHARE of the device's memory; elsewhere OTHER_ACCELERATOR_CHUNK_BYTES."""
    if device.type == "cuda":
        return min(CHUNK_BYTES, torch.cuda.get_device_properties(device).total_memory // CHUNK_MEMORY_SHARE)
    return OTHER_ACCELERATOR_CHUNK_BYTES


def chunk_rows(chunk_size: int | None, num_items: int, device: torch.device, bytes_per_logit: int) -> int:
    """Rows per chunk of the fused loss: the logits a chunk may hold on `device`, and at most
    `chunk_size` (None: no other limit). On accelerators `chunk_budget_bytes` / `bytes_per_logit`
    (the kernel's): one chunk per step unless the catalog is large, since every chunk costs launches
    and a pass over the [V, D] weight. On the CPU CPU_CHUNK_LOGITS, but >= CPU_MIN_CHUNK_ROWS."""
    if device.type == "cpu":
        cap = max(CPU_MIN_CHUNK_ROWS, CPU_CHUNK_LOGITS // num_items)
    else:
        cap = chunk_budget_bytes(device) // bytes_per_logit // num_items
    return max(1, cap if chunk_size is None else min(chunk_size, cap))


def _no_targets_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero loss over a batch without targets that still reaches each of `tensors` (hidden, the
    weight, ...): under DDP (find_unused_parameters=False) an untied head's weight, or a repeat
    bias, without a gradient would fail the step."""
    return sum(t.sum() * 0.0 for t in tensors)


def _check_targets(targets: torch.Tensor, num_items: int) -> None:
    """ValueError unless every target is a real item id (a host sync)."""
    if bool((targets < FIRST_ITEM_ID).any()) or bool((targets >= num_items).any()):
        raise ValueError(f"targets must lie in {FIRST_ITEM_ID}..{num_items - 1} (0 = padding, 1 = null, 2 = OOV)")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int | None = None, label_smoothing: float = 0.0, check_targets: bool = True,
                          kernel: ChunkKernel = EAGER_KERNEL, bias: SparseBias | None = None) -> torch.Tensor:
    """Mean full-softmax cross-entropy of `targets` over the classes FIRST_ITEM_ID..V-1 (3..V-1).

    hidden [N, D], weight [V, D] (the item embedding table), targets [N] in FIRST_ITEM_ID..V-1,
    `bias` an optional SparseBias [N, T] added to the logits (its values get gradients too).
    Equal (in value and gradients) to
    `F.cross_entropy(logits[:, FIRST_ITEM_ID:], targets - FIRST_ITEM_ID, label_smoothing=s)` with
    `logits = (hidden @ weight.T).scatter_add(1, bias.columns, bias.values)`,
    but rows go through in chunks (`chunk_rows`: what the memory budget allows, at most `chunk_size`),
    and each chunk's gradients are made in the same pass as its loss: [N, V] logits never exist, and nothing
    is recomputed in backward. Under autocast the GEMMs run in the autocast dtype and the softmax
    in fp32. `check_targets=False` skips the target range check (a host sync) for callers that
    guarantee it; `kernel` may be `compiled_kernel()`.
    """
    if hidden.shape[0] == 0:
        return _no_targets_loss(hidden, weight, *((bias.values,) if bias is not None else ()))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected >= 1")
    if check_targets:
        _check_targets(targets, weight.shape[0])
    dtype = _compute_dtype(hidden)
    rows = chunk_rows(chunk_size, weight.shape[0], hidden.device, kernel.bytes_per_logit(dtype))
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.values.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows, label_smoothing, kernel.fn, dtype,
                                         *(bias if bias is not None else (None, None)))
    return _chunked_pass(hidden, weight, targets, rows, label_smoothing, kernel.fn, dtype, False, bias)[0]


def log_uniform_sample(num_items: int, num_samples: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_samples` ids from FIRST_ITEM_ID..V-1 (V = `num_items`) with replacement, under the
    log-uniform (Zipf-like) law P(id) = log((r + 2) / (r + 1)) / log(n + 1), r = id - FIRST_ITEM_ID,
    n = V - FIRST_ITEM_ID (the number of real items).

    Categorify numbers items by decreasing frequency, so this approximates popularity sampling.
    Returns (ids [K] int64, log_q [K] float32 = log P(id)).
    """
    n = num_items - FIRST_ITEM_ID
    if n < 1:
        raise ValueError(f"num_items={num_items}: need at least one real item (ids {FIRST_ITEM_ID}..V-1)")
    gen_device = generator.device if generator is not None else device
    u = torch.rand(num_samples, generator=generator, device=gen_device, dtype=torch.float64)
    # Inverse CDF: CDF(r) = log(r + 2) / log(n + 1), so r = floor(exp(u * log(n + 1))) - 1.
    r = (torch.exp(u * math.log(n + 1)).floor().long() - 1).clamp_(0, n - 1)
    ids = (r + FIRST_ITEM_ID).to(device)
    return ids, log_uniform_log_prob(ids, num_items)


def log_uniform_log_prob(ids: torch.Tensor, num_items: int) -> torch.Tensor:
    """log P(id) under `log_uniform_sample`'s law. ids [...] in FIRST_ITEM_ID..V-1 -> float32 [...]."""
    n = num_items - FIRST_ITEM_ID
    r = (ids - FIRST_ITEM_ID).double()
    return (torch.log(torch.log1p(1.0 / (r + 1.0))) - math.log(math.log(n + 1))).float()


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         num_negatives: int, label_smoothing: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy with logQ correction.

    hidden [N, D], weight [V, D], targets [N] in FIRST_ITEM_ID..V-1. K = `num_negatives` ids are drawn once per
    call and shared by all rows. Every logit (positive and negatives) is corrected by subtracting
    log(K * q(id)), the expected number of times the sampler draws that id, which makes the sampled
    softmax a consistent estimate of the full one. A negative equal to the row's positive (an
    accidental hit) is masked to -inf.
    """
    if hidden.shape[0] == 0:
        return _no_targets_loss(hidden, weight)
    V = weight.shape[0]
    neg_ids, neg_logq = log_uniform_sample(V, num_negatives, generator, hidden.device)  # [K], [K]
    correction = math.log(num_negatives)
    pos_logits = (hidden * weight[targets]).sum(-1).float()  # [N]
    pos_logits = pos_logits - (log_uniform_log_prob(targets, V) + correction)
    neg_logits = (hidden @ weight[neg_ids].T).float() - (neg_logq + correction)  # [N, K]
    hits = neg_ids[None, :] == targets[:, None]  # [N, K]
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)  # [N, 1 + K], positive in column 0
    logp = torch.log_softmax(logits, dim=-1)
    valid = torch.cat([torch.ones_like(hits[:, :1]), ~hits], dim=1)
    zeros = torch.zeros_like(targets)
    return _smoothed_nll(logp, zeros, label_smoothing, valid).mean()


def full_scores(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Scores of every item: hidden [N, D], weight [V, D] -> [N, V] float32, reserved ids (< FIRST_ITEM_ID) at -inf.
    In fp32 even under autocast: bf16 scores keep 8 bits, and their ties would rank by id instead of score."""
    with torch.autocast(hidden.device.type, enabled=False):
        scores = hidden.float() @ weight.float().T  # [N, V]
    scores[:, :FIRST_ITEM_ID] = float("-inf")
    return scores


def returnable(scores: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] bool: the items `top_k` may return: not a reserved id, not in `exclude`, and scored
    above -inf (NaN fails the comparison too)."""
    allowed = scores > float("-inf")
    allowed[:, :FIRST_ITEM_ID] = False
    if exclude is not None:
        allowed &= ~exclude
    return allowed


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items per row (score descending, then id ascending).

    scores [B, V]; exclude: optional [B, V] bool of items that must not be returned (reserved ids,
    and items scored -inf or NaN, which the metrics count as unrecommendable, are never returned).
    Returns (ids [B, k] int64, scores [B, k] float32). Raises ValueError naming k when a row has
    fewer than k returnable items (the serving path caps each row's k at its returnable count).

    torch.topk gives no order among equal scores, so the boundary is resolved explicitly: all items
    strictly above the k-th score, then the smallest ids among those equal to it.
    """
    B, V = scores.shape
    if k < 1:
        raise ValueError(f"k={k}: expected >= 1")
    s = scores.float()
    allowed = returnable(s, exclude)
    available = allowed.sum(dim=1)
    if k > V - FIRST_ITEM_ID:
        raise ValueError(
            f"k={k} is larger than the number of recommendable items ({V - FIRST_ITEM_ID}: ids {FIRST_ITEM_ID}..{V - 1})"
        )
    if bool((available < k).any()):
        raise ValueError(
            f"k={k} is larger than the number of recommendable items left after exclusions and -inf/NaN "
            f"scores (fewest in a row: {int(available.min())}); lower k"
        )
    s = s.masked_fill(~allowed, float("-inf"))
    kth = s.topk(k, dim=1).values[:, -1:]  # [B, 1]
    above = (s > kth) & allowed
    tied = (s == kth) & allowed
    need = k - above.sum(dim=1, keepdim=True)  # [B, 1] how many tied items to take
    take_tied = tied & (tied.cumsum(dim=1) <= need)  # cumsum runs over ascending ids
    chosen = above | take_tied  # exactly k per row
    ids = chosen.nonzero()[:, 1].view(B, k)  # [B*k] -> [B, k], ascending ids within a row
    chosen_scores = s.gather(1, ids)
    # Stable descending sort keeps ascending ids among equal scores.
    order = chosen_scores.sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order), chosen_scores.gather(1, order)


def seen_items(item_ids: torch.Tensor, num_items: int) -> torch.Tensor:
    """[B, V] bool, True for every id that occurs in the session (padding excluded).
    item_ids [B, T]."""
    seen = torch.zeros(item_ids.shape[0], num_items, dtype=torch.bool, device=item_ids.device)
    seen.scatter_(1, item_ids, True)
    seen[:, PAD_ID] = False
    return seen


class RepeatContext(NamedTuple):
    """The events a repeat bias looks back on, one row per scored position.

    items [N, T]: the session's item ids (0 = padding); distance [N, T]: events from each one to the
    scored position (0: the scored position's own event; < 0: after it, ignored); until_next [N, T]:
    events from each one to the next occurrence of its item in the session (past the session's end
    when there is none), so an event is its item's latest at the scored position when
    distance < until_next."""

    items: torch.Tensor
    distance: torch.Tensor
    until_next: torch.Tensor

    @classmethod
    def at(cls, item_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> "RepeatContext":
        """Scoring position `positions[n]` of session `rows[n]` of item_ids [B, T]."""
        T = item_ids.shape[1]
        steps = torch.arange(T, device=item_ids.device)
        same_later = (item_ids[:, :, None] == item_ids[:, None, :]) & (steps[None, :] > steps[:, None])  # [B, T, T]
        next_at = torch.where(same_later, steps, T).amin(dim=2)  # [B, T]; T: no later occurrence
        return cls(item_ids.index_select(0, rows), positions[:, None] - steps[None, :],
                   (next_at - steps).index_select(0, rows))


def repeat_bias(context: RepeatContext, weight: torch.Tensor) -> SparseBias:
    """The repeat bias as a SparseBias over the [N, V] scores: weight[d] at every item whose latest
    occurrence up to the scored position was d events before it; weight [R], distances beyond R - 1
    use its last entry. Every other event (a later occurrence, padding) adds 0.

    Only the latest occurrence counts: summed over occurrences (as before 2026-11-29), an item seen
    twice a few events back outscored the one just viewed: on YOOCHOOSE's day 5 that was why nearly
    every session repeating its last item that xlnet-clm did not rank first lost it."""
    keep = (context.distance >= 0) & (context.distance < context.until_next) & (context.items != PAD_ID)
    steps = context.distance.clamp(0, weight.shape[0] - 1)
    return SparseBias(context.items, weight.float()[steps] * keep)  # values [N, T]


def add_repeat_scores(scores: torch.Tensor, context: RepeatContext, weight: torch.Tensor) -> torch.Tensor:
    """scores [N, V] plus the `repeat_bias` of `context`."""
    bias = repeat_bias(context, weight)
    return scores.scatter_add(1, bias.columns, bias.values.to(scores.dtype))


# A seen item's repeat probability below this counts as zero: its log stays finite (no NaN gradient
# through log(0)), and at < 1e-30 it cannot move a ranking or a loss.
REPEAT_PROB_FLOOR = 1e-30


def _repeat_attention(event_logits: torch.Tensor, context: RepeatContext,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The repeat distribution's attention over each row's events: (probs [N, T], has_repeat [N]).

    event_logits [N, T] fp32: the catalog logit of each event's item; an event counts when it is a
    real item at or before the scored position (distance >= 0), with score event_logits + weight[d]
    (beyond R - 1 the last entry). probs are 0 at every other event, and everywhere in a row
    without one (has_repeat False)."""
    keep = (context.distance >= 0) & (context.items >= FIRST_ITEM_ID)  # [N, T]
    steps = context.distance.clamp(0, weight.shape[0] - 1)
    attention = (event_logits + weight.float()[steps]).masked_fill(~keep, float("-inf"))  # [N, T]
    has_repeat = keep.any(dim=1)  # [N]
    # A row with no event is normalised over zeros instead: its logsumexp of -inf would put NaN into
    # the gradients, though its repeat mass is gated off.
    norm = torch.where(has_repeat[:, None], attention, 0.0).logsumexp(dim=1, keepdim=True)  # [N, 1]
    return (attention - norm).exp(), has_repeat


def _gate_logs(gate_logit: torch.Tensor, has_repeat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log g, log(1 - g)) [N] of g = sigmoid(gate_logit): (-inf, 0) in a row with nothing to repeat."""
    gate = gate_logit.float()
    return (torch.where(has_repeat, nn.functional.logsigmoid(gate), float("-inf")),
            torch.where(has_repeat, nn.functional.logsigmoid(-gate), 0.0))


def _log_mass(p: torch.Tensor) -> torch.Tensor:
    """log p, -inf where p is 0, and no NaN gradient there."""
    return torch.where(p > 0, p.clamp_min(REPEAT_PROB_FLOOR).log(), float("-inf"))


def repeat_explore_log_probs(logits: torch.Tensor, context: RepeatContext, weight: torch.Tensor,
                             gate_logit: torch.Tensor) -> torch.Tensor:
    """log p(item) of the repeat/explore mixture, over the classes FIRST_ITEM_ID..V-1.

    logits [N, C] fp32 (column c is item FIRST_ITEM_ID + c), context: the session events of each row,
    weight [R]: the repeat attention's score by distance (beyond R - 1 its last entry), gate_logit [N].
    p(i) = g * P_repeat(i) + (1 - g) * softmax(logits)(i), g = sigmoid(gate_logit), where P_repeat
    attends over the row's events (distance >= 0, real items) with score logits[item] + weight[d]
    and gives each item the attention of its occurrences. A row without such an event is the
    softmax alone. Returns [N, C]; exactly -inf nowhere (the softmax is never 0 in fp32 logs).
    Scoring only: `repeat_explore_loss` is the same model's loss without the [N, C] logits.
    """
    columns = (context.items - FIRST_ITEM_ID).clamp_min(0)  # [N, T]; masked events: column 0, no mass
    probs, has_repeat = _repeat_attention(logits.gather(1, columns), context, weight)
    repeat = torch.zeros_like(logits).scatter_add(1, columns, probs)  # [N, C] P_repeat
    log_gate, log_explore_gate = _gate_logs(gate_logit, has_repeat)
    return torch.logaddexp(log_gate[:, None] + _log_mass(repeat),
                           log_explore_gate[:, None] + logits.log_softmax(dim=1))


class LogitSummary(NamedTuple):
    """What a loss needs of each row's [V] logits besides their softmax's gradient: lse [N] their
    logsumexp over the classes, picked [N, K] those at the asked item columns, total [N] their sum
    over the classes (None unless asked). All fp32."""

    lse: torch.Tensor
    picked: torch.Tensor
    total: torch.Tensor | None


class _ChunkedLogitSummary(torch.autograd.Function):
    """`summarise_logits` chunk by chunk: GEMMs in `dtype`, reductions in fp32. Backward makes each
    chunk's logits again: their gradient (the softmax weighted by each row's upstream gradient, plus
    the picked and summed logits' own) depends on upstream gradients forward cannot know, so it
    cannot be made in advance as `_LinearCrossEntropy`'s is (one more GEMM per chunk than that loss)."""

    @staticmethod
    def forward(ctx, hidden, weight, columns, rows, dtype, with_total):
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            w, valid = _padded_weight(weight, dtype)
            n = h.shape[0]
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            picked = torch.empty(columns.shape, dtype=torch.float32, device=h.device)
            total = torch.empty(n, dtype=torch.float32, device=h.device) if with_total else None
            classes = valid.float()
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                logits = (h[start:stop] @ w.T).float()  # [c, Vp]
                picked[start:stop] = logits.gather(1, columns[start:stop])
                if with_total:
                    total[start:stop] = logits.mv(classes)
                lse[start:stop] = _logsumexp_(logits.masked_fill_(~valid, float("-inf")))[0]
        ctx.save_for_backward(hidden, weight, columns, lse)
        ctx.rows, ctx.dtype = rows, dtype
        return lse, picked, total

    @staticmethod
    def backward(ctx, grad_lse, grad_picked, grad_total):
        hidden, weight, columns, lse = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(ctx.dtype)
            w, valid = _padded_weight(weight, ctx.dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = None
            for start in range(0, h.shape[0], ctx.rows):
                stop = min(start + ctx.rows, h.shape[0])
                logits = (h[start:stop] @ w.T).float().masked_fill_(~valid, float("-inf"))
                grad = logits.sub_(lse[start:stop, None]).exp_().mul_(grad_lse[start:stop, None])  # 0 off the classes
                if grad_total is not None:
                    grad.addcmul_(grad_total[start:stop, None], valid[None, :])
                grad = grad.scatter_add_(1, columns[start:stop], grad_picked[start:stop]).to(ctx.dtype)
                grad_hidden[start:stop] = grad @ w
                g_w = grad.T @ h[start:stop]
                grad_weight = g_w.float() if grad_weight is None else grad_weight.add_(g_w)
        return grad_hidden, grad_weight[: weight.shape[0]].to(weight.dtype), None, None, None, None


def summarise_logits(hidden: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor, chunk_size: int | None = None,
                     with_total: bool = False) -> LogitSummary:
    """The `LogitSummary` of `hidden @ weight.T` (classes FIRST_ITEM_ID..V-1; columns [N, K] item ids
    < V, any), never holding more than one chunk of logits (`chunk_rows`, as `chunked_cross_entropy`
    with the eager kernel). hidden [N, D] (N >= 1), weight [V, D]; under autocast the GEMMs run in its
    dtype, and everything returned comes from the same GEMMs (the picked logits are those the
    logsumexp saw)."""
    dtype = _compute_dtype(hidden)
    rows = chunk_rows(chunk_size, weight.shape[0], hidden.device, EAGER_KERNEL.bytes_per_logit(dtype))
    return LogitSummary(*_ChunkedLogitSummary.apply(hidden, weight, columns, rows, dtype, with_total))


def _item_mass(probs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """[N, T]: at each event, the sum of `probs` over the row's events of the same item. Through a
    sort of each row's items, so [N, T] buffers, not the [N, T, T] of comparing every pair."""
    ordered, order = items.sort(dim=1)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = torch.empty_like(order).scatter_(1, order, new_run.long().cumsum(dim=1) - 1)  # [N, T] each event's item
    return torch.zeros_like(probs).scatter_add(1, run, probs).gather(1, run)


def repeat_explore_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, context: RepeatContext,
                        repeat_weight: torch.Tensor, gate_logit: torch.Tensor, chunk_size: int | None = None,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean label-smoothed NLL of `targets` under the repeat/explore mixture (`repeat_explore_log_probs`
    of `hidden @ weight.T`), without [N, V] logits: the mixture needs the catalog only through each
    row's logsumexp, the logits of its target and its T events, and with smoothing the sum of its
    logits (`summarise_logits`, one chunk at a time). Beside the chunk, [N, T] buffers only.

    With z the logits, L their logsumexp and a(i) = log g + log P_repeat(i), b(i) = log(1 - g) + z(i) - L,
    log p(i) = logaddexp(a(i), b(i)), and a(i) = -inf for every item not in the row's session, so the
    mean over the C classes is (sum_i b(i) + sum over the session's items of (log p(i) - b(i))) / C.
    hidden [N, D] (N >= 1), weight [V, D], targets [N] in FIRST_ITEM_ID..V-1, gate_logit [N].
    """
    items = context.items
    summary = summarise_logits(hidden, weight, torch.cat([targets[:, None], items], dim=1), chunk_size,
                               with_total=bool(label_smoothing))
    lse, target_logit, event_logits = summary.lse, summary.picked[:, 0], summary.picked[:, 1:]
    probs, has_repeat = _repeat_attention(event_logits, context, repeat_weight)
    log_gate, log_explore_gate = _gate_logs(gate_logit, has_repeat)
    repeat_target = (probs * (items == targets[:, None])).sum(dim=1)  # [N] P_repeat(target)
    nll = -torch.logaddexp(log_gate + _log_mass(repeat_target), log_explore_gate + target_logit - lse)
    if not label_smoothing:
        return nll.mean()
    num_classes = weight.shape[0] - FIRST_ITEM_ID
    explore = log_explore_gate[:, None] + event_logits - lse[:, None]  # [N, T] b(item) of each event
    repeat = _item_mass(probs, items)  # [N, T] P_repeat(item) of each event
    # Each of the session's items once: at its latest event up to the row's position.
    latest = (context.distance >= 0) & (context.distance < context.until_next) & (repeat > 0)
    lift = torch.logaddexp(log_gate[:, None] + _log_mass(repeat), explore) - explore
    log_p_sum = num_classes * (log_explore_gate - lse) + summary.total + torch.where(latest, lift, 0.0).sum(dim=1)
    return ((1.0 - label_smoothing) * nll - label_smoothing * log_p_sum / num_classes).mean()


class NextItemHead(nn.Module):
    """Scores and losses against a [V, D] weight: the item embedding table when tied, else its own.

    forward(hidden [N, D], targets [N], generator, repeat) -> mean loss for `config.loss`.
    With `config.repeat_bias`, `repeat_weight` [max_sequence_length] holds the learned score of an
    item seen d events ago (d = 0: the current event), added to the scores and logits of the
    positions `repeat` (a RepeatContext) describes; its loss is the chunked one with the bias in
    each chunk. With `config.repeat_mixture` it scores the repeat distribution's attention by
    distance instead, and `repeat_gate` (D -> 1) makes the mixture's gate from each position's
    hidden state (`repeat_explore_log_probs`); scores are then log-probabilities, and its loss is
    `repeat_explore_loss`, which holds no more than one chunk of logits either (with its own eager
    logsumexp: `kernel` serves the plain and biased softmax only).
    """

    def __init__(self, config: ModelConfig, num_items: int, tied_weight: nn.Parameter | None = None,
                 max_sequence_length: int | None = None) -> None:
        super().__init__()
        self.loss_type = config.loss
        self.chunk_size = config.logits_chunk_size
        self.num_negatives = config.num_negatives
        self.label_smoothing = config.label_smoothing
        self.kernel = EAGER_KERNEL  # compile_chunk_kernel or training.loss_kernel swap in another
        if tied_weight is not None:
            if tied_weight.shape != (num_items, config.d_model):
                raise ValueError(
                    f"tied weight has shape {tuple(tied_weight.shape)}, expected ({num_items}, {config.d_model})"
                )
            self.weight = tied_weight
        else:
            self.weight = nn.Parameter(torch.randn(num_items, config.d_model) * 0.02)
        self.repeat_weight: nn.Parameter | None = None
        self.repeat_gate: nn.Linear | None = None
        self.score_temperature = config.score_temperature  # `scores` only: training never divides
        if config.scores_repeats:
            if max_sequence_length is None or max_sequence_length < 1:
                raise ValueError("model.repeat_bias and model.repeat_mixture need the max_sequence_length "
                                 "(one weight per distance)")
            self.repeat_weight = nn.Parameter(torch.zeros(max_sequence_length))  # starts as no bias at all
        if config.repeat_mixture:
            self.repeat_gate = nn.Linear(config.d_model, 1)
            nn.init.zeros_(self.repeat_gate.weight)  # starts at g = 1/2 for every position
            nn.init.zeros_(self.repeat_gate.bias)

    def compile_chunk_kernel(self) -> None:
        """The full softmax's per-chunk kernel through torch.compile (`compiled_kernel`)."""
        self.kernel = compiled_kernel()

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None,
                check_targets: bool = True, repeat: RepeatContext | None = None) -> torch.Tensor:
        if self.repeat_weight is not None and repeat is None:
            raise ValueError("model.repeat_bias/repeat_mixture: the loss needs the RepeatContext of its targets")
        if self.repeat_gate is not None:
            return self._mixture_loss(hidden, targets, repeat, check_targets)
        if self.loss_type == "full":
            bias = repeat_bias(repeat, self.repeat_weight) if self.repeat_weight is not None else None
            return chunked_cross_entropy(hidden, self.weight, targets, self.chunk_size, self.label_smoothing,
                                         check_targets=check_targets, kernel=self.kernel, bias=bias)
        return sampled_softmax_loss(hidden, self.weight, targets, self.num_negatives, self.label_smoothing, generator)

    def _mixture_loss(self, hidden: torch.Tensor, targets: torch.Tensor, repeat: RepeatContext,
                      check_targets: bool) -> torch.Tensor:
        if hidden.shape[0] == 0:
            return _no_targets_loss(hidden, self.weight, self.repeat_weight, *self.repeat_gate.parameters())
        if check_targets:
            _check_targets(targets, self.weight.shape[0])
        return repeat_explore_loss(hidden, self.weight, targets, repeat, self.repeat_weight, self._gate_logit(hidden),
                                   self.chunk_size, self.label_smoothing)

    def _gate_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """The mixture's gate logit [N] of each position, in fp32."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.repeat_gate(hidden.float()).squeeze(1)

    def scores(self, hidden: torch.Tensor, repeat: RepeatContext | None = None) -> torch.Tensor:
        """hidden [N, D] -> [N, V] float32 with reserved ids (< FIRST_ITEM_ID) at -inf; with a repeat
        bias or mixture, `repeat` says which items each row has seen (the mixture's scores are
        log-probabilities), the catalog logits divided by `score_temperature` first."""
        scores = full_scores(hidden, self.weight)
        if self.repeat_weight is None:
            return scores
        if repeat is None:
            raise ValueError("model.repeat_bias/repeat_mixture: scoring needs the RepeatContext of each row")
        if self.score_temperature != 1.0:
            scores = scores / self.score_temperature
        if self.repeat_gate is None:
            return add_repeat_scores(scores, repeat, self.repeat_weight)
        mixed = repeat_explore_log_probs(scores[:, FIRST_ITEM_ID:], repeat, self.repeat_weight, self._gate_logit(hidden))
        return torch.cat([scores[:, :FIRST_ITEM_ID], mixed], dim=1)
