"""The linear / recurrent family: attention as a state carried along the sequence. Each mechanism is
one package with its definition (`naive.py`: the paper's formula, quadratic, and its one-token
recurrence) next to its chunked form (`chunk.py`), as fla's ops/<name>/."""
from . import gla  # noqa: F401
from . import linear  # noqa: F401
from . import cosine  # noqa: F401
from . import retention  # noqa: F401
from . import lightning  # noqa: F401
from . import based  # noqa: F401
