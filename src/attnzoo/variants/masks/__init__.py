"""The mask family: exact softmax attention under a structured mask.

Each variant is one small class: its mask as a pure function of absolute positions (FlexAttention
style), and, where its rows are unions of key intervals, those intervals, from which block
structures are built in O(Sq x key blocks) without evaluating the mask on every tile. Masks that
differ per head read a per-head table with the query-head index `h`; grid masks (images, video)
see tokens laid out row-major on a 1-3D grid. HiLo is the one member that is not a mask over the
given keys (half its heads attend to pooled keys): it composes two masked variants.
"""
from ...core.registry import import_submodules

import_submodules(__name__, __path__)  # every module registers its classes: adding one edits nothing here

from .per_head import mswa_windows  # noqa: E402,F401
