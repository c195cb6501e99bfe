"""fastdense's Triton kernels, imported as ``fastdense.kernels`` from the repository's ``kernels/`` folder.

The kernels live in ``kernels/`` at the top of the repository (the project's layout). An installed fastdense
holds them as this subpackage itself (``setup.py`` maps ``fastdense.kernels`` to that folder); run from
the source tree (``PYTHONPATH=.``, the GPU machine's way) this stand-in points the subpackage's path there.
Either way nothing is installed or imported under the top-level name ``kernels``.
"""

import os

__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")]
