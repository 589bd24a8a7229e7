"""Neighbourhood attention (natten's semantics) in pure PyTorch, in two forms that compute the same function.

Each query attends to exactly k keys per axis; windows shift inwards at the borders (no zero padding); the
relative-position bias is indexed by key - query + k - 1. [ASSUMED] an axis shorter than its kernel uses the whole
axis as window (natten refuses it). q (already scaled), k, v: (B, heads, head_dim, *spatial).

- ``neighborhood_attention``: softmax over the stacked k^d logits; memory O(k^d · heads · voxels) for the logits and
  weights (autograd keeps them all).
- ``gathered_neighborhood_attention``: the export form. Every window of every query in one gather of the keys and
  one of the values, indices built with a few broadcast operations whatever the window: an exported graph holds
  a handful of nodes instead of one gather per window offset and axis, each a plain elementwise op or a reduction
  over a leading axis. Memory O(k^d · heads · head_dim · voxels).
- ``streaming_neighborhood_attention``: the memory-lean form. One pass over the window offsets with a running
  maximum and sum (the online softmax); backward recomputes each offset's weight from the log-sum-exp and scatters
  its gradient back. Memory O(heads · head_dim · voxels): the size of q, k and v, whatever the window.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch


def _windows(spatial: Sequence[int], kernel: Sequence[int],
             device) -> Tuple[List[List[torch.Tensor]], List[List[torch.Tensor]]]:
    """Per axis and window offset: the key position and the relative-bias index of every query position."""
    key_index, rel_index = [], []
    for length, kk in zip(spatial, kernel):
        window = min(kk, length)
        pos = torch.arange(length, device=device)
        start = (pos - kk // 2).clamp(0, length - window)
        key_index.append([start + j for j in range(window)])
        rel_index.append([start + j - pos + kk - 1 for j in range(window)])
    return key_index, rel_index


def _iter_windows(t: torch.Tensor, indices: Sequence[Sequence[torch.Tensor]], first_axis: int, axis: int = 0):
    """Yield, for every window offset (last axis fastest, like itertools.product), ``t`` gathered so
    that position i holds the key that offset picks for query i. Depth-first, so only one gathered
    copy per axis is alive; the first axes' gathers are shared by all offsets of the later axes."""
    if axis == len(indices):
        yield t
        return
    for idx in indices[axis]:
        yield from _iter_windows(t.index_select(first_axis + axis, idx), indices, first_axis, axis + 1)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Sequence[int],
                           rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference form. ``rpb``: (heads, 2k-1, ...). Loops over the k^d window offsets, so memory is
    O(k^d · heads · voxels), never O(voxels²)."""
    key_index, rel_index = _windows(q.shape[3:], kernel, q.device)
    biases = _iter_windows(rpb, rel_index, 1) if rpb is not None else itertools.repeat(None)
    logits = []
    for kj, bias in zip(_iter_windows(k, key_index, 3), biases):
        logit = (q * kj).sum(2)  # (B, heads, *S)
        logits.append(logit if bias is None else logit + bias)
    # unbind, not attn[n]: each indexing's backward would zero-fill a gradient the size of all k^d weights
    weights = torch.stack(logits, dim=0).softmax(dim=0).unbind(0)
    out = 0
    for weight, vj in zip(weights, _iter_windows(v, key_index, 3)):
        out = out + weight.unsqueeze(2) * vj
    return out


def _window_indices(spatial: Sequence[int], kernel: Sequence[int], bias_shape: Sequence[int],
                    device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(key, rel), each (k^d, N): the flat key index and the flat relative-bias index of every window offset (last
    axis fastest) of every flat query position, built with broadcasts (a fixed number of operations)."""
    key = rel = None
    for length, kk, bias_len in zip(spatial, kernel, bias_shape):
        window = min(kk, length)
        pos = torch.arange(length, device=device)
        start = (pos - kk // 2).clamp(0, length - window)
        offset = torch.arange(window, device=device).unsqueeze(1)
        key_a, rel_a = start + offset, start + offset - pos + kk - 1   # (window, length)
        if key is None:
            key, rel = key_a, rel_a
        else:  # (K, M) x (w, L) -> (K, w, M, L)
            key = (key[:, None, :, None] * length + key_a[None, :, None, :]).flatten(2).flatten(0, 1)
            rel = (rel[:, None, :, None] * bias_len + rel_a[None, :, None, :]).flatten(2).flatten(0, 1)
    return key, rel


def gathered_neighborhood_attention_planes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                           spatial: Sequence[int], kernel: Sequence[int],
                                           rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gathered form on head-dim planes: q (already scaled), k, v (head_dim, B, N, heads) with N = prod(spatial)
    in row-major order; returns (head_dim, B, N, heads). Each gathered key is a contiguous row of ``heads`` values
    (ONNX Runtime's Gather spent 3x longer copying one value at a time), and the sums over head_dim run over the
    first axis: along the last one (head_dim = 1 to 4 values) ONNX Runtime's broadcasts and reductions run an inner
    loop per handful of values and took up to 7x longer."""
    d, b, n, heads = q.shape
    bias_shape = rpb.shape[1:] if rpb is not None else [2 * kk - 1 for kk in kernel]
    key, rel = _window_indices(spatial, kernel, bias_shape, q.device)
    windows = key.shape[0]
    flat_key = key.reshape(-1)
    keys = k.index_select(2, flat_key).reshape(d, b, windows, n, heads)
    products = q.unsqueeze(2) * keys
    # one plane needs no sum (ONNX Runtime's ReduceSum over a length-1 axis took as long as a 9-plane sum)
    logits = products.squeeze(0) if d == 1 else products.sum(0)  # (B, k^d, N, heads)
    if rpb is not None:
        logits = logits + rpb.flatten(1).t().index_select(0, rel.reshape(-1)).reshape(windows, n, heads)
    # the softmax over the window axis spelled out, normalised after the weighted sum: ONNX Runtime runs a Softmax
    # on any axis but the last as transposes around a row kernel (rows of k^d values here), 5x slower than these
    weights = (logits - logits.amax(dim=1, keepdim=True)).exp()
    values = v.index_select(2, flat_key).reshape(d, b, windows, n, heads)
    return (weights * values).sum(2) / weights.sum(1)


def gathered_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Sequence[int],
                                    rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``neighborhood_attention`` (same layout) through the gathered form."""
    spatial, (b, heads, d) = q.shape[3:], q.shape[:3]

    def planes(t):
        return t.flatten(3).permute(2, 0, 3, 1)  # (d, B, N, heads)
    out = gathered_neighborhood_attention_planes(planes(q), planes(k), planes(v), spatial, kernel, rpb)
    return out.permute(1, 3, 0, 2).reshape(b, heads, d, *spatial)


def _flat_offsets(spatial: Sequence[int], kernel: Sequence[int], bias_shape: Sequence[int], device):
    """For every window offset: the flat key index and the flat relative-bias index of every flat query position,
    built one offset at a time (an index the size of the map, not k^d of them)."""
    key_index, rel_index = _windows(spatial, kernel, device)
    for choice in itertools.product(*(range(len(axis)) for axis in key_index)):
        key = torch.zeros((), dtype=torch.long, device=device)
        rel = torch.zeros((), dtype=torch.long, device=device)
        for axis, j in enumerate(choice):
            shape = [1] * len(spatial)
            shape[axis] = spatial[axis]
            key = key * spatial[axis] + key_index[axis][j].reshape(shape)
            rel = rel * bias_shape[axis] + rel_index[axis][j].reshape(shape)
        yield key.expand(tuple(spatial)).reshape(-1), rel.expand(tuple(spatial)).reshape(-1)


class _StreamingNeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel):
        spatial = q.shape[3:]
        dtype = torch.promote_types(q.dtype, torch.float32)  # the softmax in float32 at least
        qf, kf, vf = (t.flatten(3).to(dtype) for t in (q, k, v))  # (B, heads, d, N)
        bias = rpb.flatten(1).to(dtype) if rpb is not None else None
        bias_shape = rpb.shape[1:] if rpb is not None else [2 * kk - 1 for kk in kernel]
        running_max = running_sum = acc = None
        for key, rel in _flat_offsets(spatial, kernel, bias_shape, q.device):
            logit = (qf * kf.index_select(3, key)).sum(2)  # (B, heads, N)
            if bias is not None:
                logit = logit + bias.index_select(1, rel)
            if running_max is None:
                running_max, running_sum = logit, torch.ones_like(logit)
                acc = vf.index_select(3, key)
                continue
            new_max = torch.maximum(running_max, logit)
            rescale, weight = torch.exp(running_max - new_max), torch.exp(logit - new_max)
            running_sum = running_sum * rescale + weight
            acc = acc * rescale.unsqueeze(2) + weight.unsqueeze(2) * vf.index_select(3, key)
            running_max = new_max
        out = acc / running_sum.unsqueeze(2)
        log_sum_exp = running_max + torch.log(running_sum)
        ctx.save_for_backward(q, k, v, rpb, out, log_sum_exp)
        ctx.kernel = tuple(kernel)
        # q's dtype: under CUDA autocast the reference's float32 softmax gives float32, which the projection that
        # follows casts to q's dtype anyway
        return out.to(q.dtype).reshape(*out.shape[:3], *spatial)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rpb, out, log_sum_exp = ctx.saved_tensors
        spatial = q.shape[3:]
        dtype = out.dtype
        qf, kf, vf = (t.flatten(3).to(dtype) for t in (q, k, v))
        grad = grad_out.flatten(3).to(dtype)
        bias = rpb.flatten(1).to(dtype) if rpb is not None else None
        bias_shape = rpb.shape[1:] if rpb is not None else [2 * kk - 1 for kk in ctx.kernel]
        centre = (grad * out).sum(2)  # Σ_j p_j · dp_j, the softmax's correction
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        drpb = torch.zeros_like(bias) if bias is not None else None
        for key, rel in _flat_offsets(spatial, ctx.kernel, bias_shape, q.device):
            kj, vj = kf.index_select(3, key), vf.index_select(3, key)
            logit = (qf * kj).sum(2)
            if bias is not None:
                logit = logit + bias.index_select(1, rel)
            weight = torch.exp(logit - log_sum_exp)
            dv.index_add_(3, key, weight.unsqueeze(2) * grad)
            dlogit = weight * ((grad * vj).sum(2) - centre)
            dq += dlogit.unsqueeze(2) * kj
            dk.index_add_(3, key, dlogit.unsqueeze(2) * qf)
            if drpb is not None:
                drpb.index_add_(1, rel, dlogit.sum(0))
        grads = [g.reshape(t.shape).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v))]
        return (*grads, drpb.reshape(rpb.shape).to(rpb.dtype) if drpb is not None else None, None)


def streaming_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Sequence[int],
                                     rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``neighborhood_attention`` in the memory-lean form."""
    return _StreamingNeighborhoodAttention.apply(q, k, v, rpb, tuple(kernel))
