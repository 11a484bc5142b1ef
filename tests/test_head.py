"""Next-item head: chunked full softmax, sampled softmax with logQ, scores and top-k."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from raytr.features import FIRST_ITEM_ID, NULL_ID, OOV_ID, PAD_ID
from raytr.models.head import (
    CLASS_ALIGNMENT,
    SparseBias,
    chunked_cross_entropy,
    full_scores,
    log_uniform_log_prob,
    log_uniform_sample,
    sampled_softmax_loss,
    top_k,
)

NEG_INF = float("-inf")
RESERVED = [NEG_INF] * FIRST_ITEM_ID  # scores of padding, null and OOV, as full_scores sets them


class OpRecorder(TorchDispatchMode):
    """Records the largest tensor any op produces, and the input dtypes of softmax reductions
    (logsumexp, log-softmax, the max and exponentials of a hand-made softmax) and of matrix products."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.softmax_dtypes: list[torch.dtype] = []
        self.matmul_dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._log_softmax.default, torch.ops.aten.logsumexp.default, torch.ops.aten.amax.default,
                    torch.ops.aten.exp.default, torch.ops.aten.exp_.default):
            self.softmax_dtypes.append(args[0].dtype)
        if func is torch.ops.aten.mm.default:
            self.matmul_dtypes.append(args[0].dtype)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _case(N: int, V: int, D: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, requires_grad=True)
    targets = torch.randint(FIRST_ITEM_ID, V, (N,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_equals_plain(chunk_size, smoothing):
    hidden, weight, targets = _case(N=50, V=23, D=8)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size, smoothing)
    g_hidden, g_weight = torch.autograd.grad(loss, (hidden, weight))

    ref = F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID, label_smoothing=smoothing)
    r_hidden, r_weight = torch.autograd.grad(ref, (hidden, weight))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(g_hidden, r_hidden, atol=1e-6)
    assert torch.allclose(g_weight, r_weight, atol=1e-6)
    assert torch.all(g_weight[:FIRST_ITEM_ID] == 0)  # padding, null and OOV rows are not classes


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_with_a_sparse_bias_equals_plain(chunk_size, smoothing):
    """The bias goes into each chunk's logits before its softmax: the loss and the gradients of
    hidden, weight and the bias values are those of the materialised biased logits."""
    hidden, weight, targets = _case(N=50, V=23, D=8)
    bias = _sparse_bias(50, 23)
    values = bias.values.clone().requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size, smoothing, bias=SparseBias(bias.columns, values))
    grads = torch.autograd.grad(loss, (hidden, weight, values))

    ref_values = bias.values.clone().requires_grad_()
    logits = (hidden @ weight.T).scatter_add(1, bias.columns, ref_values)
    ref = F.cross_entropy(logits[:, FIRST_ITEM_ID:], targets - FIRST_ITEM_ID, label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, ref_values))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads))
    plain = chunked_cross_entropy(hidden, weight, targets, chunk_size, smoothing)
    assert abs(loss.item() - plain.item()) > 1e-3  # the bias moved the loss
    assert grads[2][bias.columns < FIRST_ITEM_ID].abs().max() == 0  # padding, null and OOV are not classes
    with torch.no_grad():  # the same without gradients
        assert torch.allclose(chunked_cross_entropy(hidden, weight, targets, chunk_size, smoothing, bias=bias), ref,
                              atol=1e-6)


def test_chunked_cross_entropy_materialises_only_chunks():
    N, V, D, chunk = 512, 3000, 4, 32
    hidden, weight, targets = _case(N, V, D)
    with OpRecorder() as rec:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk)
        loss.backward()
    padded = -(-V // CLASS_ALIGNMENT) * CLASS_ALIGNMENT  # the class dimension, aligned for the GEMMs
    assert rec.largest <= chunk * padded, rec.largest  # one chunk of logits (or its gradient) at most

    # The recorder sees the full matrix when it exists, so the bound above is meaningful.
    hidden, weight, targets = _case(N, V, D)
    with OpRecorder() as rec_plain:
        F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID).backward()
    assert rec_plain.largest >= N * (V - FIRST_ITEM_ID)


def test_chunked_cross_entropy_softmax_in_fp32_gemms_in_autocast_dtype():
    hidden, weight, targets = _case(N=40, V=50, D=8)
    with OpRecorder() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        g_hidden, g_weight = torch.autograd.grad(loss, (hidden, weight))
    assert rec.softmax_dtypes and all(d == torch.float32 for d in rec.softmax_dtypes)
    assert len(rec.matmul_dtypes) == 3 * 3 and all(d == torch.bfloat16 for d in rec.matmul_dtypes)  # 3 GEMMs x 3 chunks
    assert loss.dtype == torch.float32 and g_hidden.dtype == g_weight.dtype == torch.float32
    ref = F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID)
    r_hidden, r_weight = torch.autograd.grad(ref, (hidden, weight))
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()  # bf16 matmul, fp32 softmax
    assert torch.allclose(g_hidden, r_hidden, atol=0.05 * r_hidden.abs().max())
    assert torch.allclose(g_weight, r_weight, atol=0.05 * r_weight.abs().max())


def test_chunked_cross_entropy_recomputes_nothing_in_backward():
    hidden, weight, targets = _case(N=40, V=50, D=8)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
    with OpRecorder() as rec:
        loss.backward()
    assert rec.matmul_dtypes == []  # the gradients were made with the loss; backward only scales them


def test_chunked_cross_entropy_without_grad_matches_and_keeps_no_graph():
    hidden, weight, targets = _case(N=50, V=23, D=8)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, 7, 0.1)
    ref = F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID, label_smoothing=0.1)
    assert not loss.requires_grad and torch.allclose(loss, ref, atol=1e-6)


def test_chunk_rows_are_capped_for_huge_catalogs(monkeypatch):
    import raytr.models.head as head

    monkeypatch.setattr(head, "CPU_CHUNK_LOGITS", 1000)  # V = 100 -> at most 10 rows per chunk
    monkeypatch.setattr(head, "CPU_MIN_CHUNK_ROWS", 1)
    hidden, weight, targets = _case(N=64, V=100, D=4)
    with OpRecorder() as rec:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=4096)
        loss.backward()
    assert rec.largest <= 10 * 128  # 10 rows x the class dimension padded to 128
    ref = F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID)
    assert torch.allclose(loss, ref, atol=1e-6)


