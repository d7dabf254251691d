"""The linear / recurrent family: attention as a state carried along the sequence. Each mechanism is
one package with its definition (`naive.py`: the paper's formula, quadratic, and its one-token
recurrence) next to its chunked form (`chunk.py`), as fla's ops/<name>/."""
from ...core.registry import import_submodules

import_submodules(__name__, __path__)  # every mechanism module registers itself: adding one edits nothing here
