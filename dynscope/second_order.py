"""GELU, LayerNorm, softmax, attention and eval-mode BatchNorm with cheap second derivatives, for
reverse-over-reverse HVPs.

A reverse-over-reverse Hessian-vector product differentiates the backward pass once more for
every probe. torch's generic double-backward formulas for ``gelu``, ``layer_norm`` and
``softmax`` rebuild what they need from the layer's input on each call (the normal density and
error function for GELU, some twenty full-size passes for LayerNorm). The rules here compute the
probe-independent factors once, while the gradient graph is built, so that each probe pays a few
multiplications and row means. ``scaled_dot_product_attention`` and
``multi_head_attention_forward`` (``nn.MultiheadAttention``) are rewritten as matrix products
around that softmax in the simple cases (no attention mask or dropout, float32/float64: see each
function); the other cases run torch's own. ``batch_norm`` with running statistics (eval mode) is
written as the per-channel affine map it is, whose double backward autograd does in a few
multiplications.
What it saves is measured by ``benchmarks/bench_curvature.py`` (section 1).

:func:`cheap_second_order` swaps them in through a ``TorchFunctionMode``. Values and gradients
equal torch's up to rounding, and Hessian-vector products equal the exact Hessian's (the tests
compare with a dense Hessian built by double-backward through plain autograd, itself checked
against central finite differences: ``tests/reference.py``). Third derivatives are not available
inside the mode (the rules' own backward is ``once_differentiable``); an HVP does not need them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Sequential(nn.LayerNorm(4), nn.GELU())
    >>> x = torch.randn(3, 4)
    >>> with cheap_second_order():
    ...     y = layer(x)
    >>> torch.allclose(y, layer(x), atol=1e-6)
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_FLOATS = (torch.float32, torch.float64)
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_derivatives(x: torch.Tensor, approximate: str = "none"):
    """``gelu(x)``, ``gelu'(x)`` and ``gelu''(x)`` (``approximate`` as in ``F.gelu``)."""
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + _CUBIC * x**3)
        du = _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * x * x)
        t = torch.tanh(u)
        sech2 = 1 - t * t
        d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du
        d2 = sech2 * du + 0.5 * x * sech2 * (_SQRT_2_OVER_PI * 6 * _CUBIC * x - 2 * t * du * du)
        return 0.5 * x * (1 + t), d1, d2
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x * _SQRT_HALF))
    return x * cdf, cdf + x * pdf, pdf * (2 - x * x)


class _GeluBackward(torch.autograd.Function):
    """``(g, x) -> g * gelu'(x)`` with ``gelu'(x)`` and ``gelu''(x)`` precomputed."""

    @staticmethod
    def forward(ctx, grad_out, x, d1, d2):
        ctx.save_for_backward(d1, grad_out * d2)
        return grad_out * d1

    @staticmethod
    @once_differentiable
    def backward(ctx, v):
        d1, grad_out_d2 = ctx.saved_tensors
        return v * d1, v * grad_out_d2, None, None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate):
        y, d1, d2 = gelu_derivatives(x, approximate)
        ctx.save_for_backward(x, d1, d2)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, d1, d2 = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a plain backward: one multiplication
            return grad_out * d1, None
        return _GeluBackward.apply(grad_out, x, d1, d2), None


def _row_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(-1, keepdim=True)


