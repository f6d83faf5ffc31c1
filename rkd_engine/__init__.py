"""rkd: robust knowledge distillation, fast.

The fused distillation loss with per-class statistics (``distill_loss``), the class-level DRO state
(``ClassDRO``) and a module that applies the paper's objectives (``RobustDistillationLoss``).
See ``docs/README.md`` for the formulas; ``rkd_engine.reference`` is their pure-PyTorch oracle.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _alias_source_kernels() -> None:
    """In a source checkout the Triton kernels live in ``<repo>/kernels``; expose them as ``rkd_engine.kernels``.

    An installed wheel ships them as the real subpackage ``rkd_engine/kernels`` and this does nothing.
    """
    here = Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or "rkd_engine.kernels" in sys.modules:
        return
    init = here.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "rkd_engine.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_alias_source_kernels()

from rkd_engine.dro import ClassDRO  # noqa: E402
from rkd_engine.losses import OBJECTIVES, LossOutput, RobustDistillationLoss, distill_loss  # noqa: E402
from rkd_engine.ops import available_backends, explain_backends  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "ClassDRO",
    "LossOutput",
    "RobustDistillationLoss",
    "__version__",
    "available_backends",
    "distill_loss",
    "explain_backends",
]