def test_chunk_rows_per_device(monkeypatch):
    from types import SimpleNamespace

    from raytr.models.head import chunk_rows

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    assert chunk_rows(4096, 50_000, gpu, 6) == 4096  # 1.2 GB of buffers: chunk_size decides
    assert chunk_rows(4096, 1_000_000, gpu, 4) == 2**31 // 1_000_000  # 2,147 rows in 8 GiB
    assert chunk_rows(4096, 1_000_000, gpu, 6) == 8 * 2**30 // 6 // 1_000_000  # 1,431
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=16 * 2**30))
    assert chunk_rows(4096, 1_000_000, gpu, 4) == 2**29 // 1_000_000  # 1/8 of a 16 GiB GPU
    assert chunk_rows(4096, 50_000, cpu, 6) == 2**22 // 50_000  # 83 rows: 16 MiB of logits on the CPU
    assert chunk_rows(4096, 1_000_000, cpu, 6) == 64  # the floor
    assert chunk_rows(4096, 500, cpu, 6) == 4096 and chunk_rows(16, 500, cpu, 6) == 16  # chunk_size still caps
    # No chunk_size (the default): the budget alone.
    assert chunk_rows(None, 50_000, cpu, 6) == 2**22 // 50_000
    assert chunk_rows(None, 5_000, gpu, 4) == 2**29 // 5_000  # still the 16 GiB GPU: 2 GiB / 4 bytes
    assert chunk_rows(None, 10**9, gpu, 4) == 1  # never zero rows
    assert chunk_rows(None, 10**6, torch.device("mps"), 4) == 2**31 // 4 // 10**6  # 2 GiB elsewhere: 536


@pytest.mark.parametrize(("dtype", "eager", "fused", "triton"), [(torch.float16, 6, 4, 2), (torch.bfloat16, 6, 4, 2),
                                                                 (torch.float32, 4, 8, 4)])
def test_chunk_kernels_declare_their_buffers(dtype, eager, fused, triton):
    """The in-place kernel holds half logits and their fp32 copy (fp32: one buffer); the fused one
    the logits and their gradient in the compute dtype; the Triton one the logits alone."""
    from raytr.models.head import EAGER_KERNEL, ChunkKernel, _fusable_chunk_loss_and_grads, triton_kernel

    assert EAGER_KERNEL.bytes_per_logit(dtype) == eager
    assert ChunkKernel(_fusable_chunk_loss_and_grads, buffers="logits_and_grad").bytes_per_logit(dtype) == fused
    assert triton_kernel(torch.device("cpu")).bytes_per_logit(dtype) == triton


@pytest.mark.parametrize("reserved", [PAD_ID, NULL_ID, OOV_ID])
def test_chunked_cross_entropy_rejects_padding_null_and_oov_targets(reserved):
    hidden, weight, _ = _case(N=3, V=10, D=4)
    with pytest.raises(ValueError, match=f"targets must lie in {FIRST_ITEM_ID}..9"):
        chunked_cross_entropy(hidden, weight, torch.tensor([FIRST_ITEM_ID, reserved, 5]), 2)


@pytest.mark.parametrize("loss_fn", [lambda h, w, t: chunked_cross_entropy(h, w, t, 4),
                                     lambda h, w, t: sampled_softmax_loss(h, w, t, 5)], ids=["full", "sampled"])
