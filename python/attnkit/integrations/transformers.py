"""Hugging Face transformers on attnkit: ``register()`` adds "attnkit" to transformers'
``AttentionInterface``, so ``attn_implementation="attnkit"`` runs every attention layer here.

The masks come in FlashAttention's compact form (transformers' ``flash_attention_mask``: the
2-D padding mask, or None), and become attnkit masks rather than a dense bias: causal (from the
layer's ``is_causal``), the model's sliding window, and the padding as a document mask whose
padded keys sit in a document of their own. Softcap (Gemma 2), sinks (``s_aux``, gpt-oss), GQA
and the layer's scaling map onto attnkit's spec.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

import attnkit
from attnkit import masks, score_mods

NAME = "attnkit"


def _mask_from(attention_mask: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor,
               causal: bool, sliding_window: Optional[int]) -> Any:
    parts = []
    if causal:
        parts.append(masks.Causal())
    if sliding_window:
        # transformers' sliding window: key j is seen from query i when i - sliding_window < j
        parts.append(masks.SlidingWindow(int(sliding_window) - 1, 0))
    if attention_mask is not None:
        nq, nk = query.shape[2], key.shape[2]
        if attention_mask.dim() == 2:  # [B, >= Nk], 1 = a real token
            valid = attention_mask[:, -nk:].to(torch.bool) if attention_mask.shape[1] >= nk \
                else attention_mask.to(torch.bool)
            ids_kv = (~valid).to(device=query.device, dtype=torch.int32).contiguous()
            ids_q = torch.zeros((query.shape[0], nq), dtype=torch.int32, device=query.device)
            parts.append(masks.Document(ids_q, ids_kv))
        else:
            raise NotImplementedError(
                f"attnkit: attention_mask with {attention_mask.dim()} dims; register() installs "
                "the 2-D mask format (flash_attention_mask)")
    if not parts:
        return None
    m = parts[0]
    for p in parts[1:]:
        m = m & p
    return m


def attnkit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                              scaling: Optional[float] = None, dropout: float = 0.0,
                              sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None,
                              **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, Nq, d], key/value [B, Hk, Nk, d];
    returns (attn_output [B, Nq, H, dv], None)."""
    if dropout and module.training:
        raise NotImplementedError("attnkit: attention dropout is not supported (dropout = "
                                  f"{dropout} in training mode)")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal) and query.shape[2] > 1
    mask = _mask_from(attention_mask, query, key, causal, sliding_window)
    if query.dtype != key.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    out = attnkit.attention(
        query, key, value, mask=mask,
        score_mod=score_mods.Softcap(softcap) if softcap else None,
        scale=scaling, sinks=None if s_aux is None else s_aux.to(torch.float32))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Adds "attnkit" to transformers' AttentionInterface (and its mask format to
    AttentionMaskInterface, where transformers has one)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, attnkit_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:  # transformers without the mask interface passes 2-D masks as they are
        return
    AttentionMaskInterface.register(NAME, flash_attention_mask)
