"""``python -m fastdense``: the verification-and-benchmark report (see ``fastdense.report``)."""

from .report import main

main()
