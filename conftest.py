"""Loaded by pytest before any test module: without a GPU, Triton kernels run in its interpreter.

``TRITON_INTERPRET`` is read when Triton is first imported (torchvision imports it), so it is set here,
before anything imports torchvision or fastdense's kernels. On a GPU machine the kernels are compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
