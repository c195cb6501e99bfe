"""Triton kernels of fastdense (BN-ReLU-GEMM prologue, segment statistics, fused convolutions).

Empty until the Triton backend lands; ``fastdense.backend`` keeps ``backend="triton"`` refusing
clearly until then. Each kernel will come with its ``autograd.Function`` and a plain-PyTorch
reference used by the tests.
"""