class _LayerNormBackward(torch.autograd.Function):
    """``gy -> (gx, gw, gb)`` of a LayerNorm over the last dimension, with a direct second derivative.

    With ``xh = (x - mean) rstd`` and ``g = gy w``, the first backward is
    ``gx = rstd (g - mean(g) - xh mean(g xh))``, ``gw = sum gy xh``, ``gb = sum gy``. Given
    cotangents ``(vx, vw, vb)`` its backward returns those of ``gy``, ``x`` and ``w``; the
    probe-independent products are computed once here.
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, x_hat, rstd, mean):
        size = x.shape[-1]
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad_out, x, [size], mean, rstd, weight, None, [True, True, False]
        )
        grad_b = grad_out.reshape(-1, size).sum(0)
        g = grad_out * weight
        ctx.save_for_backward(
            grad_out, x_hat, rstd, rstd * weight, grad_out * rstd, rstd * g, rstd * _row_mean(g * x_hat), grad_x
        )
        return grad_x, grad_w, grad_b

    @staticmethod
    @once_differentiable
    def backward(ctx, vx, vw, vb):
        grad_out, x_hat, rstd, rstd_w, rstd_grad_out, rstd_g, rstd_g_xh, grad_x = ctx.saved_tensors
        size = x_hat.shape[-1]
        vx_xh = _row_mean(vx * x_hat)
        projected = torch.addcmul(vx - _row_mean(vx), x_hat, vx_xh, value=-1)  # P vx; P is symmetric
        cot_grad_out = torch.addcmul(torch.addcmul(vb, x_hat, vw), projected, rstd_w)
        cot_weight = (rstd_grad_out * projected).reshape(-1, size).sum(0)
        # x enters through x_hat (a) and through the explicit rstd factor of grad_x (r)
        a = torch.addcmul(torch.addcmul(vw * grad_out, vx, rstd_g_xh, value=-1), rstd_g, vx_xh, value=-1)
        r = (vx * grad_x).sum(-1, keepdim=True)  # = rstd * d<vx, grad_x>/d rstd
        cot_x = torch.addcmul(a - _row_mean(a), x_hat, _row_mean(a * x_hat) + r / size, value=-1) * rstd
        return cot_grad_out, cot_x, cot_weight, None, None, None


class _LayerNorm(torch.autograd.Function):
    """LayerNorm over the last dimension with an affine weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        ctx.save_for_backward(x, weight, (x - mean) * rstd, rstd, mean)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, x_hat, rstd, mean = ctx.saved_tensors
        if not torch.is_grad_enabled():
            size = x.shape[-1]
            grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
                grad_out, x, [size], mean, rstd, weight, None, [True, True, False]
            )
            return grad_x, grad_w, grad_out.reshape(-1, size).sum(0), None
        grad_x, grad_w, grad_b = _LayerNormBackward.apply(grad_out, x, weight, x_hat, rstd, mean)
        return grad_x, grad_w, grad_b, None


class _SoftmaxBackward(torch.autograd.Function):
    """``gp -> p (gp - sum(gp p))``, the backward of softmax, with ``gp - sum(gp p)`` computed once."""

    @staticmethod
    def forward(ctx, grad_out, p, dim):
        centred = grad_out - (grad_out * p).sum(dim, keepdim=True)
        ctx.save_for_backward(grad_out, p, centred)
        ctx.dim = dim
        return p * centred

    @staticmethod
    @once_differentiable
    def backward(ctx, v):
        grad_out, p, centred = ctx.saved_tensors
        vp = v * p
        v_p = vp.sum(ctx.dim, keepdim=True)
        # cotangents of grad_out, p (v * centred - v_p * grad_out); addcmul fuses a product and a sum
        return torch.addcmul(vp, p, v_p, value=-1), torch.addcmul(v * centred, grad_out, v_p, value=-1), None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        p = torch.softmax(x, dim)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx, grad_out):
        (p,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return torch._softmax_backward_data(grad_out, p, ctx.dim, p.dtype), None
        return _SoftmaxBackward.apply(grad_out, p, ctx.dim), None


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:  # F.gelu's argument names
    """``F.gelu`` with a cheap second derivative (float32/float64; other dtypes use ``F.gelu``)."""
    if input.dtype not in _FLOATS or approximate not in ("none", "tanh"):
        return F.gelu(input, approximate=approximate)
    return _Gelu.apply(input, approximate)


def layer_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5):
    """``F.layer_norm`` with a cheap second derivative (float32/float64; other cases use ``F.layer_norm``)."""
    shape = tuple(normalized_shape)
    fits = input.dim() >= len(shape) and tuple(input.shape[input.dim() - len(shape):]) == shape
    if not fits or input.dtype not in _FLOATS or any(t is not None and t.dtype != input.dtype for t in (weight, bias)):
        return F.layer_norm(input, shape, weight, bias, eps)  # torch's rule, or its error message
    size = math.prod(shape)
    flat = input.reshape(*input.shape[: input.dim() - len(shape)], size)
    w = torch.ones(size, dtype=input.dtype, device=input.device) if weight is None else weight.reshape(size)
    b = torch.zeros(size, dtype=input.dtype, device=input.device) if bias is None else bias.reshape(size)
    return _LayerNorm.apply(flat, w, b, eps).reshape(input.shape)


def batch_norm(input: torch.Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:  # F.batch_norm's argument names
    """``F.batch_norm`` with running statistics (eval mode) as the per-channel affine map it is,
    ``x * a + c`` with ``a = weight / sqrt(running_var + eps)``, ``c = bias - running_mean * a``: its
    double backward is then a few multiplications per probe instead of torch's generic rule, which
    is written for batch statistics (a 32-probe trace of the trained benchmark CNN: 0.90x the time,
    at initialisation 1.00x; the convolutions' double backward is most of it). Batch statistics
    (training), missing running statistics and other dtypes use ``F.batch_norm``."""
    tensors = (input, running_mean, running_var, weight, bias)
    if training or running_mean is None or running_var is None or input.dim() < 2 or input.dtype not in _FLOATS \
            or any(t is not None and t.dtype != input.dtype for t in tensors):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift.reshape(shape), input, scale.reshape(shape))


