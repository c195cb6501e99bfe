"""Loaded by pytest before any test module: without a GPU, Triton kernels run in its interpreter.

``TRITON_INTERPRET`` is read when Triton is first imported (torchvision imports it), so it is set here,
before anything imports torchvision or fastdense's kernels. On a GPU machine the kernels are compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is a process, and PyTorch's CPU threads, one per core in every worker,
# would oversubscribe the cores: the 3-D report test took 159 s beside another worker, 12 s alone. Each
# worker (and each process a test starts) gets its share of the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)
