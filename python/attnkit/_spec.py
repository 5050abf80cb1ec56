"""Building the spec dict that attnkit._ext reads, and its string form for torch.library ops.

The string form is written by a small pure-Python encoder (no json.dumps), so that
torch.compile traces the whole call; tensors are replaced by {"$t": index} into a list.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Tuple

from . import masks as _masks
from . import normalizers as _norms
from . import score_mods as _mods

# The spec keys that hold a learnable tensor, and the name of their gradient (AttentionGrads).
GRAD_OF = {"bias": "dbias", "low_rank_u": "dlow_rank_u", "low_rank_w": "dlow_rank_w",
           "relative_table": "drelative_table", "forget_log_f": "dforget_log_f",
           "alibi_slopes": "dalibi_slopes", "sinks": "dsinks", "rela_gain": "drela_gain",
           "gate": "dgate", "beta": "dbeta"}


_ERRORS = {"ValueError": ValueError, "TypeError": TypeError,
           "NotImplementedError": NotImplementedError, "RuntimeError": RuntimeError}


def check(err: Any) -> None:
    """Raises what attnkit._ext returned for a failed call: (exception name, message)."""
    if err is not None:
        raise _ERRORS[err[0]](err[1])


def is_tensor_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def build(*, q: Any, v: Any, causal: bool, window: Any, mask: Any, score_mod: Any,
          normalizer: Any, scale: Any, sinks: Any, gate: Any, cu_seqlens_q: Any,
          cu_seqlens_kv: Any, layout: str, alignment: str) -> Dict[str, Any]:
    spec: Dict[str, Any] = {}
    parts: List[Any] = []
    if causal:
        parts.append(_masks.Causal())
    if window is not None:
        left, right = window
        parts.append(_masks.SlidingWindow(left, right))
    if mask is not None:
        if not isinstance(mask, _masks.Mask):
            raise TypeError(f"mask: expected an attnkit.masks.Mask, got {type(mask).__name__}")
        parts.append(mask)
    if parts:
        m = parts[0]
        for p in parts[1:]:
            m = m & p
        spec["mask"] = m._node()
    if alignment != "bottom_right":
        if alignment != "top_left":
            raise ValueError(f"alignment = {alignment!r}: must be 'bottom_right' or 'top_left'")
        spec["alignment"] = alignment
    if layout != "bhnd":
        if layout != "bnhd":
            raise ValueError(f"layout = {layout!r}: must be 'bhnd' or 'bnhd'")
        spec["layout"] = layout
    if scale is not None:
        spec["scale"] = float(scale)
    mods = () if score_mod is None else (
        score_mod if isinstance(score_mod, (list, tuple)) else (score_mod,))
    for sm in mods:
        if not isinstance(sm, _mods.ScoreMod):
            raise TypeError(f"score_mod: expected attnkit.score_mods objects, got {type(sm).__name__}")
        spec.update(sm._fields())
    if normalizer == "softmax":
        normalizer = None
    elif isinstance(normalizer, str):
        names = {"sigmoid": _norms.Sigmoid}
        if normalizer == "kernel":
            normalizer = _norms.Kernel()
        elif normalizer in names:
            normalizer = names[normalizer]()
        else:
            raise ValueError(f"normalizer = {normalizer!r}: must be 'softmax', 'sigmoid', "
                             "'kernel' or an attnkit.normalizers object (ReLA needs its gain)")
    if normalizer is not None:
        if not isinstance(normalizer, _norms.Normalizer):
            raise TypeError(f"normalizer: got {type(normalizer).__name__}")
        spec.update(normalizer._fields())
    if sinks is not None:
        if spec.get("normalizer", "softmax") != "softmax":
            raise ValueError("sinks select softmax with a sink: give no other normalizer")
        spec.update(_norms.Sink(sinks)._fields())
    if gate is not None:
        out_ndim = len(q.shape)
        elementwise = len(gate.shape) == out_ndim and tuple(gate.shape[-1:]) == tuple(v.shape[-1:])
        spec["gate_kind"] = "elementwise" if elementwise else "per_head"
        spec["gate"] = gate
    if cu_seqlens_q is not None or cu_seqlens_kv is not None:
        spec["cu_seqlens_q"] = cu_seqlens_q
        spec["cu_seqlens_kv"] = cu_seqlens_kv
    return spec


def output_shapes(q: Any, v: Any, spec: Dict[str, Any]) -> Tuple[Tuple[int, ...], Any]:
    """Shape of out, and of row_stat (None when the normalizer has none: sigmoid)."""
    dv = v.shape[-1]
    shape = q.shape
    out = (*shape[:-1], dv)
    if len(spec) > 0:
        if spec.get("normalizer") == "sigmoid":
            return out, None
        if spec.get("cu_seqlens_q") is not None:  # [total, H, d]
            return out, (shape[1], shape[0])
        if spec.get("layout") == "bnhd":  # [B, N, H, d]
            return out, (shape[0], shape[2], shape[1])
    return out, (shape[0], shape[1], shape[2])


def _enc(x: Any, tensors: List[Any], names: List[str], key: str) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, str):
        return '"' + x + '"'
    if isinstance(x, dict):
        return "{" + ",".join('"' + k + '":' + _enc(val, tensors, names, k)
                              for k, val in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_enc(e, tensors, names, key) for e in x) + "]"
    if is_tensor_like(x):
        tensors.append(x)
        names.append(key)
        return '{"$t":' + str(len(tensors) - 1) + "}"
    if key == "mask_cache":  # a traced graph holds the handle: the caller keeps the cache alive
        return repr(x.handle)
    raise TypeError(f"spec value of type {type(x).__name__} cannot be encoded")


def encode(spec: Dict[str, Any]) -> Tuple[str, List[Any], List[str]]:
    """(string, tensors, the spec key of each tensor)."""
    tensors: List[Any] = []
    names: List[str] = []
    return _enc(spec, tensors, names, ""), tensors, names


def _dec(x: Any, tensors: Sequence[Any]) -> Any:
    if isinstance(x, dict):
        if "$t" in x:
            return tensors[x["$t"]]
        return {k: _dec(val, tensors) for k, val in x.items()}
    if isinstance(x, list):
        return tuple(_dec(e, tensors) for e in x)
    return x


def decode(text: str, tensors: Sequence[Any], convert: Any = None) -> Dict[str, Any]:
    """The spec dict of an encoded spec; each tensor passed through convert() when given."""
    raw = json.loads(text)
    beta = raw.get("beta")
    if isinstance(beta, dict):  # a learnable beta: its value enters the spec
        raw["beta"] = float(tensors[beta["$t"]].reshape(-1)[0])
    return _dec(raw, tensors if convert is None else [convert(t) for t in tensors])


def tensor_names(text: str) -> List[str]:
    """The spec key of each tensor of an encoded spec, in index order."""
    names: List[str] = []

    def walk(x: Any, key: str) -> None:
        if isinstance(x, dict):
            if "$t" in x:
                while len(names) <= x["$t"]:
                    names.append("")
                names[x["$t"]] = key
                return
            for k, val in x.items():
                walk(val, k)
        elif isinstance(x, list):
            for e in x:
                walk(e, key)

    walk(json.loads(text), "")
    return names


def decode_shapes(text: str) -> Dict[str, Any]:
    """What output_shapes needs of an encoded spec (no tensors)."""
    raw = json.loads(text)
    return {"normalizer": raw.get("normalizer"), "layout": raw.get("layout"),
            "cu_seqlens_q": raw.get("cu_seqlens_q")}