def softmax(x: torch.Tensor, dim: int, _stacklevel: int = 3, dtype=None) -> torch.Tensor:
    """``F.softmax`` with a cheap second derivative (float32/float64; other cases use ``F.softmax``)."""
    if dim is None or dtype is not None or x.dtype not in _FLOATS:
        return F.softmax(x, dim, _stacklevel, dtype)
    return _Softmax.apply(x, dim)


def _softmax_of_tensor(input: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:  # torch.softmax's signature
    return softmax(input, dim, dtype=dtype)


def _attention(q, k, v, scale: float, causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T scale) v`` over the last two dimensions, with :func:`softmax`."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return softmax(scores, -1) @ v


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """``F.scaled_dot_product_attention`` without mask or dropout, with a cheap second derivative.

    Masks, dropout, grouped-query attention and half precision use the torch function.
    """
    simple = (attn_mask is None and dropout_p == 0 and not enable_gqa and query.dtype in _FLOATS
              and query.shape[-1] == key.shape[-1] and not (is_causal and query.shape[-2] > key.shape[-2]))
    if not simple:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return _attention(query, key, value, 1 / math.sqrt(query.shape[-1]) if scale is None else scale, is_causal)


def multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                                 bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                                 training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                                 is_causal=False):
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) for batched inputs without
    masks, dropout, key/value biases or separate projections; other cases use the torch function.

    The packed in-projection is split on the weight (a small tensor) rather than on the projected
    activations, whose select-backward otherwise zero-fills three activation-sized tensors for
    every probe.
    """
    simple = (query.dim() == 3 and bias_k is None and bias_v is None and not add_zero_attn
              and (dropout_p == 0 or not training) and key_padding_mask is None and attn_mask is None
              and not is_causal and not use_separate_proj_weight and static_k is None and static_v is None
              and query.dtype in _FLOATS and in_proj_weight is not None and embed_dim_to_check == query.shape[-1]
              and query.shape[-1] % num_heads == 0)
    if not simple:
        return F.multi_head_attention_forward(
            query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
            add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=use_separate_proj_weight, q_proj_weight=q_proj_weight,
            k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, static_k=static_k, static_v=static_v,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
    tgt_len, batch, dim = query.shape
    src_len = key.shape[0]
    head_dim = dim // num_heads
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(x, weight, bias, length):  # [length, batch, dim] -> [batch * heads, length, head_dim]
        return F.linear(x, weight, bias).reshape(length, batch * num_heads, head_dim).transpose(0, 1)

    w_q, w_k, w_v = in_proj_weight.chunk(3)
    q = heads(query, w_q, biases[0], tgt_len)
    k = heads(key, w_k, biases[1], src_len)
    v = heads(value, w_v, biases[2], src_len)
    scores = (q * (1 / math.sqrt(head_dim))) @ k.transpose(1, 2)
    p = softmax(scores, -1)
    out = (p @ v).transpose(0, 1).reshape(tgt_len * batch, dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).reshape(tgt_len, batch, dim)
    if not need_weights:
        return out, None
    p = p.reshape(batch, num_heads, tgt_len, src_len)
    return out, (p.mean(1) if average_attn_weights else p)


class cheap_second_order(TorchFunctionMode):
    """Within this context GELU, LayerNorm, softmax and attention use the rules of this module.

    Covered: ``F.gelu``, ``F.layer_norm``, ``F.softmax`` (``torch.softmax``, ``Tensor.softmax``),
    ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward`` and ``F.batch_norm`` with
    running statistics, so ``nn.GELU``, ``nn.LayerNorm``, ``nn.Softmax``, ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer`` and ``nn.BatchNorm1d/2d/3d`` in eval mode.
    """

    #: whether a rule replaced a function since the mode was created
    used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = _RULES.get(func)
        if rule is None:
            return func(*args, **(kwargs or {}))
        self.used = True
        return rule(*args, **(kwargs or {}))


_RULES = {
    F.batch_norm: batch_norm,
    F.gelu: gelu,
    F.layer_norm: layer_norm,
    F.softmax: softmax,
    torch.softmax: _softmax_of_tensor,
    torch.Tensor.softmax: _softmax_of_tensor,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
}
