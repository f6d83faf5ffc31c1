"""The Triton backend against the float64 reference, kernel by kernel.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, on small shapes (the interpreter is
slow): ``conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton. With a GPU the same
checks run on CUDA, and ``RKD_TEST_LARGE=1`` adds benchmark-sized shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

pytest.importorskip("triton", reason="triton is not installed")

from bad_values import BAD_ROW, value_cases
from conftest import TOLERANCES, make_inputs

from rkd_engine import reference
from rkd_engine.ops import checks, triton_backend

LARGE = os.environ.get("RKD_TEST_LARGE", "0") == "1"

pytestmark = [
    # The interpreter evaluates both sides of tl.where with numpy, which warns about the discarded side.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def _distill():
    from rkd_engine.kernels import distill

    return distill


def _wide_config(rows: int, m: int, block: int = 32):
    """Force the two-pass path with small tiles, two-row tiles and row groups of 2 rows on a modest ``m``."""
    cfg = _distill().fused_config(
        rows, m, sm_count=4, narrow_max_classes=min(m - 1, 32), wide_block_n=block, min_group_rows=2
    )
    assert cfg.wide and cfg.block_r == 2 and (rows <= 2 or cfg.programs > 1)
    return cfg


PATHS = ("narrow", "wide")
WIDE_M = 130  # 5 column tiles of 32 (the last one partial) on the forced two-pass path


def _shape(path: str, rows: int = 6, narrow_m: int = 37) -> tuple[int, int]:
    """Rows and classes of a small case: the wide path costs the interpreter far more per element."""
    return (rows, narrow_m) if path == "narrow" else (5, WIDE_M)


def _inputs(rows, m, dtype, regime, seed, setup):
    """Student, teacher, labels, a, log c, w for one objective setup (``labels``, ``teacher``, ``mix``, ``probs``)."""
    f, g, y = make_inputs(rows, m, dtype, DEVICE, regime, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    log_c = (torch.randn(m, generator=gen) * 0.7).to(DEVICE)
    w = (torch.rand(m, generator=gen) + 0.5).to(DEVICE)
    a = torch.rand(rows, generator=gen)
    a[::3] = 1.0
    a[1::5] = 0.0
    a = a.to(DEVICE)
    if regime == "masked":
        a = torch.ones(rows, device=DEVICE)  # a hard label on a masked class would make the loss infinite
    if setup == "labels":
        return {
            "student": f,
            "teacher": None,
            "labels": y,
            "a": torch.zeros(rows, device=DEVICE),
            "log_c": log_c,
            "w": None,
            "probs": False,
        }
    if setup == "teacher":
        return {
            "student": f,
            "teacher": g,
            "labels": None,
            "a": torch.ones(rows, device=DEVICE),
            "log_c": log_c,
            "w": w,
            "probs": False,
        }
    if setup == "probs":
        probs = torch.softmax(g.double() * 0.5, -1).to(dtype)
        return {"student": f, "teacher": probs, "labels": y, "a": a, "log_c": None, "w": w, "probs": True}
    return {"student": f, "teacher": g, "labels": y, "a": a, "log_c": log_c, "w": w, "probs": False}


def _check(inp, *, gamma=2.0, tau=1.0, grad_scale=0.25, need_grad=True, grad_out=None, config=None, stat_tol=None):
    """Run the Triton backend and the float64 reference on the same inputs; compare every output."""
    f, dtype = inp["student"], inp["student"].dtype
    ref = reference.fused_rows(
        f.double(),
        teacher=None if inp["teacher"] is None else inp["teacher"].double(),
        teacher_is_probs=inp["probs"],
        labels=inp["labels"],
        a=inp["a"].double(),
        gamma=gamma,
        log_c=None if inp["log_c"] is None else inp["log_c"].double(),
        w=None if inp["w"] is None else inp["w"].double(),
        tau=tau,
        grad_scale=grad_scale,
    )
    loss, grad, mass, risk, error = triton_backend.fused_forward(
        f,
        inp["teacher"],
        inp["labels"],
        inp["a"],
        inp["log_c"],
        inp["w"],
        gamma=gamma,
        tau=tau,
        teacher_is_probs=inp["probs"],
        grad_scale=grad_scale,
        need_grad=need_grad,
        grad_out=grad_out,
        config=config,
    )
    for t in (loss, mass, risk, error):
        assert t.dtype == torch.float32 and t.device == f.device
    fp32 = TOLERANCES[torch.float32] if stat_tol is None else stat_tol
    scale = max(1.0, ref.loss.abs().max().item())
    torch.testing.assert_close(loss.double(), ref.loss, rtol=fp32["rtol"], atol=fp32["atol"] * scale, msg="loss")
    for name, got in (("mass", mass), ("risk", risk), ("error", error)):
        want = getattr(ref, name)
        atol = fp32["atol"] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=fp32["rtol"] * 4, atol=atol, msg=name)
    if need_grad:
        assert grad.dtype == dtype and grad.shape == f.shape
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(
            grad.double(), ref.grad.double(), rtol=tol["rtol"], atol=tol["atol"] * grad_scale, msg="grad"
        )
    else:
        assert grad.numel() == 0
    return grad


@pytest.mark.parametrize("setup", ["labels", "teacher", "mix", "probs"])
@pytest.mark.parametrize("m", [1, 3, 10, 37])
def test_narrow_rows(m, setup):
    _check(_inputs(6, m, torch.float32, "normal", seed=10 * m, setup=setup))


@pytest.mark.parametrize("setup", ["labels", "teacher", "mix", "probs"])
def test_wide_rows_two_pass(setup):
    rows, m = 5, 300
    cfg = _wide_config(rows, m, block=64)
    assert cfg.wide and cfg.programs > 1 and -(-m // cfg.block_m) > 1
    _check(_inputs(rows, m, torch.float32, "normal", seed=3, setup=setup), config=cfg)


def test_narrow_persistent_programs_and_partials():
    """Several row blocks per program, several programs: the stage-2 sum of partial statistics."""
    rows, m = 13, 37
    cfg = _distill().FusedConfig(wide=False, block_r=2, block_m=64, num_warps=2, programs=3)
    _check(_inputs(rows, m, torch.float32, "normal", seed=5, setup="mix"), config=cfg)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("regime", ["peaked", "masked", "huge", "equal"])
def test_input_regimes(regime, path):
    rows, m = _shape(path)
    inp = _inputs(rows, m, torch.float32, regime, seed=11, setup="mix")
    _check(inp, config=None if path == "narrow" else _wide_config(rows, m))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gamma,tau", [(0.1, 1.0), (20.0, 0.5), (3.0, 4.0), (0.1, 20.0)])
def test_temperatures(gamma, tau, path):
    rows, m = _shape(path, rows=5)
    inp = _inputs(rows, m, torch.float32, "peaked", seed=13, setup="mix")
    _check(inp, gamma=gamma, tau=tau, config=None if path == "narrow" else _wide_config(rows, m))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, path):
    rows, m = _shape(path)
    inp = _inputs(rows, m, dtype, "normal", seed=17, setup="mix")
    _check(inp, tau=2.0, config=None if path == "narrow" else _wide_config(rows, m))


@pytest.mark.parametrize("path", PATHS)
def test_masked_student_and_teacher_columns_give_zero_not_nan(path):
    rows, m = _shape(path, rows=5)
    inp = _inputs(rows, m, torch.float32, "masked", seed=41, setup="mix")
    masked = torch.isinf(inp["teacher"][0])
    assert masked.any()
    inp["student"][:, masked] = float("-inf")  # s = 0 and q = 0 there: every term must be exactly 0
    _, grad, _, risk, _ = triton_backend.fused_forward(
        inp["student"], inp["teacher"], inp["labels"], inp["a"], inp["log_c"], inp["w"],
        gamma=2.0, tau=1.0, teacher_is_probs=False, grad_scale=1.0, need_grad=True,
        config=None if path == "narrow" else _wide_config(rows, m),
    )  # fmt: skip
    assert torch.all(risk[masked] == 0) and torch.all(grad[:, masked] == 0)
    _check(inp, config=None if path == "narrow" else _wide_config(rows, m))


@pytest.mark.parametrize("path", PATHS)
def test_argmax_ties_take_the_first_index(path):
    rows, m = _shape(path, narrow_m=20)
    inp = _inputs(rows, m, torch.float32, "normal", seed=19, setup="mix")
    gen = torch.Generator().manual_seed(19)
    inp["student"] = torch.randint(0, 3, (rows, m), generator=gen).float().to(DEVICE)  # many ties at the max
    inp["student"][0] = 1.0  # a whole row tied
    _check(inp, config=None if path == "narrow" else _wide_config(rows, m))


@pytest.mark.parametrize("path", PATHS)
def test_no_gradient_writes_nothing(path):
    rows, m = _shape(path, rows=5, narrow_m=10)
    inp = _inputs(rows, m, torch.float32, "normal", seed=23, setup="mix")
    sentinel = torch.full((rows, m), 7.0, device=DEVICE)
    _check(inp, need_grad=False, grad_out=sentinel, config=None if path == "narrow" else _wide_config(rows, m))
    assert torch.all(sentinel == 7.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_gradient_in_place_of_student(path, dtype):
    rows, m = _shape(path, rows=4)
    inp = _inputs(rows, m, dtype, "peaked", seed=29, setup="mix")
    inp["student"] = inp["student"].clone()
    original = inp["student"].clone()
    expected = dict(inp, student=original)
    # the reference reads the untouched copy; the kernel overwrites its own input
    want = _check(dict(expected), config=None if path == "narrow" else _wide_config(rows, m))
    grad = triton_backend.fused_forward(
        inp["student"], inp["teacher"], inp["labels"], inp["a"], inp["log_c"], inp["w"],
        gamma=2.0, tau=1.0, teacher_is_probs=False, grad_scale=0.25, need_grad=True,
        grad_out=inp["student"], config=None if path == "narrow" else _wide_config(rows, m),
    )[1]  # fmt: skip
    assert grad.data_ptr() == inp["student"].data_ptr()
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_scale_rows_skips_unit_rows():
    rows, m = 5, 300
    gen = torch.Generator().manual_seed(31)
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(rows, m, generator=gen).to(dtype).to(DEVICE)
        go = torch.tensor([1.0, 0.5, -3.0, 1.0, 0.0], device=DEVICE)
        expected = (grad.float() * go[:, None]).to(dtype)
        before = grad.clone()
        triton_backend.scale_rows_(grad, go)
        # one rounding of the fp32 product (the interpreter truncates to bf16: allow that one ulp)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(grad, expected, rtol=ulp, atol=0)
        assert torch.equal(grad[0], before[0]) and torch.equal(grad[3], before[3])


def test_limits_and_reasons(monkeypatch):
    distill = _distill()
    with pytest.raises(ValueError, match="262144"):
        distill.fused_config(4, distill.MAX_CLASSES + 1, sm_count=1)
    assert distill.fused_config(4, distill.MAX_CLASSES, sm_count=132).wide
    assert not distill.fused_config(4, distill.NARROW_MAX_CLASSES, sm_count=132).wide
    device = torch.device(DEVICE)
    assert triton_backend.unavailable_reason(device, torch.float32, 1000) is None
    assert "float64" in triton_backend.unavailable_reason(device, torch.float64, 1000)
    assert "limit" in triton_backend.unavailable_reason(device, torch.float32, distill.MAX_CLASSES + 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("cpu"), torch.float32, 10)


def test_workspace_is_bounded():
    distill = _distill()
    for rows, m in [(8192, 1000), (8192, 32000), (8192, 131072), (65536, 262144)]:
        cfg = distill.fused_config(rows, m, sm_count=132)
        assert cfg.workspace_bytes(rows, m) < 64 * 2**20 + rows * 32, (rows, m, cfg)


def test_bad_inputs_are_named():
    inp = _inputs(4, 6, torch.float32, "normal", seed=1, setup="mix")
    args = [inp["student"], inp["teacher"], inp["labels"], inp["a"], inp["log_c"], inp["w"]]
    kw = {"gamma": 1.0, "tau": 1.0, "teacher_is_probs": False, "grad_scale": 1.0, "need_grad": True}
    with pytest.raises(TypeError, match="a must have dtype"):
        triton_backend.fused_forward(*args[:3], inp["a"].double(), *args[4:], **kw)
    with pytest.raises(ValueError, match="teacher must have the student's shape"):
        triton_backend.fused_forward(args[0], args[1][:, :3], *args[2:], **kw)
    with pytest.raises(ValueError, match="log_c must have shape"):
        triton_backend.fused_forward(*args[:4], args[4][:2], args[5], **kw)
    with pytest.raises(ValueError, match="tau must be > 0"):
        triton_backend.fused_forward(*args, **dict(kw, tau=0.0))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_training_step_with_dro_updates_makes_no_host_sync():
    from rkd_engine import ClassDRO, distill_loss

    torch.manual_seed(0)
    m = 100
    model = torch.nn.Linear(32, m).cuda()
    dro = ClassDRO(m, alpha=0.5, step_size=0.1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = torch.randn(256, 32, device="cuda"), torch.randn(256, m, device="cuda")
    xv, tv = torch.randn(512, 32, device="cuda"), torch.randn(512, m, device="cuda")

    def step(i: int) -> None:
        out = distill_loss(model(x), teacher_logits=t, class_costs=dro.costs, backend="triton", validate=False)
        opt.zero_grad(set_to_none=False)
        out.loss.backward()
        opt.step()
        if i % 2 == 1:
            with torch.no_grad():
                val = distill_loss(model(xv), teacher_logits=tv, backend="triton", validate=False)
            dro.update(val.error, val.mass)

    step(1)  # compile the kernels and warm the allocator outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(6):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(dro.weights).all()


@pytest.mark.skipif(DEVICE != "cuda" or not LARGE, reason="large shapes: a CUDA GPU and RKD_TEST_LARGE=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,m", [(8192, 1000), (1024, 4096), (512, 32000), (256, 131072)])
def test_large_shapes(rows, m, dtype):
    inp = _inputs(rows, m, dtype, "normal", seed=37, setup="mix")
    _check(inp, grad_scale=1.0 / rows, stat_tol={"rtol": 1e-4, "atol": 1e-4})


@pytest.mark.parametrize("path", PATHS)
def test_ignored_rows_and_device_scale(path):
    """Rows labelled ``ignore_index`` contribute nothing; ``scale`` (a 0-d device tensor) multiplies the gradient."""
    rows, m = _shape(path)
    inp = _inputs(rows, m, torch.float32, "normal", 11, "mix")
    inp["labels"][[0, rows - 1]] = -100
    config = _wide_config(rows, m) if path == "wide" else None
    scale = torch.tensor(0.5, device=DEVICE)
    args = (inp["student"], inp["teacher"], inp["labels"], inp["a"], inp["log_c"], inp["w"])
    loss, grad, mass, risk, error = triton_backend.fused_forward(
        *args, gamma=2.0, tau=1.5, teacher_is_probs=False, grad_scale=0.25, need_grad=True, config=config,
        scale=scale,
    )  # fmt: skip
    ref = reference.fused_rows(
        args[0].double(), teacher=args[1].double(), labels=args[2], a=args[3].double(), gamma=2.0,
        log_c=args[4].double(), w=args[5].double(), tau=1.5, grad_scale=0.25, scale=scale.double(),
    )  # fmt: skip
    tol = TOLERANCES[torch.float32]
    for got, want in ((loss, ref.loss), (grad, ref.grad), (mass, ref.mass), (risk, ref.risk), (error, ref.error)):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"])
    assert torch.equal(loss[[0, rows - 1]], torch.zeros(2, device=DEVICE))
    assert torch.equal(grad[[0, rows - 1]].abs(), torch.zeros(2, m, device=DEVICE))


BAD_CASES = value_cases()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("match,inputs", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_values_are_flagged_in_the_kernels_pass(path, match, inputs):
    """Bad teacher probabilities and a bad teacher row with a_i = 0 give that row (only) a NaN loss on both
    paths, from which the status names the argument and the row (as tests/test_validate.py on CPU)."""
    f, g, y, a = (inputs[k].to(DEVICE) for k in ("student", "teacher", "labels", "a"))
    config = None if path == "narrow" else _wide_config(*f.shape, block=4)
    loss = triton_backend.fused_forward(
        f, g, y, a, None, None, gamma=2.0, tau=1.5, teacher_is_probs=inputs["probs"], grad_scale=1.0,
        need_grad=True, config=config,
    )[0]  # fmt: skip
    others = torch.arange(f.shape[0], device=DEVICE) != BAD_ROW
    assert torch.isnan(loss[BAD_ROW]) and torch.isfinite(loss[others]).all()
    with pytest.raises(ValueError, match=match):
        checks.enforce("sync", loss, f, g, inputs["probs"], y, a, -100)
