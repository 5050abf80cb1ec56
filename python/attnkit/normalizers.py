"""Normalizers (MECHANISMS.md 1.3) other than softmax, mapping onto ``attnkit::Normalizer``.

``attnkit.attention(normalizer=...)`` takes one of these or a name ("softmax", "sigmoid",
"rela", "kernel"); ``sinks=`` selects softmax with an attention sink.
"""
from __future__ import annotations

from typing import Any, Dict


class Normalizer:
    def _fields(self) -> Dict[str, Any]:
        raise NotImplementedError


class Softmax(Normalizer):
    def _fields(self):
        return {"normalizer": "softmax"}


class Sink(Normalizer):
    """Softmax with a per-head sink logit (gpt-oss, StreamingLLM): sinks fp32 ``[Hq]``."""

    def __init__(self, sinks: Any):
        self.sinks = sinks

    def _fields(self):
        return {"normalizer": "sink", "sinks": self.sinks}


class Sigmoid(Normalizer):
    """p = sigmoid(s + beta), beta default -log(Nk). A 1-element tensor beta gets a gradient."""

    def __init__(self, beta: Any = None):
        self.beta = beta

    def _fields(self):
        return {"normalizer": "sigmoid", "beta": self.beta}


class Kernel(Normalizer):
    """p = f(s')^power / sum, f = softplus or relu, s' = s log(n_i) with ``length_scale``."""

    def __init__(self, feature: str = "softplus", power: float = 1.0, length_scale: bool = False):
        if feature not in ("softplus", "relu"):
            raise ValueError(f"feature = {feature!r}: must be 'softplus' or 'relu'")
        self.feature, self.power, self.length_scale = feature, float(power), bool(length_scale)

    def _fields(self):
        return {"normalizer": "kernel", "feature": self.feature, "power": self.power,
                "length_scale": self.length_scale}


class ReLA(Normalizer):
    """Rectified linear attention: O = gain * RMSNorm(relu(S) V); gain fp32 ``[dv]``."""

    def __init__(self, gain: Any, eps: float = 1e-6):
        self.gain, self.eps = gain, float(eps)

    def _fields(self):
        return {"normalizer": "rela", "rela_gain": self.gain, "rela_eps": self.eps}


__all__ = ["Normalizer", "Softmax", "Sink", "Sigmoid", "Kernel", "ReLA"]