def test_empty_targets_give_zero_loss_with_gradients_for_hidden_and_weight(loss_fn):
    """Zero gradients, but gradients: under DDP an untied head's weight without one fails the step."""
    hidden, weight, _ = _case(N=0, V=10, D=4)  # both require grad
    loss = loss_fn(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert weight.grad is not None and not weight.grad.any() and hidden.grad is not None


@pytest.mark.parametrize("variant", ["repeat_bias", "repeat_mixture"])
def test_empty_targets_reach_the_repeat_parameters(variant):
    """A batch without targets still gives the repeat bias (and the mixture's gate) a gradient, for DDP."""
    from raytr.config import ModelConfig
    from raytr.models.head import NextItemHead, RepeatContext

    head = NextItemHead(ModelConfig(d_model=4, **{variant: True}), num_items=10, max_sequence_length=6)
    ids = torch.zeros(0, 6, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    loss = head(torch.zeros(0, 4, requires_grad=True), none, repeat=RepeatContext.at(ids, none, none))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


def test_repeat_bias_loss_materialises_only_chunks():
    """The head's repeat-bias loss goes through the chunked kernel with the bias in each chunk: no
    [N, V] logits, and the loss and the repeat weight's
    gradient are those of the materialised biased logits."""
    from raytr.config import ModelConfig
    from raytr.models.head import NextItemHead, RepeatContext, add_repeat_scores

    B, T, V, D, chunk = 64, 8, 3000, 4, 32
    head = NextItemHead(ModelConfig(d_model=D, repeat_bias=True, logits_chunk_size=chunk), num_items=V,
                        max_sequence_length=T)
    with torch.no_grad():
        head.repeat_weight.copy_(torch.linspace(2.0, -0.5, T))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST_ITEM_ID, 40, (B, T), generator=gen)  # 37 items: many repeats
    rows, positions = torch.arange(B).repeat_interleave(T - 1), torch.arange(T - 1).repeat(B)
    context = RepeatContext.at(ids, rows, positions)
    targets = ids[rows, positions + 1]
    hidden = torch.randn(rows.numel(), D, generator=gen, requires_grad=True)
    with OpRecorder() as rec:
        loss = head(hidden, targets, repeat=context)
        loss.backward()
    padded = -(-V // CLASS_ALIGNMENT) * CLASS_ALIGNMENT
    assert rec.largest <= chunk * padded, rec.largest
    got = (loss.detach(), hidden.grad.clone(), head.repeat_weight.grad.clone())

    hidden.grad = head.repeat_weight.grad = None
    logits = add_repeat_scores(hidden @ head.weight.T, context, head.repeat_weight)
    ref = F.cross_entropy(logits[:, FIRST_ITEM_ID:], targets - FIRST_ITEM_ID)
    ref.backward()
    assert torch.allclose(got[0], ref, atol=1e-5)
    assert torch.allclose(got[1], hidden.grad, atol=1e-6)
    assert got[2].abs().sum() > 0 and torch.allclose(got[2], head.repeat_weight.grad, atol=1e-6)


def _mixture_case(V: int = 23, D: int = 8, T: int = 8, seed: int = 0):
    """Six sessions of T events (repeats, padding, OOV and null events, a session of OOV only)
    scored at every position; returns the context, targets, hidden, weight, repeat weight and gate."""
    from raytr.models.head import RepeatContext

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ITEM_ID, min(V, FIRST_ITEM_ID + 6), (6, T), generator=gen)  # few items: repeats
    ids[1, 5:] = PAD_ID
    ids[2, 2] = OOV_ID
    ids[2, 4] = NULL_ID
    ids[3] = OOV_ID  # nothing to repeat
    rows, positions = torch.arange(6).repeat_interleave(T), torch.arange(T).repeat(6)
    context = RepeatContext.at(ids, rows, positions)
    # Half the targets an item of the session (the next event's, where it is a real item), half any.
    session_item = ids[rows, (positions + 1) % T]
    anything = torch.randint(FIRST_ITEM_ID, V, (rows.numel(),), generator=gen)
    targets = torch.where((session_item >= FIRST_ITEM_ID) & (positions % 2 == 0), session_item, anything)
    hidden = torch.randn(rows.numel(), D, generator=gen, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, requires_grad=True)
    repeat_weight = torch.linspace(1.5, -0.5, T).requires_grad_()
    gate = torch.randn(rows.numel(), generator=gen).requires_grad_()
    return context, targets, hidden, weight, repeat_weight, gate


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_repeat_explore_loss_equals_the_materialised_mixture(chunk_size, smoothing):
    """The mixture's loss without [N, V] logits equals the label-smoothed NLL of the mixture's
    materialised log-probabilities (`repeat_explore_log_probs`, what scoring returns), in value and
    in the gradients of hidden, the item table, the repeat weight and the gate."""
    from raytr.models.head import repeat_explore_log_probs, repeat_explore_loss

    context, targets, hidden, weight, repeat_weight, gate = _mixture_case()
    leaves = (hidden, weight, repeat_weight, gate)
    loss = repeat_explore_loss(hidden, weight, targets, context, repeat_weight, gate, chunk_size, smoothing)
    grads = torch.autograd.grad(loss, leaves)

    log_p = repeat_explore_log_probs((hidden @ weight.T)[:, FIRST_ITEM_ID:], context, repeat_weight, gate)
    nll = -log_p.gather(1, (targets - FIRST_ITEM_ID)[:, None]).squeeze(1)
    ref = ((1 - smoothing) * nll - smoothing * log_p.mean(dim=1)).mean()
    ref_grads = torch.autograd.grad(ref, leaves)
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
    for name, g, r in zip(("hidden", "weight", "repeat_weight", "gate"), grads, ref_grads):
        assert r.abs().sum() > 0 and torch.allclose(g, r, atol=1e-5), name
    assert not grads[1][:FIRST_ITEM_ID].any()  # padding, null and OOV rows are not classes
    # The rows of the OOV-only session (3) are the plain softmax: no gradient reaches their gate.
    assert not grads[3][context.items[:, 0] == OOV_ID].any()


def test_summarise_logits_equals_torch_and_keeps_fp32_reductions_under_autocast():
    """logsumexp, picked logits (padding, OOV and repeated columns too) and their sum, each with its
    own upstream gradient, against the materialised logits; GEMMs in the autocast dtype."""
    from raytr.models.head import summarise_logits

    hidden, weight, targets = _case(N=40, V=50, D=8)
    columns = torch.cat([targets[:, None], torch.randint(0, 50, (40, 5)), targets[:, None]], dim=1)
    upstream = (torch.rand(40), torch.randn(40, 7), torch.randn(40))
    got = summarise_logits(hidden, weight, columns, chunk_size=16, with_total=True)
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(got, upstream)), (hidden, weight))
    logits = hidden @ weight.T
    ref = (logits[:, FIRST_ITEM_ID:].logsumexp(dim=1), logits.gather(1, columns), logits[:, FIRST_ITEM_ID:].sum(dim=1))
    ref_grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(ref, upstream)), (hidden, weight))
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(got, ref))
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
    without = summarise_logits(hidden, weight, columns, chunk_size=16)
    assert without.total is None and torch.equal(without.lse, got.lse) and torch.equal(without.picked, got.picked)
    with OpRecorder() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        low = summarise_logits(hidden, weight, columns, chunk_size=16, with_total=True)
        torch.autograd.grad(low.lse.sum() + low.picked.sum() + low.total.sum(), (hidden, weight))
    assert all(t.dtype == torch.float32 for t in low)
    assert all(torch.allclose(g, r, atol=0.05 * r.abs().max().item()) for g, r in zip(low, ref))
    assert rec.softmax_dtypes and all(d == torch.float32 for d in rec.softmax_dtypes)
    # One GEMM per chunk forward, three per chunk backward (the logits made again), all in bf16.
    assert len(rec.matmul_dtypes) == 4 * 3 and all(d == torch.bfloat16 for d in rec.matmul_dtypes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repeat_explore_loss_under_autocast_follows_the_materialised_mixture(dtype):
    """Under autocast every logit the loss reads comes from its chunk GEMMs, reduced in fp32: with
    label smoothing and logits whose sum over 20,000 items lies far outside fp16's range, the loss
    and gradients are those of the materialised mixture on the same half-precision logits."""
    from raytr.models.head import repeat_explore_log_probs, repeat_explore_loss

    context, targets, hidden, weight, repeat_weight, gate = _mixture_case(V=20_000, D=8)
    with torch.no_grad():
        weight.mul_(0.3).add_(-1.0)  # logits around -3 x D: sums near -5e5
    leaves = (hidden, weight, repeat_weight, gate)
    with torch.autocast("cpu", dtype=dtype):
        loss = repeat_explore_loss(hidden, weight, targets, context, repeat_weight, gate, 64, 0.1)
        logits = (hidden @ weight.T).float()  # the same half-precision GEMM, materialised
    grads = torch.autograd.grad(loss, leaves)
    log_p = repeat_explore_log_probs(logits[:, FIRST_ITEM_ID:], context, repeat_weight, gate)
    nll = -log_p.gather(1, (targets - FIRST_ITEM_ID)[:, None]).squeeze(1)
    ref = (0.9 * nll - 0.1 * log_p.mean(dim=1)).mean()
    ref_grads = torch.autograd.grad(ref, leaves)
    assert logits.sum(dim=1).abs().max() > 65504 and torch.isfinite(loss)
    assert torch.allclose(loss, ref, rtol=1e-4), (loss, ref)
    for name, g, r in zip(("hidden", "weight", "repeat_weight", "gate"), grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-2, atol=1e-2 * r.abs().max().item()), name


def test_repeat_mixture_loss_materialises_only_chunks():
    """The head's mixture loss (with label smoothing) holds one chunk of logits at most, and beside it
    [N, T] buffers, nothing of [N, T, T] or [N, T, D]; and it equals the materialised one."""
    from raytr.config import ModelConfig
    from raytr.models.head import NextItemHead, repeat_explore_log_probs

    V, D, chunk = 3000, 16, 32
    context, targets, hidden, _, _, _ = _mixture_case(V=V, D=D, T=64)
    T = context.items.shape[1]
    head = NextItemHead(ModelConfig(d_model=D, repeat_mixture=True, logits_chunk_size=chunk, label_smoothing=0.1),
                        num_items=V, max_sequence_length=T)
    with torch.no_grad():
        head.repeat_weight.copy_(torch.linspace(2.0, -0.5, T))
        head.repeat_gate.bias.fill_(0.5)
    with OpRecorder() as rec:
        loss = head(hidden, targets, repeat=context)
        loss.backward()
    padded = -(-V // CLASS_ALIGNMENT) * CLASS_ALIGNMENT
    N = hidden.shape[0]
    assert rec.largest <= chunk * padded < min(N * V, N * T * T, N * T * D), rec.largest
    got = (loss.detach(), hidden.grad.clone(), head.repeat_weight.grad.clone(), head.weight.grad.clone())

    head.zero_grad()
    hidden.grad = None
    log_p = repeat_explore_log_probs((hidden @ head.weight.T)[:, FIRST_ITEM_ID:], context, head.repeat_weight,
                                     head.repeat_gate(hidden).squeeze(1))
    nll = -log_p.gather(1, (targets - FIRST_ITEM_ID)[:, None]).squeeze(1)
    ref = (0.9 * nll - 0.1 * log_p.mean(dim=1)).mean()
    ref.backward()
    assert torch.allclose(got[0], ref, atol=1e-5)
    for g, r in zip(got[1:], (hidden.grad, head.repeat_weight.grad, head.weight.grad)):
        assert r.abs().sum() > 0 and torch.allclose(g, r, atol=1e-6)


# The peak resident memory of the process's own address space (VmHWM). Not ru_maxrss: Linux keeps that
# across fork and exec, so a child of a large pytest process starts with the parent's peak.
PEAK_RSS = """
def peak_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc/self/status (VmHWM)")
def test_chunked_cross_entropy_peak_memory_is_bounded():
    """Real peak resident memory of a big case, chunked vs plain, in a fresh process."""
    script = PEAK_RSS + textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from raytr.features import FIRST_ITEM_ID
        from raytr.models.head import chunked_cross_entropy
        torch.set_num_threads(2)
        def peak_mb():
            return peak_bytes() / 2**20
        N, V, D = 4096, 20000, 32  # plain logits: 4096 x 20000 fp32 = 312 MiB
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, D, generator=g, requires_grad=True)
        w = torch.randn(V, D, generator=g, requires_grad=True)
        t = torch.randint(FIRST_ITEM_ID, V, (N,), generator=g)
        base = peak_mb()
        chunked_cross_entropy(h, w, t, chunk_size=128).backward()
        chunked = peak_mb() - base
        F.cross_entropy(h @ w[FIRST_ITEM_ID:].T, t - FIRST_ITEM_ID).backward()
        plain = peak_mb() - base
        print(chunked, plain)
        """
    )
    # glibc's dynamic mmap threshold keeps freed multi-MiB blocks in the heap, so peak RSS would
    # count every chunk ever freed; a fixed threshold returns them to the OS and RSS tracks live data.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    chunked_mb, plain_mb = map(float, out.stdout.split())
    assert plain_mb > 300, (chunked_mb, plain_mb)  # the plain path really holds [N, V] logits
    assert chunked_mb < 80, (chunked_mb, plain_mb)  # 128 x 20000 chunks: ~10 MiB each


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc/self/status (VmHWM)")
@pytest.mark.parametrize(("kernel", "dtype"), [("eager", "bfloat16"), ("eager", "float32"), ("compiled", "bfloat16"),
                                              ("compiled", "float32")])
def test_chunk_kernel_holds_no_more_than_it_declares_on_the_cpu(kernel, dtype):
    """What chunk_rows sizes GPU chunks by, checked where CI can: one chunk's real peak resident
    memory, in a fresh process (VmHWM), stays within the kernel's bytes_per_logit (Inductor plans the
    compiled kernel's buffers the same way for either device; the GPU test reads the allocator)."""
    script = PEAK_RSS + textwrap.dedent(
        f"""
        import torch
        from raytr.features import FIRST_ITEM_ID
        from raytr.models.head import EAGER_KERNEL, _padded_weight, compiled_kernel
        torch.set_num_threads(2)
        kernel, dtype = {"compiled_kernel()" if kernel == "compiled" else "EAGER_KERNEL"}, torch.{dtype}
        c, V, D = 512, 100_000, 32  # 51M logits
        g = torch.Generator().manual_seed(0)
        h = torch.randn(c, D, generator=g).to(dtype)
        w, valid = _padded_weight(torch.randn(V, D, generator=g) * 0.05, dtype)
        t = torch.randint(FIRST_ITEM_ID, V, (c,), generator=g)
        small = (h[:8], w[:1024], t[:8] % 1000 + FIRST_ITEM_ID, valid[:1024], 1000 - FIRST_ITEM_ID, 0.1, True)
        kernel.fn(*small)  # compiles (dynamic shapes) and warms up without touching a c x V buffer
        base = peak_bytes()
        loss, grad_hidden, grad_weight, _ = kernel.fn(h, w, t, valid, V - FIRST_ITEM_ID, 0.1, True)
        extra = peak_bytes() - base
        print(extra, kernel.bytes_per_logit(dtype) * c * w.shape[0], grad_hidden.nbytes + grad_weight.nbytes)
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS (see above)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    extra, declared, outputs = map(int, out.stdout.split())
    assert extra <= declared + outputs + 2**23, (extra, declared, outputs)
    assert extra > declared / 2, (extra, declared)  # the measurement sees the chunk at all


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc/self/status (VmHWM)")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_summarise_logits_holds_no_more_than_the_eager_kernel_declares(dtype):
    """The mixture's logit summary is sized by the eager kernel's bytes_per_logit: one chunk's real peak
    resident memory, forward and backward (which makes the softmax again), stays within it."""
    script = PEAK_RSS + textwrap.dedent(
        f"""
        import torch
        from raytr.models import head
        from raytr.models.head import EAGER_KERNEL, summarise_logits
        torch.set_num_threads(2)
        head.CPU_CHUNK_LOGITS = 2**30  # the GPU's budget in rows: one chunk of c rows
        dtype = torch.{dtype}
        c, V, D = 512, 100_000, 32  # one chunk of 51M logits
        g = torch.Generator().manual_seed(0)
        h = torch.randn(c, D, generator=g).requires_grad_()
        w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            columns = torch.randint(0, V, (c, 21), generator=g)
            summarise_logits(h[:8], w[:1024], columns[:8] % 1024, 8, True).lse.sum().backward()  # warms up
            h.grad = w.grad = None
            base = peak_bytes()
            out = summarise_logits(h, w, columns, chunk_size=c, with_total=True)
            forward = peak_bytes() - base
            (out.lse.sum() + out.picked.sum() + out.total.sum()).backward()
        # Beside the chunk: the padded weight in the GEMMs' dtype, its fp32 gradient and one chunk's.
        beside = V * D * (dtype.itemsize + 4 + dtype.itemsize) + h.nbytes * 2
        print(forward, peak_bytes() - base, EAGER_KERNEL.bytes_per_logit(dtype) * c * V, beside)
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS (see above)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    forward, both, declared, beside = map(int, out.stdout.split())
    assert both <= declared + beside + 2**23, (forward, both, declared, beside)
    assert forward > declared / 2, (forward, declared)  # the measurement sees the chunk at all


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to read the allocator's peak")
def test_chunked_cross_entropy_cuda_peak_memory():
    N, V, D, chunk = 8192, 50000, 64, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, D, device="cuda", generator=gen, requires_grad=True)
    w = torch.randn(V, D, device="cuda", generator=gen, requires_grad=True)
    t = torch.randint(FIRST_ITEM_ID, V, (N,), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    chunked_cross_entropy(h, w, t, chunk).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = N * V * 4
    assert extra < logits_bytes / 8, (extra, logits_bytes)


def _cuda_chunk(dtype: torch.dtype, smoothing: float) -> tuple:
    """A chunk kernel's arguments at a GPU chunk's size: 2,048 rows of 100,000 items (padded), D = 128."""
    from raytr.models.head import _padded_weight

    c, V, D = 2048, 100_000, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(c, D, device="cuda", generator=gen).to(dtype)
    w, valid = _padded_weight(torch.randn(V, D, device="cuda", generator=gen) * 0.05, dtype)
    t = torch.randint(FIRST_ITEM_ID, V, (c,), device="cuda", generator=gen)
    return h, w, t, valid, V - FIRST_ITEM_ID, smoothing, True


def _without_triton_interpreter() -> dict[str, str]:
    """This environment minus TRITON_INTERPRET (conftest.py sets it on a machine without CUDA)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to read the allocator's peak")
@pytest.mark.parametrize("kind", ["eager", "compiled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunk_kernel_holds_no_more_than_it_declares(kind, dtype):
    """chunk_rows sizes a GPU chunk by the kernel's bytes_per_logit: a kernel holding more buffers
    than it declares would overrun the chunk budget (and the 1M config's memory target)."""
    from raytr.models.head import EAGER_KERNEL, compiled_kernel, triton_kernel

    kernel = {"eager": lambda: EAGER_KERNEL, "compiled": compiled_kernel,
              "triton": lambda: triton_kernel(torch.device("cuda"))}[kind]()
    args = _cuda_chunk(dtype, smoothing=0.1)
    kernel.fn(*args)  # compiles, and allocates cuBLAS's workspace, before measuring
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, grad_hidden, grad_weight, _ = kernel.fn(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    outputs = grad_hidden.nbytes + grad_weight.nbytes
    hidden, weight = args[:2]  # [c, D], [Vp, D]
    declared = kernel.bytes_per_logit(dtype) * hidden.shape[0] * weight.shape[0]
    assert extra <= declared + outputs + 2**25, (extra, declared, outputs)
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the compiled Triton kernel on a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_triton_chunk_kernel_equals_the_in_place_one_on_cuda(dtype, smoothing):
    """The compiled Triton kernel (not the interpreter of the CPU tests) at a GPU chunk's size: 2,048
    rows of 100,000 items (25 blocks of 4,096 per row, the last one partly past the catalog). Also the
    one check of its bf16 rounding: the interpreter rounds bf16 stores toward zero, the GPU to nearest."""
    from raytr.models.head import _chunk_loss_and_grads, triton_kernel

    args = _cuda_chunk(dtype, smoothing)
    expected, got = _chunk_loss_and_grads(*args), triton_kernel(torch.device("cuda")).fn(*args)
    assert torch.allclose(got[0], expected[0], rtol=1e-4)
    assert got[3] is None and expected[3] is None  # no bias given, no bias gradient
    for g, e in zip(got[1:3], expected[1:3]):
        assert g.dtype == e.dtype == dtype
        assert float((g.float() - e.float()).norm() / e.float().norm()) < 1e-2


def test_full_scores_are_fp32_under_autocast():
    """bf16 scores would keep 8 bits: their ties would rank items by id, not by score."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(8, 64, generator=g), torch.randn(5000, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = full_scores(hidden, weight)
    expected = hidden @ weight.T
    assert scores.dtype == torch.float32 and torch.equal(scores[:, FIRST_ITEM_ID:], expected[:, FIRST_ITEM_ID:])
    assert scores[0, FIRST_ITEM_ID:].unique().numel() == 5000 - FIRST_ITEM_ID  # bf16 scores: 1,496 values


def test_log_uniform_sampler_matches_its_log_prob():
    V = 12  # real items: ids FIRST_ITEM_ID..11
    probs = log_uniform_log_prob(torch.arange(FIRST_ITEM_ID, V), V).double().exp()
    assert abs(probs.sum().item() - 1.0) < 1e-6
    assert torch.all(probs[:-1] > probs[1:])  # smaller id (more popular) is more likely
    ids, log_q = log_uniform_sample(V, 200_000, torch.Generator().manual_seed(0))
    assert ids.min() >= FIRST_ITEM_ID and ids.max() <= V - 1
    assert torch.allclose(log_q, log_uniform_log_prob(ids, V))
    freq = torch.bincount(ids - FIRST_ITEM_ID, minlength=V - FIRST_ITEM_ID).double() / ids.numel()
    assert torch.allclose(freq, probs, atol=0.005)


def test_sampled_softmax_matches_hand_computation():
    N, V, D, K = 4, 9, 3, 6
    hidden, weight, _ = _case(N, V, D, seed=1)
    targets = torch.tensor([FIRST_ITEM_ID, FIRST_ITEM_ID + 1, FIRST_ITEM_ID, V - 1])
    loss = sampled_softmax_loss(hidden, weight, targets, K, generator=torch.Generator().manual_seed(5))
    neg, _ = log_uniform_sample(V, K, torch.Generator().manual_seed(5))
    assert (neg == FIRST_ITEM_ID).any()  # this seed has accidental hits with targets FIRST_ITEM_ID

    def log_expected_count(i: int) -> float:
        r = i - FIRST_ITEM_ID
        return math.log(K) + math.log(math.log((r + 2) / (r + 1)) / math.log(V - FIRST_ITEM_ID + 1))

    h, w = hidden.detach(), weight.detach()
    total = 0.0
    for n in range(N):
        pos = float(h[n] @ w[targets[n]]) - log_expected_count(int(targets[n]))
        logits = [pos] + [
            float(h[n] @ w[j]) - log_expected_count(int(j)) for j in neg if int(j) != int(targets[n])
        ]
        total += -(pos - math.log(sum(math.exp(x) for x in logits)))
    assert abs(loss.item() - total / N) < 1e-5


def test_sampled_softmax_accidental_hits_are_masked():
    # V = FIRST_ITEM_ID + 1: the only real item is FIRST_ITEM_ID, so every sampled negative is the
    # positive: loss must be 0.
    hidden, weight, _ = _case(N=5, V=FIRST_ITEM_ID + 1, D=4)
    loss = sampled_softmax_loss(hidden, weight, torch.full((5,), FIRST_ITEM_ID), 8, label_smoothing=0.1,
                                generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_sampled_softmax_backward_reaches_hidden_and_weight():
    hidden, weight, targets = _case(N=10, V=30, D=4)
    sampled_softmax_loss(hidden, weight, targets, 8, 0.1, torch.Generator().manual_seed(0)).backward()
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
    assert torch.all(weight.grad[:FIRST_ITEM_ID] == 0)  # padding, null and OOV are never sampled


def test_full_scores_mask_padding_null_and_oov():
    hidden, weight, _ = _case(N=3, V=10, D=4)
    s = full_scores(hidden, weight)
    assert s.shape == (3, 10)
    assert torch.all(s[:, :FIRST_ITEM_ID] == NEG_INF)
    assert torch.allclose(s[:, FIRST_ITEM_ID:], (hidden @ weight.T)[:, FIRST_ITEM_ID:])


def test_top_k_breaks_ties_towards_smaller_ids():
    a = FIRST_ITEM_ID  # items a..a+4 score 1, 3, 3, 2, 3
    scores = torch.tensor([RESERVED + [1.0, 3.0, 3.0, 2.0, 3.0]])
    ids, vals = top_k(scores, 2)
    assert ids.tolist() == [[a + 1, a + 2]] and vals.tolist() == [[3.0, 3.0]]
    ids, _ = top_k(scores, 4)
    assert ids.tolist() == [[a + 1, a + 2, a + 4, a + 3]]
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[0, a + 1] = True
    ids, _ = top_k(scores, 3, exclude)
    assert ids.tolist() == [[a + 2, a + 4, a + 3]]


def test_top_k_never_returns_padding_null_or_oov_even_when_tied():
    scores = torch.zeros(2, FIRST_ITEM_ID + 4)  # reserved ids tie with everything and have the smallest ids
    ids, _ = top_k(scores, 4)
    real = list(range(FIRST_ITEM_ID, FIRST_ITEM_ID + 4))
    assert ids.tolist() == [real, real]


def test_top_k_matches_stable_sort_reference_on_integer_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 30), generator=gen).float()
    for k in (1, 5, 30 - FIRST_ITEM_ID):  # up to every recommendable item
        ids, vals = top_k(scores, k)
        s = scores.clone()
        s[:, :FIRST_ITEM_ID] = NEG_INF
        ref = s.sort(dim=1, descending=True, stable=True)
        assert torch.equal(ids, ref.indices[:, :k])
        assert torch.equal(vals, ref.values[:, :k])


def test_top_k_errors_name_k():
    V = FIRST_ITEM_ID + 4
    scores = torch.zeros(1, V)
    with pytest.raises(ValueError, match=rf"k=5 .*\(4: ids {FIRST_ITEM_ID}..{V - 1}\)"):
        top_k(scores, 5)  # only the 4 ids FIRST_ITEM_ID..V-1 are recommendable
    exclude = torch.zeros(1, V, dtype=torch.bool)
    exclude[0, FIRST_ITEM_ID:FIRST_ITEM_ID + 2] = True
    with pytest.raises(ValueError, match="k=3 .*after exclusions"):
        top_k(scores, 3, exclude)


def test_top_k_never_returns_an_item_scored_minus_inf_or_nan():
    """The metrics count a target scored -inf or NaN as unrecommendable (a miss at every k): top_k
    must never return one, even unexcluded (torch.topk puts NaN first, and -inf ties go by id)."""
    first = FIRST_ITEM_ID
    scores = torch.tensor([RESERVED + [0.5, NEG_INF, float("nan"), 0.1, NEG_INF]])
    ids, vals = top_k(scores, 2)
    assert ids.tolist() == [[first, first + 3]] and vals.tolist() == [[0.5, pytest.approx(0.1)]]
    with pytest.raises(ValueError, match=r"k=3 .*-inf/NaN scores \(fewest in a row: 2\)"):
        top_k(scores, 3)


def test_top_k_order_agrees_with_metric_ranks():
    """An item's metric rank is its position in `top_k`'s list, or for tied items the position of the
    last of them (the metrics rank ties pessimistically, `top_k` lists them by id)."""
    from raytr.metrics import ranks_of_targets

    scores = torch.randint(0, 3, (20, 15), generator=torch.Generator().manual_seed(1)).float()
    scores[:, :FIRST_ITEM_ID] = NEG_INF
    k = 15 - FIRST_ITEM_ID  # every recommendable item
    ids, values = top_k(scores, k)
    last_of_ties = torch.cat([values[:, :-1] != values[:, 1:], torch.ones(20, 1, dtype=torch.bool)], 1)
    for position in range(k):
        ranks = ranks_of_targets(scores, ids[:, position])
        assert torch.all(ranks >= position + 1)
        assert torch.all(ranks[last_of_ties[:, position]] == position + 1)
    assert last_of_ties[:, :-1].any() and (~last_of_ties).any()  # the data holds both cases


def _sparse_bias(N: int, V: int, T: int = 5, seed: int = 0) -> SparseBias:
    """A SparseBias like the repeat bias's: item columns (padding, null and OOV among them, and a
    column named twice in a row) with values in -2..2, zero at padding."""
    gen = torch.Generator().manual_seed(seed)
    columns = torch.randint(0, V, (N, T), generator=gen)
    columns[:, 1] = columns[:, 0]  # the same item at two events: both values add up
    columns[::3, -1] = PAD_ID
    columns[1::4, -2] = OOV_ID  # not a class: its bias moves nothing
    values = (torch.rand(N, T, generator=gen) * 4 - 2) * (columns != PAD_ID)
    return SparseBias(columns, values)


def _assert_kernel_outputs_match(got, expected, dtype, with_grad, biased):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # Summed loss, reduced in fp32 by all; the Triton kernel adds a bias to half-precision logits
    # in their dtype (one more rounding, ~2e-5 of the loss here), the others in fp32.
    loss_rtol = 1e-4 if biased and dtype.itemsize < 4 else 1e-5
    assert torch.allclose(got[0], expected[0], rtol=loss_rtol, atol=1e-4)
    for g, e in zip(got[1:3], expected[1:3]):
        assert (g is None) == (e is None) == (not with_grad)
        if g is not None:
            assert g.dtype == e.dtype == dtype and torch.allclose(g.float(), e.float(), rtol=tol, atol=tol)
    assert (got[3] is None) == (expected[3] is None) == (not (with_grad and biased))
    if got[3] is not None:  # d loss / d bias values, fp32 from every kernel
        assert got[3].dtype == expected[3].dtype == torch.float32
        assert torch.allclose(got[3], expected[3], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("biased", [False, True])
def test_fusable_chunk_kernel_equals_the_in_place_one(dtype, smoothing, with_grad, biased):
    """The form torch.compile gets computes what the eager in-place kernel does, padding and a
    sparse bias included."""
    from raytr.models.head import _chunk_loss_and_grads, _fusable_chunk_loss_and_grads, _padded_weight

    hidden, weight, targets = _case(N=37, V=23, D=8, seed=3)
    w, valid = _padded_weight(weight.detach(), dtype)  # 64 classes: 3 reserved, 41 of padding
    args = (hidden.detach().to(dtype), w, targets, valid, 23 - FIRST_ITEM_ID, smoothing, with_grad,
            _sparse_bias(37, 23) if biased else None)
    expected, got = _chunk_loss_and_grads(*args), _fusable_chunk_loss_and_grads(*args)
    _assert_kernel_outputs_match(got, expected, dtype, with_grad, biased)


@pytest.mark.slow
def test_compiled_chunk_kernel_gives_the_same_loss_and_gradients():
    """The head's compiled chunk kernel (what SessionModel.compile_regions sets on CUDA) gives the
    plain cross-entropy's loss and gradients."""
    from raytr.config import ModelConfig
    from raytr.models.head import NextItemHead

    head = NextItemHead(ModelConfig(d_model=8), num_items=23)
    head.compile_chunk_kernel()
    for n in (50, 37):  # a second size: the last chunk's rows vary, without recompiling per value
        hidden, weight, targets = _case(N=n, V=23, D=8, seed=n)
        loss = chunked_cross_entropy(hidden, weight, targets, 16, 0.1, kernel=head.kernel)
        grads = torch.autograd.grad(loss, (hidden, weight))
        ref = F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID, label_smoothing=0.1)
        ref_grads = torch.autograd.grad(ref, (hidden, weight))
        assert torch.allclose(loss, ref, atol=1e-5)
        assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
        # With a sparse bias (the repeat bias's loss), the bias values' gradient too.
        bias = _sparse_bias(n, 23, seed=n)
        values = bias.values.clone().requires_grad_()
        loss = chunked_cross_entropy(hidden, weight, targets, 16, 0.1, kernel=head.kernel,
                                     bias=SparseBias(bias.columns, values))
        grads = torch.autograd.grad(loss, (hidden, weight, values))
        logits = (hidden @ weight.T).scatter_add(1, bias.columns, values)
        ref = F.cross_entropy(logits[:, FIRST_ITEM_ID:], targets - FIRST_ITEM_ID, label_smoothing=0.1)
        ref_grads = torch.autograd.grad(ref, (hidden, weight, values))
        assert torch.allclose(loss, ref, atol=1e-5)
        assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))


