"""The op's constants are written once (rkd_engine.ops.constants) and the kernels' own limits agree with them;
every backend reports "cannot run these inputs" with one error type and one message format."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rkd_engine.ops import constants, cuda_backend, dispatch, triton_backend
from rkd_engine.training import config

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_header_limit_matches():
    header = (ROOT / "csrc" / "cuda" / "distill_kernels.h").read_text()
    found = re.search(r"kMaxClasses\s*=\s*(\d+)\s*;", header)
    assert found, "kMaxClasses not found in distill_kernels.h"
    assert int(found.group(1)) == constants.MAX_CLASSES


def test_python_limits_are_the_constant():
    assert triton_backend.MAX_CLASSES == constants.MAX_CLASSES
    assert cuda_backend.MAX_CLASSES == constants.MAX_CLASSES
    source = (ROOT / "kernels" / "distill.py").read_text()
    assert re.search(r"^MAX_CLASSES = _MAX_CLASSES", source, re.M), (
        "kernels.distill must take MAX_CLASSES from constants"
    )
    assert not re.search(r"262_?144", source + (ROOT / "rkd_engine" / "ops" / "triton_backend.py").read_text())


def test_names_are_single_sourced():
    assert dispatch.BACKENDS is constants.BACKENDS
    assert config.BACKENDS == ("auto", *constants.BACKENDS)
    assert config.OBJECTIVES is constants.OBJECTIVES
    from rkd_engine import losses
    from rkd_engine.ops import op

    assert losses.OBJECTIVES is constants.OBJECTIVES and op.REDUCTIONS is constants.REDUCTIONS


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for backends that cannot run without a GPU")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_error_is_one_type(name):
    f = torch.zeros(2, 3, device="meta")
    with pytest.raises(constants.BackendUnavailableError, match=rf"backend='{name}' cannot run .* on meta: "):
        dispatch.select_backend(name, f.device, f.dtype, 3)
    with pytest.raises(constants.BackendUnavailableError, match=rf"backend='{name}' cannot run"):
        dispatch.backend_module(name).fused_forward(
            f, None, torch.zeros(2, dtype=torch.long, device="meta"), torch.zeros(2, device="meta"), None, None,
            gamma=1.0, tau=1.0, teacher_is_probs=False, grad_scale=1.0, need_grad=False,
        )  # fmt: skip
    assert issubclass(constants.BackendUnavailableError, RuntimeError)
