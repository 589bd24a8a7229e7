"""Neighbourhood attention (natten's semantics) in pure PyTorch, in three forms that compute the same function.

Each query attends to exactly k keys per axis; windows shift inwards at the borders (no zero padding); the
relative-position bias is indexed by key - query + k - 1. [ASSUMED] an axis shorter than its kernel uses the whole
axis as window (natten refuses it). q (already scaled), k, v: (B, heads, head_dim, *spatial).

- ``neighborhood_attention``: softmax over the stacked k^d logits; memory O(k^d · heads · voxels) for the logits and
  weights (autograd keeps them all).
- ``sliced_neighborhood_attention``: the 2D export form, and CPU inference on large maps. A window offset's keys
  (values) for every query are one slice of the map, edge-replicated to the border (a border query's window is that
  of its clamped neighbour), and the softmax is spelled out over the offsets' logits (their maximum, then the sums):
  engines run it as slices, pads and elementwise ops on maps the size of q instead of gathers of k^d copies of the
  keys and values (the k^d logits are kept, as the reference's stack keeps them).
- ``streaming_neighborhood_attention``: the memory-lean form. One pass over the window offsets with a running
  maximum and sum (the online softmax); backward recomputes each offset's weight from the log-sum-exp and scatters
  its gradient back. Memory O(heads · head_dim · voxels): the size of q, k and v, whatever the window.
"""
from __future__ import annotations

import functools
import itertools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


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


def _window_layout(spatial: Sequence[int], kernel: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Per axis: the number of distinct windows and the edge padding (before, after) that gives every query its
    window's key. Computed once per call: in an exported graph each is one node, shared by every offset."""
    layout = []
    for length, kk in zip(spatial, kernel):
        window = min(kk, length)
        before = min(kk // 2, length - 1)  # queries 0..before share the first window
        layout.append((length - window + 1, before, window - 1 - before))
    return layout


def _window_slices(t: torch.Tensor, offset: Sequence[int], layout: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
    """``t`` (B, C, *spatial) as the keys one window offset picks for every query: the slice of the distinct windows'
    keys at ``offset``, edge-replicated over the queries that share a border window."""
    index, pad = [slice(None), slice(None)], []
    for j, (distinct, before, after) in zip(offset, layout):
        index.append(slice(j, j + distinct))
        pad = [before, after] + pad  # F.pad lists the last axis first
    return F.pad(t[tuple(index)], pad, mode="replicate")


def sliced_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Sequence[int],
                                  rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``neighborhood_attention`` (same layout) in the sliced form: per window offset, slices and pads of maps the
    size of q; the softmax's maximum over the offsets' logits first, then its sums."""
    b, heads, d = q.shape[:3]
    spatial = q.shape[3:]
    layout = _window_layout(spatial, kernel)
    _, rel_index = _windows(spatial, kernel, q.device)
    offsets = list(itertools.product(*(range(len(axis)) for axis in rel_index)))
    flat = d == 1  # one plane: (B, heads, *S) throughout, no reshapes and no sum over head_dim
    keys, values = k.flatten(1, 2), v.flatten(1, 2)
    query = q.flatten(1, 2) if flat else q
    biases = _iter_windows(rpb, rel_index, 1) if rpb is not None else itertools.repeat(None)

    def window(t, offset):
        out = _window_slices(t, offset, layout)
        return out if flat else out.unflatten(1, (heads, d))

    def logit(offset, bias):
        value = query * window(keys, offset)
        value = value if flat else value.sum(2)
        return value if bias is None else value + bias
    # k^d maps the size of q: what the reference's stack holds too
    logits = [logit(o, bias) for o, bias in zip(offsets, biases)]
    top = functools.reduce(torch.maximum, logits)
    total = out = 0
    for offset, value in zip(offsets, logits):
        weight = (value - top).exp()
        total = total + weight
        out = out + (weight if flat else weight.unsqueeze(2)) * window(values, offset)
    out = out / (total if flat else total.unsqueeze(2))
    return out.unflatten(1, (heads, d)) if flat else out


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