# ------------------------------------------------------------------ the Triton chunk kernel
# Without a GPU conftest.py sets TRITON_INTERPRET=1: Triton then interprets the kernel on CPU tensors.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("biased", [False, True])
def test_triton_chunk_kernel_equals_the_in_place_one(dtype, smoothing, with_grad, biased):
    """The Triton kernel computes what the eager kernel does, padding, reserved ids and a sparse
    bias included; blocks of 16 columns make each row's softmax run over four blocks (the running max
    changes between them)."""
    from raytr.models.head import _chunk_loss_and_grads, _padded_weight, triton_kernel

    hidden, weight, targets = _case(N=37, V=23, D=8, seed=3)
    w, valid = _padded_weight(weight.detach(), dtype)  # 64 classes: 3 reserved, 41 of padding
    args = (hidden.detach().to(dtype), w, targets, valid, 23 - FIRST_ITEM_ID, smoothing, with_grad,
            _sparse_bias(37, 23) if biased else None)
    expected, got = _chunk_loss_and_grads(*args), triton_kernel(torch.device("cpu"), block=16).fn(*args)
    _assert_kernel_outputs_match(got, expected, dtype, with_grad, biased)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_chunked_cross_entropy_with_the_triton_kernel_equals_plain(scale):
    """Through chunked_cross_entropy (chunks of 16 rows, blocks of 64 of the 320 padded columns): the
    plain cross-entropy's loss and gradients, also for logits in the thousands (exp would overflow
    without the running max)."""
    from raytr.models.head import triton_kernel

    kernel = triton_kernel(torch.device("cpu"), block=64)
    hidden, weight, targets = _case(N=50, V=300, D=8, seed=5)
    with torch.no_grad():
        hidden.mul_(scale)
    loss = chunked_cross_entropy(hidden, weight, targets, 16, 0.1, kernel=kernel)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight[FIRST_ITEM_ID:].T, targets - FIRST_ITEM_ID, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5 * scale)


