"""What the kernels can do here: whether Triton runs (CUDA present) and how many ``up`` factors one launch takes.

Kept apart from the dispatch policy in :mod:`optimum_odllm.kernels` so that the ops and the Triton module
import these facts without importing the package that imports them (no import cycle).
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
MAX_GROUPS = 3  # up factors one grouped_up launch takes (q/k/v)
MAX_INT_KERNEL_ROWS = 64  # the integer kernel keeps all rows in one tile (BLOCK_M); more rows take another path
# activations the Triton kernels take (float32 would run tl.dot in TF32)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
