"""The software versions a run records: in ``report.json`` and in a model bundle's ``bundle.json``.

One function for both, so a report and the bundle exported by the same run name the same
libraries; a bundle compares them on load (see :mod:`cldlr.common.bundle`).
"""

from __future__ import annotations

import platform
from importlib.metadata import version

import numpy as np

from cldlr import __version__


def runtime_versions() -> dict[str, str]:
    """cldlr, Python, the numerical libraries and the platform this process runs on.

    A function, not a constant, so the heavy libraries are imported only when a run records them
    and tests can pretend an upgrade by patching the name where a caller looks it up.
    """
    import sklearn
    import torch
    import torchvision

    return {
        "cldlr": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "flwr": version("flwr"), "scikit-learn": sklearn.__version__,
        "numpy": np.__version__, "platform": platform.platform(),
    }
