"""attnkit.attention: the one entry, for NumPy arrays and PyTorch tensors."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

from . import _ext
from . import _spec


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


class MaskCache:
    """The CUDA kernels' block tables of one mask, kept across calls (FlexAttention's
    ``BlockMask``, FlashInfer's plan): the first call that passes it builds them, the next ones
    reuse them (one entry per tile shape and problem shape; the backward has its own).

    Without a cache, every CUDA call with a mask that is not a band (document, neighborhood,
    block maps, ...) builds them again. Pass the same cache only with the same mask: its tensors
    (segment ids, block maps) and ``cu_seqlens`` must keep their contents; a call with another
    mask raises ValueError until ``clear()``. Eager calls (and their backward) keep it alive;
    a ``torch.compile`` graph holds its handle, so keep the cache while the graph runs. Under
    CUDA graph capture it is only read (build its tables before capturing). CPU calls ignore it.
    """

    def __init__(self) -> None:
        self._cache = _ext.MaskCache()

    def clear(self) -> None:
        """Frees the tables; the next call builds them again, for any mask."""
        self._cache.clear()

    @property
    def entries(self) -> int:
        return self._cache.entries

    @property
    def bytes(self) -> int:
        """Device memory held."""
        return self._cache.bytes


def _with_cache(spec: Dict[str, Any], mask_cache: Any) -> None:
    if mask_cache is None:
        return
    if not isinstance(mask_cache, MaskCache):
        raise TypeError("mask_cache: expected an attnkit.MaskCache, got "
                        f"{type(mask_cache).__name__}")
    # The object itself: the spec (kept by autograd for the backward) keeps the cache alive.
    spec["mask_cache"] = mask_cache._cache


def attention(q: Any, k: Any, v: Any, *, causal: bool = False,
              window: Optional[Tuple[int, int]] = None, mask: Any = None, score_mod: Any = None,
              normalizer: Any = "softmax", scale: Optional[float] = None, sinks: Any = None,
              gate: Any = None, cu_seqlens_q: Any = None, cu_seqlens_kv: Any = None,
              return_lse: bool = False, layout: str = "bhnd", alignment: str = "bottom_right",
              threads: int = 0, mask_cache: Optional[MaskCache] = None) -> Any:
    """Attention over ``q [B, Hq, Nq, d]``, ``k [B, Hk, Nk, d]``, ``v [B, Hk, Nk, dv]``.

    ``layout="bnhd"`` takes ``[B, N, H, d]`` (FlashAttention's order); with ``cu_seqlens_q`` /
    ``cu_seqlens_kv`` (int32 ``[B + 1]``) the inputs are packed ``[total, H, d]``; rows past
    the last sequence are padding: their output (and LSE) is left unset, their gradients are 0.

    Args:
        causal: a causal mask (bottom-right aligned unless ``alignment="top_left"``).
        window: ``(left, right)``: a sliding window ``i' - left <= j <= i' + right``.
        mask: an ``attnkit.masks`` object (combine with ``&``, ``|``, ``~``); ANDed with the two
            above.
        score_mod: an ``attnkit.score_mods`` object or a list of them.
        normalizer: "softmax" (default), "sigmoid", "kernel" or an ``attnkit.normalizers``
            object.
        scale: the score scale, default ``1 / sqrt(d)``.
        sinks: per-query-head sink logits ``[Hq]`` (softmax with a sink).
        gate: output gate logits: ``out``'s shape (elementwise) or ``[B, Hq, Nq]`` (per head).
        return_lse: also return the per-row statistic (the LSE for the softmax family; the log
            of the row sum for the normalized kernel; the RMS for ReLA; None for sigmoid). It is
            not differentiated.
        threads: CPU threads, 0 for all.
        mask_cache: an ``attnkit.MaskCache``: the mask's tables for the CUDA kernels, built once
            and reused by the calls that pass it (see ``MaskCache``).

    Returns ``out`` (``q``'s layout with ``dv``), or ``(out, lse)``. NumPy in, NumPy out;
    PyTorch tensors go through the ``attnkit::attention`` custom op, with autograd and
    ``torch.compile`` support. float64 inputs run the float64 oracle (for gradcheck).
    """
    spec = _spec.build(q=q, v=v, causal=causal, window=window, mask=mask, score_mod=score_mod,
                       normalizer=normalizer, scale=scale, sinks=sinks, gate=gate,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, layout=layout,
                       alignment=alignment)
    _with_cache(spec, mask_cache)
    if _is_torch(q):
        from . import _torch
        out, row_stat = _torch.attention(q, k, v, spec, threads)
        if not return_lse:
            return out
        return out, (row_stat if row_stat.numel() > 0 or spec.get("normalizer") != "sigmoid"
                     else None)
    import numpy as np
    out_shape, stat_shape = _spec.output_shapes(q, v, spec)
    out = np.empty(out_shape, dtype=q.dtype)
    row_stat = None if stat_shape is None else np.empty(stat_shape, dtype=np.float32)
    if spec.get("beta") is not None:
        spec["beta"] = float(np.asarray(spec["beta"]).reshape(-1)[0])
    _spec.check(_ext.forward(q, k, v, out, row_stat, spec, threads))
    return (out, row_stat) if return_lse else out


def attention_backward(q: Any, k: Any, v: Any, out: Any, lse: Any, grad_out: Any, *,
                       grads: Sequence[str] = ("dq", "dk", "dv"), threads: int = 0,
                       **spec_args: Any) -> Dict[str, Any]:
    """The backward pass for NumPy arrays (PyTorch users get it from autograd).

    ``out`` and ``lse`` are the forward's (``attention(..., return_lse=True)``); the keyword
    arguments are ``attention``'s. ``grads`` names what to compute: "dq", "dk", "dv" and any of
    "dbias", "dsinks", "dgate", "dalibi_slopes", "drelative_table", "dforget_log_f",
    "dlow_rank_u", "dlow_rank_w", "drela_gain", "dbeta". Returns a dict name -> array (float32,
    float64 for float64 inputs).
    """
    import numpy as np
    names = ("causal", "window", "mask", "score_mod", "normalizer", "scale", "sinks", "gate",
             "cu_seqlens_q", "cu_seqlens_kv", "layout", "alignment", "mask_cache")
    unknown = set(spec_args) - set(names)
    if unknown:
        raise TypeError(f"unknown arguments: {sorted(unknown)}")
    args = dict(causal=False, window=None, mask=None, score_mod=None, normalizer="softmax",
                scale=None, sinks=None, gate=None, cu_seqlens_q=None, cu_seqlens_kv=None,
                layout="bhnd", alignment="bottom_right")
    args.update(spec_args)
    mask_cache = args.pop("mask_cache", None)
    spec = _spec.build(q=q, v=v, **args)
    _with_cache(spec, mask_cache)
    gdt = np.float64 if q.dtype == np.float64 else np.float32
    inputs = {"dq": q, "dk": k, "dv": v}
    for key, g in _spec.GRAD_OF.items():
        if spec.get(key) is not None and _spec.is_tensor_like(spec[key]):
            inputs[g] = spec[key]
    if spec.get("beta") is not None:
        spec["beta"] = float(np.asarray(spec["beta"]).reshape(-1)[0])
    if "dbeta" in grads:
        inputs["dbeta"] = np.zeros(1)
    result = {}
    for g in grads:
        if g not in inputs:
            raise ValueError(f"grads: {g!r} is not a gradient of this call "
                             f"(available: {sorted(inputs)})")
        shape = (1,) if g == "dbeta" else inputs[g].shape
        result[g] = np.zeros(shape, dtype=gdt)
    _spec.check(_ext.backward(q, k, v, out, lse, grad_out, spec, result, threads))
    return result


def support_matrix() -> list:
    """Rows (mechanism, category, backend, forward, backward, dtypes) of the registries."""
    return _ext.support_matrix()


def cpu_simd_target() -> str:
    """The SIMD target the CPU kernels dispatch to on this machine (e.g. "AVX2")."""
    return _ext.cpu_simd_target()
