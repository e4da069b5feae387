"""Attention-logit growth and attention entropy, read from a model's forward pass.

Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities":
at high learning rates the attention logits ``q.k / sqrt(d)`` of some layers grow without bound,
the attention collapses onto single tokens (its entropy goes to zero, Zhai et al. 2023
"entropy collapse") and the loss diverges; qk-layernorm prevents it. This module measures, per
attention layer and per head:

* ``max_logit``: the largest ``|q.k| * scale`` over the positions that take part in attention
  (``scale`` is what the layer uses, ``1/sqrt(d)`` by default; additive masks are not included);
* ``entropy_min`` / ``entropy_mean``: the entropy (nats) of each query's attention distribution
  (the softmax with the mask applied), its minimum and mean over the queries of the batch that
  attend to at least two keys (one key means zero entropy by construction, e.g. the first query
  of causal attention).

:func:`capture_attention` records them while the model runs: a forward pre-hook on every
``nn.MultiheadAttention`` recomputes ``q`` and ``k`` from its input projections, and a
``TorchFunctionMode`` sees every ``F.scaled_dot_product_attention`` call (custom attention blocks,
Hugging Face models with ``attn_implementation="sdpa"``) and, inside modules whose class name
contains ``"Attention"``, the last-dimension softmax of 4-D attention scores (Hugging Face's
``"eager"`` attention: there the softmax input is ``q.k * scale + mask``; masked entries, at the
dtype's minimum or ``-inf``, are left out). A layer is named by the innermost module running.
Nothing is written: no parameter, buffer or output changes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 8)
    >>> with torch.no_grad(), capture_attention(mha) as found:
    ...     _ = mha(x, x, x)
    >>> stats = found[""]                  # the root module has the empty name
    >>> stats.kind, stats.max_logit.shape  # one value per head
    ('MultiheadAttention', torch.Size([2]))
    >>> bool((stats.entropy_min <= stats.entropy_mean).all())
    True
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .metrics import ATTENTION as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)

__all__ = ["METRICS", "AttentionStats", "attention_logits", "capture_attention", "combine_attention", "logit_stats",
           "pack_attention", "qk_stats", "summarize"]

DEFAULT_MEMORY_CAP = 64 * 2**20  # bytes of logits materialised at once


@dataclass
class AttentionStats:
    """Per-head statistics of one attention layer (tensors of shape ``[H]``, float64).

    ``entropy_sum`` and ``rows`` (the number of query rows) make means combine across calls and ranks.
    """

    max_logit: torch.Tensor
    entropy_min: torch.Tensor
    entropy_sum: torch.Tensor
    rows: torch.Tensor
    kind: str = ""

    @property
    def entropy_mean(self) -> torch.Tensor:
        return self.entropy_sum / self.rows.clamp(min=1)

    @property
    def heads(self) -> int:
        return int(self.max_logit.shape[0])

    def merge(self, other: "AttentionStats") -> "AttentionStats":
        """The statistics of both calls together (heads must agree)."""
        if other.heads != self.heads:
            raise ValueError(f"cannot merge {self.heads} heads with {other.heads}")
        return AttentionStats(
            torch.maximum(self.max_logit, other.max_logit), torch.minimum(self.entropy_min, other.entropy_min),
            self.entropy_sum + other.entropy_sum, self.rows + other.rows, self.kind or other.kind,
        )


def logit_stats(logits: torch.Tensor, valid: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> AttentionStats:
    """Statistics of attention logits ``[B, H, Tq, Tk]``.

    Args:
        logits: ``q.k * scale`` (what ``max_logit`` reports).
        valid: boolean, broadcastable to ``logits``: which entries take part in attention
            (default: all). The entropy statistics leave out query rows with fewer than two
            valid entries (their entropy is 0 by construction: the first query of causal attention).
        bias: an additive mask or bias, broadcastable, added before the softmax (for the entropy only).

    Example:
        >>> s = logit_stats(torch.tensor([[[[0.0, 0.0], [3.0, -1.0]]]]))
        >>> float(s.max_logit), round(float(s.entropy_min), 4), round(float(s.entropy_mean), 4)
        (3.0, 0.0901, 0.3916)
    """
    if logits.dim() != 4:
        raise ValueError(f"attention logits must be [B, H, Tq, Tk], got shape {tuple(logits.shape)}")
    x = logits.float()
    scores = x if bias is None else x + bias.float()
    if valid is None:
        valid = torch.isfinite(scores)
    else:
        valid = valid.expand_as(x) & torch.isfinite(scores)
    heads = x.shape[1]
    masked = scores.masked_fill(~valid, -math.inf)
    has_key = valid.any(-1)  # [B, H, Tq]
    row_ok = valid.sum(-1) >= 2  # a row with one key has zero entropy whatever the logits
    logp = torch.log_softmax(masked.masked_fill(~has_key.unsqueeze(-1), 0.0), dim=-1)
    p = logp.exp()
    entropy = (-(torch.where(valid, p * logp, torch.zeros_like(p))).sum(-1)).clamp(min=0)  # [B, H, Tq]
    inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    per_head = lambda t: t.transpose(0, 1).reshape(heads, -1)  # noqa: E731
    absx = per_head(x.abs().masked_fill(~valid, -math.inf)).double()
    ent, ok = per_head(entropy).double(), per_head(row_ok)
    return AttentionStats(
        max_logit=absx.max(-1).values if absx.shape[1] else torch.full((heads,), -inf, dtype=torch.float64),
        entropy_min=torch.where(ok, ent, inf).min(-1).values if ent.shape[1] else torch.full((heads,), inf),
        entropy_sum=torch.where(ok, ent, torch.zeros_like(ent)).sum(-1),
        rows=ok.sum(-1).double(),
    )


def qk_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> AttentionStats:
    """Statistics of ``softmax(q k^T * scale + mask)`` with ``F.scaled_dot_product_attention``'s conventions.

    ``q`` is ``[..., H, Tq, d]``, ``k`` ``[..., H, Tk, d]`` (a missing head dimension counts as one
    head); ``attn_mask`` boolean (True: takes part) or additive, broadcastable to ``[B, H, Tq, Tk]``;
    ``is_causal`` masks keys after the query (top-left aligned, as SDPA); ``scale`` defaults to
    ``1/sqrt(d)``. Computed in float32 at least, ``memory_cap`` bytes of logits at a time.

    Example:
        >>> q = torch.tensor([[[[1.0, 0.0]]]]); k = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]]])
        >>> round(float(qk_stats(q, k).max_logit), 4)   # 2 / sqrt(2)
        1.4142
    """
    while q.dim() < 4:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    q, k = q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:])
    batch, heads, tq, d = q.shape
    tk = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    wide = torch.promote_types(q.dtype, torch.float32)
    causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril() if is_causal else None
    mask = None
    if attn_mask is not None:  # broadcast from the right, as SDPA does
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() <= 4 \
            else attn_mask.reshape(-1, *attn_mask.shape[-3:])
    per_sample = heads * tq * tk * 4 * 4
    step = max(1, memory_cap // max(per_sample, 1))
    total: Optional[AttentionStats] = None
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        logits = torch.matmul(q[start:stop].to(wide), k[start:stop].to(wide).transpose(-1, -2)) * scale
        valid, bias = causal, None
        if mask is not None:
            part = mask[start:stop] if mask.shape[0] == batch and batch > 1 else mask
            if part.dtype == torch.bool:
                valid = part if valid is None else valid & part
            else:
                bias = part
                floor = torch.finfo(part.dtype).min / 2
                kept = part > floor
                valid = kept if valid is None else valid & kept
        stats = logit_stats(logits, valid, bias)
        total = stats if total is None else total.merge(stats)
    return total


# -- capturing from a forward pass ------------------------------------------------------------------

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class _Recorder(TorchFunctionMode):
    def __init__(self, names: Dict[int, str], memory_cap: int) -> None:
        super().__init__()
        self.names = names
        self.memory_cap = memory_cap
        self.stack: List[nn.Module] = []
        self.found: "OrderedDict[str, AttentionStats]" = OrderedDict()
        self.mha_depth = 0

    def record(self, module: nn.Module, stats: AttentionStats, kind: str) -> None:
        name = self.names.get(id(module), type(module).__name__)
        stats.kind = kind
        self.found[name] = self.found[name].merge(stats) if name in self.found else stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.mha_depth == 0 and self.stack:
            if func in _SDPA:
                bound = dict(zip(_SDPA_NAMES, args), **kwargs)
                q, k = bound["query"], bound["key"]
                if bound.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
                    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
                with torch.no_grad():
                    stats = qk_stats(q.detach(), k.detach(), _detach(bound.get("attn_mask")), bool(bound.get("is_causal", False)),
                                     bound.get("scale"), self.memory_cap)
                self.record(self.stack[-1], stats, "scaled_dot_product_attention")
            elif func in _SOFTMAX and "attention" in type(self.stack[-1]).__name__.lower():
                x = args[0] if args else kwargs.get("input")
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if isinstance(x, torch.Tensor) and x.dim() == 4 and dim in (-1, 3) and x.is_floating_point():
                    with torch.no_grad():
                        scores = x.detach().float()
                        valid = scores > torch.finfo(x.dtype).min / 2
                        self.record(self.stack[-1], logit_stats(scores, valid), "softmax")
        return func(*args, **kwargs)


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _mha_stats(mha: nn.MultiheadAttention, args, kwargs, memory_cap: int) -> AttentionStats:
    """``q`` and ``k`` of an ``nn.MultiheadAttention`` call recomputed from its input projections."""
    bound = _MHA_SIGNATURE.bind(mha, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key = a["query"].detach(), a["key"].detach()
    unbatched = query.dim() == 2
    if unbatched:
        query, key = query.unsqueeze(1 if not mha.batch_first else 0), key.unsqueeze(1 if not mha.batch_first else 0)
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:e], mha.in_proj_bias[e : 2 * e]
    q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
    batch, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    extra = []  # keys appended by bias_k / add_zero_attn always take part
    if mha.bias_k is not None:
        extra.append(mha.bias_k.reshape(1, 1, e).expand(batch, 1, e))
    if mha.add_zero_attn:
        extra.append(torch.zeros(batch, 1, e, dtype=k.dtype, device=k.device))
    k = torch.cat([k, *extra], dim=1) if extra else k
    d = e // h
    q = q.reshape(batch, tq, h, d).transpose(1, 2)
    k = k.reshape(batch, k.shape[1], h, d).transpose(1, 2)
    # MultiheadAttention's masks: boolean True = NOT attended; float = added.
    valid = torch.ones(batch, h, tq, k.shape[2], dtype=torch.bool, device=q.device)
    bias = torch.zeros(batch, h, tq, k.shape[2], dtype=torch.float32, device=q.device)
    attn_mask, padding = a["attn_mask"], a["key_padding_mask"]
    if attn_mask is None and a["is_causal"]:
        attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        m = attn_mask.reshape(-1, h, tq, tk) if attn_mask.dim() == 3 else attn_mask.reshape(1, 1, tq, tk)
        if unbatched and attn_mask.dim() == 3:
            m = attn_mask.reshape(1, h, tq, tk)
        _apply_mask(valid[..., :tk], bias[..., :tk], m)
    if padding is not None:
        _apply_mask(valid[..., :tk], bias[..., :tk], padding.reshape(batch, 1, 1, tk))
    scale = 1.0 / math.sqrt(d)
    total = None
    step = max(1, memory_cap // max(h * tq * k.shape[2] * 16, 1))
    for start in range(0, batch, step):
        sl = slice(start, min(batch, start + step))
        logits = torch.matmul(q[sl].float(), k[sl].float().transpose(-1, -2)) * scale
        stats = logit_stats(logits, valid[sl], bias[sl])
        total = stats if total is None else total.merge(stats)
    return total


def _apply_mask(valid: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype == torch.bool:
        valid &= ~mask
    else:
        valid &= mask > torch.finfo(mask.dtype).min / 2
        bias += mask.float()


@contextlib.contextmanager
def capture_attention(model: nn.Module, memory_cap: int = DEFAULT_MEMORY_CAP) -> Iterator["OrderedDict[str, AttentionStats]"]:
    """Record the attention statistics of every attention layer ``model`` runs inside the block.

    Yields a dict ``{layer name: AttentionStats}`` filled as the layers run (a layer called
    twice is merged). Hooks and the function mode are removed on exit. See the module docstring
    for what is recognised.
    """
    names = {id(m): n for n, m in model.named_modules()}
    recorder = _Recorder(names, memory_cap)
    handles = []

    def push(module, args):
        recorder.stack.append(module)

    def pop(module, args, output):
        if recorder.stack and recorder.stack[-1] is module:
            recorder.stack.pop()

    def mha_pre(module, args, kwargs):
        with torch.no_grad():
            recorder.record(module, _mha_stats(module, args, kwargs, memory_cap), "MultiheadAttention")
        recorder.mha_depth += 1

    def mha_post(module, args, kwargs, output):
        recorder.mha_depth = max(0, recorder.mha_depth - 1)

    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(push))
            if isinstance(module, nn.MultiheadAttention):
                handles.append(module.register_forward_pre_hook(mha_pre, with_kwargs=True))
                handles.append(module.register_forward_hook(mha_post, with_kwargs=True, always_call=True))
            handles.append(module.register_forward_hook(pop, always_call=True))
        with recorder:
            yield recorder.found
    finally:
        for handle in handles:
            handle.remove()


def pack_attention(found: Dict[str, AttentionStats]) -> torch.Tensor:
    """The layers' statistics as one float64 ``[4, total heads]`` tensor (to gather across ranks):
    rows ``max_logit``, ``-entropy_min``, ``entropy_sum``, ``rows``; :func:`combine_attention` undoes it."""
    return torch.cat([torch.stack([s.max_logit, -s.entropy_min, s.entropy_sum, s.rows]).double() for s in found.values()],
                     dim=1)


def combine_attention(found: Dict[str, AttentionStats], gathered: torch.Tensor) -> "OrderedDict[str, AttentionStats]":
    """The statistics of ``found``'s layers over every rank, from the ranks' :func:`pack_attention`
    tensors stacked as ``gathered`` (``[ranks, 4, total heads]``): what :meth:`AttentionStats.merge`
    of the ranks' statistics gives.

    Example:
        >>> a, b = logit_stats(torch.tensor([[[[0.0, 1.0]]]])), logit_stats(torch.tensor([[[[0.0, 5.0]]]]))
        >>> both = combine_attention({"attn": a}, torch.stack([pack_attention({"attn": a}), pack_attention({"attn": b})]))
        >>> float(both["attn"].max_logit[0]) == float(a.merge(b).max_logit[0]) == 5.0
        True
    """
    gathered = gathered.reshape(-1, 4, gathered.shape[-1]).double()
    merged = torch.stack([gathered[:, 0].max(0).values, -gathered[:, 1].max(0).values, gathered[:, 2].sum(0),
                          gathered[:, 3].sum(0)])
    out: "OrderedDict[str, AttentionStats]" = OrderedDict()
    start = 0
    for name, stats in found.items():
        part = merged[:, start : start + stats.heads]
        out[name] = AttentionStats(part[0], part[1], part[2], part[3], stats.kind)
        start += stats.heads
    return out


def attention_logits(model: nn.Module, run, memory_cap: int = DEFAULT_MEMORY_CAP) -> "OrderedDict[str, AttentionStats]":
    """Run ``run()`` (a forward pass of ``model``) under :func:`capture_attention` and ``no_grad``."""
    with torch.no_grad(), capture_attention(model, memory_cap) as found:
        run()
    return found


def summarize(found: Dict[str, AttentionStats], per_head: bool = False) -> Dict[str, float]:
    """Flat metrics: ``max_logit``, ``entropy_min``, ``entropy_mean`` over all layers, the same
    ``/<layer>``, and with ``per_head`` ``head_max_logit/<layer>.h<i>`` and ``head_entropy_min/<layer>.h<i>``.

    Example:
        >>> s = logit_stats(torch.tensor([[[[0.0, 0.0], [3.0, -1.0]]]]))
        >>> sorted(summarize({"attn": s}))
        ['entropy_mean', 'entropy_mean/attn', 'entropy_min', 'entropy_min/attn', 'max_logit', 'max_logit/attn']
    """
    out: Dict[str, float] = {}
    if not found:
        return out
    rows = sum(float(s.rows.sum()) for s in found.values())
    out["max_logit"] = max(float(s.max_logit.max()) for s in found.values())
    out["entropy_min"] = min(float(s.entropy_min.min()) for s in found.values())
    out["entropy_mean"] = sum(float(s.entropy_sum.sum()) for s in found.values()) / max(rows, 1.0)
    for name, s in found.items():
        layer = name or "root"
        out[f"max_logit/{layer}"] = float(s.max_logit.max())
        out[f"entropy_min/{layer}"] = float(s.entropy_min.min())
        out[f"entropy_mean/{layer}"] = float(s.entropy_sum.sum() / s.rows.sum().clamp(min=1))
        if per_head:
            for i in range(s.heads):
                out[f"head_max_logit/{layer}.h{i}"] = float(s.max_logit[i])
                out[f"head_entropy_min/{layer}.h{i}"] = float(s.entropy_min[i])
    return out
