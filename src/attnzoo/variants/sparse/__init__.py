"""The content-sparse family: each query reads the keys its `select` picks from q and k, with exact
softmax over exactly those keys (core/selection.py). One module per mechanism."""
from ...core.registry import import_submodules

import_submodules(__name__, __path__)  # every mechanism module registers itself: adding one edits nothing here
