"""Trainable attention modules over the functional core: multi-head attention with any attnzoo variant
(GQA/MQA, RoPE, a decoding cache) and the head structures of the literature."""
from .common import KVCache, LatentCache, StateCache, apply_rope, rope_cos_sin, rotate_half
from .differential import DifferentialAttention
from .dma import DynamicMask, DynamicMaskAttention
from .gqa import GroupedQueryAttention, MultiQueryAttention, gqa_from_mha
from .hedgehog import HedgehogAttention, HedgehogFeatureMap
from .mha import MultiheadAttention
from .mla import MLA
from .moh import MoHAttention
from .seer import SeerGate

__all__ = [
    "DifferentialAttention", "DynamicMask", "DynamicMaskAttention", "GroupedQueryAttention", "HedgehogAttention",
    "HedgehogFeatureMap", "KVCache", "LatentCache",
    "MLA", "MultiQueryAttention", "MoHAttention", "MultiheadAttention", "SeerGate", "StateCache", "apply_rope",
    "gqa_from_mha", "rope_cos_sin", "rotate_half",
]
