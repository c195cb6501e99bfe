"""fastdense: DenseNets on one shared buffer per dense block, a drop-in for torchvision's."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "fastdense" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="fastdense",
    version=VERSION,
    description="Fused DenseNet blocks for PyTorch: one shared buffer per block, exact against torchvision",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    # The kernels live in the repository's kernels/ folder and install as fastdense.kernels: one top-level
    # name, fastdense (a top-level "kernels" would collide with the kernel-hub client of that name).
    packages=["fastdense", "fastdense.tools", "fastdense.kernels"],
    package_dir={"fastdense.kernels": "kernels"},
    python_requires=">=3.10",
    # Loose here so the library installs beside the user's PyTorch; requirements.txt pins the exact
    # CPU environment that CI and the README's commands use. The oldest tested: torch 2.11 with torchvision
    # 0.26 and triton 3.6 (the GPU machine's; the CPU suite runs on them too), the newest torch 2.14.1.
    install_requires=["torch>=2.11", "torchvision>=0.26"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6"],
        "bench": ["pytest-benchmark>=4", "rich>=13", "matplotlib>=3.7"],
        "dev": ["ruff>=0.6"],
    },
    entry_points={"console_scripts": ["fastdense=fastdense.tools:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