def test_triton_kernel_survives_a_first_block_of_overflowed_logits():
    """Half-precision logits that overflowed to -inf fill the first block: the running max stays -inf
    through it, and the loss and gradient are still torch's (no exp of -inf - -inf)."""
    from raytr.models.triton_loss import cross_entropy_rows_

    logits = torch.ones(2, 128)
    logits[:, :64] = NEG_INF
    logits[1, 64:] = torch.linspace(-3.0, 3.0, 64)
    targets = torch.tensor([70, 100])
    x = logits[:, FIRST_ITEM_ID:].clone().requires_grad_()
    ref = F.cross_entropy(x, targets - FIRST_ITEM_ID, reduction="none", label_smoothing=0.0)
    ref.sum().backward()
    grad = logits.clone()
    loss = cross_entropy_rows_(grad, targets, FIRST_ITEM_ID, 128, 0.0, True, block=64)
    assert torch.allclose(loss, ref.detach(), atol=1e-5)
    assert torch.allclose(grad[:, FIRST_ITEM_ID:], x.grad, atol=1e-6) and torch.all(grad[:, :FIRST_ITEM_ID] == 0)


def test_triton_kernel_rejects_what_it_cannot_compute():
    from raytr.models.triton_loss import cross_entropy_rows_

    logits, targets = torch.randn(4, 64), torch.tensor([3, 4, 5, 6])
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_rows_(logits.T, targets, 3, 4, 0.0, True)
    with pytest.raises(ValueError, match="classes 3..64: expected a non-empty range within the 64 columns"):
        cross_entropy_rows_(logits, targets, 3, 65, 0.0, True)
    with pytest.raises(ValueError, match="the first block must hold the first class"):
        cross_entropy_rows_(logits, targets, 3, 64, 0.0, True, block=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error off the GPU; this machine has one")
def test_triton_kernel_off_the_gpu_says_it_needs_cuda():
    """Without Triton's interpreter (which the other tests here use) the kernel refuses a CPU device."""
    script = "import torch\nfrom raytr.models.head import triton_kernel\ntriton_kernel(torch.device('cpu'))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=_without_triton_interpreter())
    assert out.returncode != 0
    assert "ValueError: the Triton loss kernel runs on CUDA GPUs, not on 'cpu'" in out.stderr


# Compiles the kernel as a launch would, for an H100, without a GPU: Triton's compiler, then ptxas -v on its PTX.
# In a fresh process: Triton's interpreter (TRITON_INTERPRET, set by conftest.py) and its compiler do not mix.
COMPILE_FOR_H100 = """
import re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from raytr.models import triton_loss

dtype = sys.argv[1]
signature = {"logits_ptr": f"*{dtype}", "row_stride": "i32", "targets_ptr": "*i64", "loss_ptr": "*fp32",
             "num_cols": "i32", "first_class": "i32", "end_class": "i32", "smoothing": "fp32",
             "BLOCK": "constexpr", "SMOOTHING": "constexpr", "WITH_GRAD": "constexpr"}
aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}  # what a launch with Vp % 64 == 0 specialises
source = ASTSource(fn=triton_loss._cross_entropy_rows, signature=signature, attrs=aligned,
                   constexprs={"BLOCK": triton_loss.DEFAULT_BLOCK, "SMOOTHING": True, "WITH_GRAD": True})
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": triton_loss.DEFAULT_WARPS}).asm["ptx"]
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "k.ptx").write_text(ptx)
    out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                         capture_output=True, text=True, check=True)
print(len(re.findall(r"ld[.]global[^\\n]*[.]v4", ptx)), len(re.findall(r"st[.]global[^\\n]*[.]v4", ptx)))
print(out.stdout + out.stderr)
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_triton_kernel_compiles_for_an_h100_with_vector_loads_and_no_spills(dtype):
    """What the interpreter cannot check: Triton's compiler and ptxas build the kernel for an H100
    (sm_90) at its default block and warps; each thread loads its half logits as 16-byte vectors
    (ld.global.v4: two per pass of 4,096 columns over 256 threads) and stores the gradient so, and
    no register spills to local memory."""
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100, dtype], capture_output=True, text=True,
                         env=_without_triton_interpreter())
    assert out.returncode == 0, out.stderr[-3000:]
    counts, report = out.stdout.split("\n", 1)
    assert counts == "4 2", (counts, report)  # vector loads (two per pass), vector stores
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
