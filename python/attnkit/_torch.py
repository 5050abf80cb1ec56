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


@torch.library.custom_op("attnkit::attention", mutates_args=(), device_types=None)
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: str,
                  tensors: List[torch.Tensor], threads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    s = _spec.decode(spec, tensors, _raw)
    out, stat = _outputs(q, v, s)
    _spec.check(_ext.forward(_raw(q), _raw(k), _raw(v), _raw(out),
                             _raw(stat) if stat.numel() > 0 else None, s, threads))
    return out, stat


@_attention_op.register_fake
def _(q, k, v, spec, tensors, threads):
    return _outputs(q, v, _spec.decode_shapes(spec))


@torch.library.custom_op("attnkit::attention_backward", mutates_args=(), device_types=None)
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, stat: torch.Tensor, grad_out: torch.Tensor,
                           spec: str, tensors: List[torch.Tensor], needs: List[bool],
                           threads: int) -> List[torch.Tensor]:
    s = _spec.decode(spec, tensors, _raw)
    names = _spec.tensor_names(spec)
    gdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = {"dq": q.new_zeros(q.shape, dtype=gdt), "dk": k.new_zeros(k.shape, dtype=gdt),
             "dv": v.new_zeros(v.shape, dtype=gdt)}
    extra = []
    for t, name, need in zip(tensors, names, needs):
        g = _spec.GRAD_OF.get(name) if need else None
        if g is None:
            extra.append(None)
            continue
        grads[g] = t.new_zeros((1,) if name == "beta" else t.shape, dtype=gdt)
        extra.append(g)
    grad_out = grad_out.contiguous()
    _spec.check(_ext.backward(_raw(q), _raw(k), _raw(v), _raw(out),
                              _raw(stat) if stat.numel() > 0 else None, _raw(grad_out), s,
                              {name: _raw(t) for name, t in grads.items()}, threads))
    result = [grads["dq"].to(q.dtype), grads["dk"].to(k.dtype), grads["dv"].to(v.dtype)]
    for t, g in zip(tensors, extra):
        result.append(q.new_empty(0) if g is None else grads[g].reshape(t.shape).to(t.dtype))
    return result


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Dict[str, Any],
              threads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    text, tensors, names = _spec.encode(spec)
    return torch.ops.attnkit.attention(q, k, v, text, tensors, threads)
