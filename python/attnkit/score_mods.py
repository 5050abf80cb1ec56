"""Score modifications (MECHANISMS.md 1.2), mapping 1:1 onto ``attnkit::ScoreMods``.

Pass one or a list to ``attnkit.attention(score_mod=...)``; tensors given here (bias, slopes,
tables, ...) receive gradients through PyTorch's autograd.
"""
from __future__ import annotations

from typing import Any, Dict


class ScoreMod:
    def _fields(self) -> Dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool))}
        return f"{type(self).__name__}({shown})"


class Softcap(ScoreMod):
    """s -> cap * tanh(s / cap) (Gemma 2, Grok)."""

    def __init__(self, cap: float):
        self.cap = float(cap)

    def _fields(self):
        return {"softcap": self.cap}


class ALiBi(ScoreMod):
    """s -= m_h |i' - j| (causal: m_h (i' - j)); ``slopes`` fp32 [Hq], default 2^(-8(h+1)/H)."""

    def __init__(self, slopes: Any = None, symmetric: bool = False):
        self.slopes, self.symmetric = slopes, bool(symmetric)

    def _fields(self):
        return {"alibi": "symmetric" if self.symmetric else "causal", "alibi_slopes": self.slopes}


class Bias(ScoreMod):
    """s += bias[b, h, i, j]; bias ``[B or 1, Hq or 1, Nq, Nk]`` (dbias is summed over the
    broadcast dims)."""

    def __init__(self, bias: Any):
        self.bias = bias

    def _fields(self):
        return {"bias": self.bias}


class LowRankBias(ScoreMod):
    """s += u_i . w_j with u ``[B, Hq, Nq, r]`` and w ``[B, Hq, Nk, r]`` (fp32)."""

    def __init__(self, u: Any, w: Any):
        self.u, self.w = u, w

    def _fields(self):
        return {"low_rank_u": self.u, "low_rank_w": self.w}


class RelativeBuckets(ScoreMod):
    """s += table[h, bucket(j - i')]: T5's log buckets (``kind="t5"``) or clipped distances
    (``kind="clipped"``, table of 2 * clip + 1 entries); table fp32 ``[Hq, buckets]``."""

    def __init__(self, table: Any, kind: str = "t5", bidirectional: bool = True,
                 num_buckets: int = 32, max_distance: int = 128, clip: int = 0):
        if kind not in ("t5", "clipped"):
            raise ValueError(f"kind = {kind!r}: must be 't5' or 'clipped'")
        self.table, self.kind = table, kind
        self.bidirectional, self.num_buckets = bool(bidirectional), int(num_buckets)
        self.max_distance, self.clip = int(max_distance), int(clip)

    def _fields(self):
        return {"relative": self.kind, "relative_table": self.table,
                "bidirectional": self.bidirectional, "num_buckets": self.num_buckets,
                "max_distance": self.max_distance, "clip": self.clip}


class ForgetGate(ScoreMod):
    """s += sum_{m = j+1..i'} log f_m (Forgetting Transformer); log_f fp32 ``[B, Hq, Nk]``."""

    def __init__(self, log_f: Any):
        self.log_f = log_f

    def _fields(self):
        return {"forget_log_f": self.log_f}


__all__ = ["ScoreMod", "Softcap", "ALiBi", "Bias", "LowRankBias", "RelativeBuckets", "ForgetGate"]
