"""Masks (MECHANISMS.md 1.1): small objects that map 1:1 onto ``attnkit::Mask``.

Combine them with ``&`` (both allow), ``|`` (either allows) and ``~`` (complement)::

    masks.Causal() & masks.Document(ids)
    masks.SlidingWindow(256, 0) | masks.Chunked(512)
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple


class Mask:
    """Base class: a node of a mask tree."""

    def _node(self) -> Tuple[Any, ...]:
        raise NotImplementedError

    def __and__(self, other: "Mask") -> "Mask":
        return _Combine("and", self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return _Combine("or", self, other)

    def __invert__(self) -> "Mask":
        return _Not(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._node()[1:]!r}"


class _Combine(Mask):
    def __init__(self, op: str, a: Mask, b: Mask):
        self.op, self.a, self.b = op, a, b

    def _node(self):
        return (self.op, self.a._node(), self.b._node())

    def __repr__(self) -> str:
        return f"({self.a!r} {'&' if self.op == 'and' else '|'} {self.b!r})"


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a

    def _node(self):
        return ("not", self.a._node())

    def __repr__(self) -> str:
        return f"~{self.a!r}"


class NoMask(Mask):
    """Every key is allowed (dense attention)."""

    def _node(self):
        return ("none",)


class Causal(Mask):
    """j <= i' (aligned query index; bottom-right alignment unless ``alignment="top_left"``)."""

    def _node(self):
        return ("causal",)


class SlidingWindow(Mask):
    """i' - left <= j <= i' + right."""

    def __init__(self, left: int, right: int = 0):
        self.left, self.right = int(left), int(right)

    def _node(self):
        return ("sliding_window", self.left, self.right)


class GlobalWindow(Mask):
    """A sliding window plus global tokens that see and are seen by every token."""

    def __init__(self, left: int, right: int, globals: Sequence[int]):
        self.left, self.right, self.globals = int(left), int(right), [int(g) for g in globals]

    def _node(self):
        return ("global_window", self.left, self.right, self.globals)


class Chunked(Mask):
    """Tokens attend within their chunk of ``chunk`` tokens (causally if ``causal``)."""

    def __init__(self, chunk: int, causal: bool = False):
        self.chunk, self.causal = int(chunk), bool(causal)

    def _node(self):
        return ("chunked", self.chunk, self.causal)


class Document(Mask):
    """Same document id (int32 ``[N]`` or ``[B, N]``); ``ids_kv`` defaults to ``ids_q``."""

    def __init__(self, ids_q: Any, ids_kv: Any = None, causal: bool = False):
        self.ids_q, self.ids_kv, self.causal = ids_q, ids_q if ids_kv is None else ids_kv, causal

    def _node(self):
        return ("document", self.ids_q, self.ids_kv, bool(self.causal))

    def __repr__(self) -> str:
        return f"Document(causal={self.causal})"


class BlockAttention(Mask):
    """Block-attention (RAG): each passage attends within itself, the last block to all."""

    def __init__(self, ids: Any):
        self.ids = ids

    def _node(self):
        return ("block_attention", self.ids)

    def __repr__(self) -> str:
        return "BlockAttention()"


class PrefixLM(Mask):
    """Bidirectional over the first ``prefix`` keys, causal after."""

    def __init__(self, prefix: int):
        self.prefix = int(prefix)

    def _node(self):
        return ("prefix_lm", self.prefix)


class Neighborhood(Mask):
    """NATTEN's neighborhood attention on a 1-D to 3-D grid (tokens in row-major order)."""

    def __init__(self, shape: Sequence[int], kernel: Sequence[int],
                 dilation: Sequence[int] | None = None, causal: Sequence[bool] | None = None):
        self.shape = [int(s) for s in shape]
        self.kernel = [int(k) for k in kernel]
        self.dilation = [1] * len(self.shape) if dilation is None else [int(x) for x in dilation]
        self.causal = [False] * len(self.shape) if causal is None else [bool(c) for c in causal]

    def _node(self):
        return ("neighborhood", self.shape, self.kernel, self.dilation, self.causal)


class MaxViTBlock(Mask):
    """MaxViT block attention: non-overlapping ``window`` x ``window`` windows of an h x w grid."""

    def __init__(self, height: int, width: int, window: int):
        self.args = (int(height), int(width), int(window))

    def _node(self):
        return ("maxvit_block",) + self.args


class MaxViTGrid(Mask):
    """MaxViT grid attention: a ``grid`` x ``grid`` dilated grid over an h x w image."""

    def __init__(self, height: int, width: int, grid: int):
        self.args = (int(height), int(width), int(grid))

    def _node(self):
        return ("maxvit_grid",) + self.args


class BlockMask(Mask):
    """A block-sparse map (MECHANISMS.md 2.1), as MoBA or SeerAttention select it: int32
    ``[B or 1, Hq or 1, ceil(Nq / block_q), ceil(Nk / block_k)]``, nonzero where query block
    ``i // block_q`` may see key block ``j // block_k``. Per batch element and head; combine it
    with other masks (``BlockMask(m) & Causal()``). Work follows the allowed blocks."""

    def __init__(self, block_map: Any, block_size: Any = 64):
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
        self.block_map, self.block_q, self.block_k = block_map, int(bq), int(bk)

    def _node(self):
        return ("block_map", self.block_map, self.block_q, self.block_k)

    def __repr__(self) -> str:
        return f"BlockMask(block_size=({self.block_q}, {self.block_k}))"


__all__ = ["Mask", "NoMask", "Causal", "SlidingWindow", "GlobalWindow", "Chunked", "Document",
           "BlockAttention", "PrefixLM", "Neighborhood", "MaxViTBlock", "MaxViTGrid", "BlockMask"]
