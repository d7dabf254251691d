"""Trainable attention modules over the functional core: multi-head attention with any attnzoo variant
(GQA/MQA, RoPE, a decoding cache) and the head structures of the literature."""
from .bottleneck import DecoupledHeadAttention
from .cla import CrossLayerAttention
from .coca import CollinearConstrainedAttention
from .common import KVCache, LatentCache, StateCache, apply_rope, rope_cos_sin, rotate_half
from .differential import DifferentialAttention
from .diffqkv import DiffQKVAttention
from .dma import DynamicMask
from .gqa import GroupedQueryAttention, MultiQueryAttention, gqa_from_mha
from .hedgehog import HedgehogAttention, HedgehogFeatureMap
from .hybrid import HybridCache, HybridHeadAttention
from .mae import MixtureOfHeadsMinusOne
from .memory import MegaAttention, TitansMemory
from .mha import MultiheadAttention
from .mla import MLA
from .moh import MoHAttention
from .seer import SeerGate
from .shared import SharedAttention, SharedWeightsCache
from .tpla import TPLA
from .transmla import mla_from_gqa, transmla
from .wgqa import WeightedGroupedQueryAttention

__all__ = [
    "DifferentialAttention", "DynamicMask", "GroupedQueryAttention", "HedgehogAttention",
    "HedgehogFeatureMap", "KVCache", "LatentCache",
    "MLA", "MultiQueryAttention", "MoHAttention", "MultiheadAttention", "SeerGate", "StateCache", "apply_rope",
    "gqa_from_mha", "rope_cos_sin", "rotate_half",
    # head structures: KV shared across layers, attention weights shared, weighted GQA, h-1 head experts,
    # decoupled head dim, DiffQKV, TPLA, hybrid heads, CoCA; TransMLA conversion
    "CollinearConstrainedAttention", "CrossLayerAttention", "DecoupledHeadAttention", "DiffQKVAttention",
    "HybridCache", "HybridHeadAttention", "MixtureOfHeadsMinusOne", "SharedAttention", "SharedWeightsCache", "TPLA",
    "WeightedGroupedQueryAttention", "mla_from_gqa", "transmla",
    # token mixers whose linear-family inputs are learned
    "MegaAttention", "TitansMemory",
]
