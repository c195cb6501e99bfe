"""``python -m fastdense``: the command-line tools in ``fastdense.tools``.

``python -m fastdense [report options]`` runs the verification-and-benchmark report (``fastdense.tools.report``);
``python -m fastdense SUBCOMMAND ...`` runs a tool (bench, fit, traffic, host, volumes, profile, kernels);
``python -m fastdense --help`` lists them.
"""

import sys

from .tools import main

main(sys.argv[1:])
