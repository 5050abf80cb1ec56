"""attnkit: the attention mechanisms of the literature in one C++ library.

    import attnkit
    out = attnkit.attention(q, k, v, causal=True)                   # [B, H, N, d]
    out = attnkit.attention(q, k, v, mask=attnkit.masks.SlidingWindow(256, 0),
                            score_mod=attnkit.score_mods.Softcap(30.0))

NumPy arrays and PyTorch tensors cross into C++ through DLPack without copies. PyTorch tensors
go through the ``attnkit::attention`` custom op (autograd, torch.compile). Hugging Face
transformers models run on attnkit after ``attnkit.integrations.transformers.register()``.
"""
import sys as _sys

from . import masks, normalizers, score_mods
from ._api import (MaskCache, attention, attention_backward, cpu_simd_target,
                   support_matrix)
from .masks import BlockMask

__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "BlockMask", "MaskCache", "masks", "normalizers",
           "score_mods", "support_matrix", "cpu_simd_target"]

if "torch" in _sys.modules:  # register the custom ops now (torch.compile then sees no import)
    from . import _torch  # noqa: F401
