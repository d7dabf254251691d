"""The content-sparse family: each query reads the keys its `select` picks from q and k, with exact
softmax over exactly those keys (core/selection.py). One module per mechanism."""
from . import biformer, hip, hyper, landmark, moba, nsa, quest, tokenselect, topk  # noqa: F401
