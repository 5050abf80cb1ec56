"""PyTorch integration: attnkit::attention and attnkit::attention_backward as torch.library
custom ops, with autograd (gradients for q, k, v and every learnable tensor of the spec) and
fake-tensor implementations, so torch.compile(fullgraph=True) traces through them."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from . import _ext
from . import _spec


_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
           torch.float64: "f64", torch.int32: "i32"}


def _raw(t: torch.Tensor):
    """A tensor as attnkit._ext's raw view: no DLPack round trip (microseconds per tensor)."""
    dev = t.device
    return (t.data_ptr(), _DTYPES.get(t.dtype, str(t.dtype)), 2 if dev.type == "cuda" else 1,
            dev.index or 0, tuple(t.shape), t.stride())


def _outputs(q: torch.Tensor, v: torch.Tensor, spec: Dict[str, Any]):
    out_shape, stat_shape = _spec.output_shapes(q, v, spec)
    out = q.new_empty(out_shape)
    stat = q.new_empty(stat_shape if stat_shape is not None else (0,), dtype=torch.float32)
    return out, stat


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: str,
                  tensors: List[torch.Tensor], threads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    s = _spec.decode(spec, tensors, _raw)
    out, stat = _outputs(q, v, s)
    stream = torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0
    _spec.check(_ext.forward(_raw(q), _raw(k), _raw(v), _raw(out),
                             _raw(stat) if stat.numel() > 0 else None, s, threads, stream))
    return out, stat


_attention_op = torch.library.custom_op("attnkit::attention", _attention_impl, mutates_args=())


@_attention_op.register_fake
def _(q, k, v, spec, tensors, threads):
    return _outputs(q, v, _spec.decode_shapes(spec))


def _grads(q, k, v, out, stat, grad_out, raw_spec, tensors, names, needs, threads):
    """The C++ backward: (dq, dk, dv) in the inputs' dtypes, and per spec tensor its gradient
    (None where not asked for or not learnable)."""
    gdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.is_cuda:  # the CUDA backward writes every element, in the inputs' dtype
        grads = {"dq": torch.empty_like(q), "dk": torch.empty_like(k), "dv": torch.empty_like(v)}
    else:
        grads = {"dq": q.new_zeros(q.shape, dtype=gdt), "dk": k.new_zeros(k.shape, dtype=gdt),
                 "dv": v.new_zeros(v.shape, dtype=gdt)}
    keys = []
    for t, name, need in zip(tensors, names, needs):
        g = _spec.GRAD_OF.get(name) if need else None
        if g is not None and q.is_cuda and name == "bias":
            grads[g] = torch.empty_like(t)  # written (or zeroed) by the CUDA backward, in its dtype
        elif g is not None:
            grads[g] = t.new_zeros((1,) if name == "beta" else t.shape, dtype=gdt)
        keys.append(g)
    grad_out = grad_out.contiguous()
    stream = torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0
    _spec.check(_ext.backward(_raw(q), _raw(k), _raw(v), _raw(out),
                              _raw(stat) if stat.numel() > 0 else None, _raw(grad_out),
                              raw_spec, {n: _raw(t) for n, t in grads.items()}, threads, stream))
    extras = [None if g is None else grads[g].reshape(t.shape).to(t.dtype)
              for t, g in zip(tensors, keys)]
    return (grads["dq"].to(q.dtype), grads["dk"].to(k.dtype), grads["dv"].to(v.dtype)), extras


def _attention_backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, stat: torch.Tensor, grad_out: torch.Tensor,
                             spec: str, tensors: List[torch.Tensor], needs: List[bool],
                             threads: int) -> List[torch.Tensor]:
    dqkv, extras = _grads(q, k, v, out, stat, grad_out, _spec.decode(spec, tensors, _raw),
                          tensors, _spec.tensor_names(spec), needs, threads)
    return [*dqkv, *(q.new_empty(0) if g is None else g for g in extras)]


_attention_backward_op = torch.library.custom_op("attnkit::attention_backward",
                                                 _attention_backward_impl, mutates_args=())


@_attention_backward_op.register_fake
def _(q, k, v, out, stat, grad_out, spec, tensors, needs, threads):
    names = _spec.tensor_names(spec)
    result = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    for t, name, need in zip(tensors, names, needs):
        differentiable = need and name in _spec.GRAD_OF
        result.append(torch.empty_like(t) if differentiable else q.new_empty(0))
    return result


def _setup_context(ctx, inputs, output):
    q, k, v, spec, tensors, threads = inputs
    out, stat = output
    ctx.save_for_backward(q, k, v, out, stat, *tensors)
    ctx.spec, ctx.threads = spec, threads
    ctx.needs = [bool(t.requires_grad) for t in tensors]
    ctx.mark_non_differentiable(stat)


def _backward(ctx, grad_out, grad_stat):
    q, k, v, out, stat, *tensors = ctx.saved_tensors
    grads = torch.ops.attnkit.attention_backward(q, k, v, out, stat, grad_out, ctx.spec,
                                                 tensors, ctx.needs, ctx.threads)
    extras = [g if need else None for g, need in zip(grads[3:], ctx.needs)]
    return grads[0], grads[1], grads[2], None, extras, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _flatten(spec: Dict[str, Any]):
    """The spec with its tensors as raw views (a learnable beta as its value), the tensors, and
    the spec key of each."""
    tensors: List[torch.Tensor] = []
    names: List[str] = []

    def conv(x, key):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            names.append(key)
            return float(x.reshape(-1)[0]) if key == "beta" else _raw(x)
        if isinstance(x, tuple):
            return tuple(conv(e, key) for e in x)
        return x

    return {key: conv(val, key) for key, val in spec.items()}, tensors, names


def _eager_forward(q, k, v, raw_spec, threads):
    out, stat = _outputs(q, v, raw_spec)
    stream = torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0
    _spec.check(_ext.forward(_raw(q), _raw(k), _raw(v), _raw(out),
                             _raw(stat) if stat.numel() > 0 else None, raw_spec, threads, stream))
    return out, stat


class _Attention(torch.autograd.Function):
    """Eager autograd: the same C++ forward and backward as the custom ops, without the
    dispatcher's per-call work (torch.compile traces the custom ops instead)."""

    @staticmethod
    def forward(ctx, q, k, v, call, *tensors):
        raw_spec, names, threads = call
        out, stat = _eager_forward(q, k, v, raw_spec, threads)
        ctx.save_for_backward(q, k, v, out, stat, *tensors)
        ctx.call = call
        ctx.mark_non_differentiable(stat)
        return out, stat

    @staticmethod
    def backward(ctx, grad_out, grad_stat):
        q, k, v, out, stat, *tensors = ctx.saved_tensors
        raw_spec, names, threads = ctx.call
        dqkv, extras = _grads(q, k, v, out, stat, grad_out, raw_spec, tensors, names,
                              ctx.needs_input_grad[4:], threads)
        return (*dqkv, None, *extras)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Dict[str, Any],
              threads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():  # traced: the custom ops (autograd and fake tensors)
        text, tensors, _ = _spec.encode(spec)
        return torch.ops.attnkit.attention(q, k, v, text, tensors, threads)
    raw_spec, tensors, names = _flatten(spec)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or
                                    any(t.requires_grad for t in tensors)):
        return _Attention.apply(q, k, v, (raw_spec, names, threads), *tensors)
    return _eager_forward(q, k, v, raw_spec, threads)
