"""attnzoo's own Triton kernels, registered as the `triton` backend (priority 40: `auto` takes it on CUDA
for the calls it can run; `why_not` says why not for the others).

Importing this package needs triton: without it the import raises ImportError and the backend is
simply absent (attnzoo.backends imports it inside try/except ImportError).
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here: no triton, no `triton` backend)

from ...core.dispatch import register_backend
from . import linear

register_backend(linear.backend(), replace=True)
