"""A stub CUDA driver, for timing the host side of Triton launches on a machine without a GPU.

``libcuda.so.1`` here accepts every call Triton's launcher makes and does nothing: a module "loads", a
kernel "launches" at once, a host pointer passes as a device pointer, and the device reports itself as an
H100-class sm_90 card. With it, a Triton launch runs its whole host path as on a GPU (fastdense's launcher,
Triton's ``JITFunction.run``, its compiled C launcher) up to the driver call, which returns immediately.
``python -m fastdense host`` uses it; nothing else does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

# CUresult is 0 (CUDA_SUCCESS) for every call. Attribute numbers are CUDA's (cuda.h); what is not asked
# for answers 1.
_SOURCE = r"""
#include <stdint.h>
#include <string.h>
typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream;
static int context_token, module_token, function_token;

CUresult cuInit(unsigned int flags) { return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 12090; return 0; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = 0; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return 0; }
CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  switch (attribute) {
    case 1: *value = 1024; break;             /* max threads per block */
    case 8: case 97: *value = 232448; break;  /* shared memory per block (opt-in) */
    case 10: *value = 32; break;              /* warp size */
    case 16: *value = 132; break;             /* multiprocessors */
    case 39: *value = 2048; break;            /* max threads per multiprocessor */
    case 75: *value = 9; break;               /* compute capability major */
    case 76: *value = 0; break;               /* compute capability minor */
    case 81: *value = 233472; break;          /* shared memory per multiprocessor */
    case 82: *value = 65536; break;           /* registers per multiprocessor */
    default: *value = 1;
  }
  return 0;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) { *context = &context_token; return 0; }
CUresult cuCtxGetCurrent(CUcontext *context) { *context = &context_token; return 0; }
CUresult cuCtxSetCurrent(CUcontext context) { return 0; }
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return 0; }
CUresult cuCtxGetLimit(size_t *value, int limit) { *value = 0; return 0; }
CUresult cuCtxSetLimit(int limit, size_t value) { return 0; }
CUresult cuModuleLoadData(CUmodule *module, const void *image) { *module = &module_token; return 0; }
CUresult cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
  *function = &function_token; return 0;
}
CUresult cuModuleUnload(CUmodule module) { return 0; }
CUresult cuFuncGetAttribute(int *value, int attribute, CUfunction function) {
  switch (attribute) {
    case 0: *value = 1024; break;  /* max threads per block */
    case 4: *value = 128; break;   /* registers */
    default: *value = 0;           /* shared, constant and local (spill) bytes */
  }
  return 0;
}
CUresult cuFuncSetAttribute(CUfunction function, int attribute, int value) { return 0; }
CUresult cuFuncSetCacheConfig(CUfunction function, int config) { return 0; }
CUresult cuPointerGetAttribute(void *data, int attribute, uint64_t pointer) {
  *(uint64_t *)data = pointer; return 0;  /* a host pointer passes as the device's own */
}
CUresult cuPointerGetAttributes(unsigned int count, int *attributes, void **data, uint64_t pointer) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *clusters, CUfunction function, const void *config) {
  *clusters = 1; return 0;
}
CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                        unsigned int by, unsigned int bz, unsigned int shared, CUstream stream, void **params,
                        void **extra) { return 0; }
CUresult cuLaunchKernelEx(const void *config, CUfunction f, void **params, void **extra) { return 0; }
CUresult cuTensorMapEncodeTiled(void *map, ...) { return 0; }
CUresult cuTensorMapEncodeIm2col(void *map, ...) { return 0; }
CUresult cuGetErrorString(CUresult error, const char **text) { *text = "stub CUDA driver"; return 0; }
CUresult cuGetErrorName(CUresult error, const char **text) { *text = "stub"; return 0; }
"""


def stub_libcuda_dir() -> str:
    """A folder holding the stub ``libcuda.so.1``, compiled once (with the machine's C compiler) into a
    cache keyed by its source."""
    digest = hashlib.sha256((_SOURCE + "soname").encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastdense" / f"stub-libcuda-{digest}"
    library = root / "libcuda.so.1"
    if not library.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "stub.c"
            source.write_text(_SOURCE)
            built = Path(scratch) / "libcuda.so.1"
            compiler = os.environ.get("CC", "cc")
            command = [compiler, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(built), str(source)]
            subprocess.run(command, check=True)
            os.replace(built, library)  # atomic: another process may build the same file
        (root / "libcuda.so").unlink(missing_ok=True)
        os.symlink("libcuda.so.1", root / "libcuda.so")
    return str(root)


def activate() -> None:
    """Make Triton launch through the stub driver in this process (before any Triton launch): its CUDA
    utilities are compiled against the stub, the current device is an sm_90 card with stream 0, and
    kernels compile for it as for an H100 or H200."""
    import ctypes

    folder = stub_libcuda_dir()
    os.environ["TRITON_LIBCUDA_PATH"] = folder
    # Loaded first, under its soname: the CUDA utilities Triton compiles link to it by that name.
    ctypes.CDLL(os.path.join(folder, "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import driver as nvidia

    nvidia.libcuda_dirs.cache_clear()

    class StubDriver(nvidia.CudaDriver):
        def __init__(self) -> None:
            super().__init__()
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: (9, 0)

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

    triton.runtime.driver.set_active(StubDriver())
    from fastdense.kernels import launch

    launch.STUB_DRIVER = True
