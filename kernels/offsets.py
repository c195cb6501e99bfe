"""Element offsets of rows in a row-major matrix, as every kernel computes them.

Row and column indices stay int32 (row counts stay below 2^31: ``launch.check_rows``), so index math,
masks and the 2-D column offsets of a tile are 32-bit. Only the 1-D vector of row starts is int64,
since ``M * C_total`` passes 2^31 at realistic sizes. Full 2-D int64 offset tiles cost a register
pair per element and made the kernels spill.
"""

import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, stride):
    """int64 element offsets of ``rows`` in a matrix of row stride ``stride`` (a 1-D vector)."""
    return rows.to(tl.int64) * stride
