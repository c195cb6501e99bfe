"""fastdense's Triton kernels, imported as ``fastdense.kernels``: BN-ReLU-1x1 conv as one GEMM over the
block buffer (``bn_relu_gemm``), the 3x3 implicit GEMM (``conv3x3``), segment statistics (``stats``),
BN-ReLU-pool (``bn_relu_pool``), the backward's dgrad and wgrad (``bn_relu_gemm_backward``) and segment
finalize (``finalize``); ``launch`` holds how they are launched (autotuning, the interpreter). Each kernel
comes with a plain-PyTorch reference that the tests run beside it.
"""
