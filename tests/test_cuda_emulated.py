"""The CUDA kernels' logic, run on the CPU: ``csrc/cuda/distill_kernels.cu`` compiled with the host C++ compiler
against a small emulation of the CUDA execution model (``tests/cuda_emulation``), compared with the float64
reference. It covers what the compile-only check cannot (indexing, row reductions, both code paths, the
statistics' second stage) on machines without a GPU; the GPU run (tests/test_cuda_backend.py) remains the
judge of the real thing (memory model, fast intrinsics, resource limits). Skipped, with the reason, where
no C++ compiler or CUDA headers are found.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from bad_values import BAD_ROW, edge_prob_rows, value_cases
from conftest import GPU_GRAD_TOL, GPU_STAT_TOL

from rkd_engine import reference
from rkd_engine.ops import checks
from rkd_engine.ops.checks import PROB_SUM_TOL

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cuda" / "distill_kernels.cu"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PLAN_FIELDS = ("resident", "vec", "vectors", "threads", "team", "smem", "splits", "split_cols", "tiles", "grid",
               "parts", "workspace_bytes")  # fmt: skip


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (next to nvcc, $CUDA_HOME, $CUDA_PATH or /usr/local/cuda)."""
    roots = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(os.path.realpath(nvcc)).parents[1])
    roots += [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if p]
    for root in roots:
        if (root / "include" / "cuda_bf16.h").is_file():
            return root / "include"
    return None


def _rewrite(source: str) -> str:
    """Kernel launches, dynamic shared memory and optimisation barriers in the emulation's terms."""
    source = re.sub(r"asm volatile\([^;]*\);", ";", source)
    source = re.sub(
        r"extern __shared__ (\w+) (\w+)\[\];",
        r"\1* \2 = reinterpret_cast<\1*>(rkd_emu::scheduler.block->dynamic_smem.data());",
        source,
    )
    source, launches = re.subn(
        r"([\w:]+(?:<[^<>;]*?>)?)<<<([^;]*?)>>>\(([^;]*)\);", r"rkd_emu::launch(\2, \1, \3);", source
    )
    assert launches >= 6, f"found only {launches} kernel launches to rewrite"
    return source


class Emulated:
    """ctypes front end with the backend contract, on CPU tensors."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        lib.emu_fused_forward.argtypes = [
            i32,
            i64,
            i64,
            p,
            p,
            i32,
            p,
            p,
            p,
            p,
            f32,
            f32,
            f32,
            p,
            p,
            p,
            p,
            p,
            ctypes.c_char_p,
            i32,
            i64,
            p,
            f32,
        ]
        lib.emu_path.argtypes = [i32, i64, i64, p, ctypes.c_char_p, i32]
        lib.emu_scale_rows.argtypes = [i32, p, i64, i64, p]
        lib.emu_configure.argtypes = [i32, i32]
        lib.emu_queries.restype = ctypes.c_long
        lib.emu_foreign_plan.argtypes = [i32, i64, i64, p, p, p, p, p, p, p, i64, p, ctypes.c_char_p, i32]
        lib.emu_make_plan.argtypes = [i32, i64, i64, i32, i32, i32, ctypes.POINTER(i64), ctypes.c_char_p, i32]
        self.lib = lib

    def configure(self, multiprocessors: int, blocks_per_multiprocessor: int) -> None:
        self.lib.emu_configure(multiprocessors, blocks_per_multiprocessor)

    def fused_forward(
        self,
        f,
        g,
        y,
        a,
        log_c,
        w,
        *,
        gamma=1.0,
        tau=1.0,
        probs=False,
        grad_scale=1.0,
        need_grad=True,
        grad_out=None,
        ignore_index=-100,
        scale=None,
    ):
        rows, m = f.shape
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        loss = torch.full((rows,), float("nan"))
        mass, risk, error = (torch.full((m,), float("nan")) for _ in range(3))
        grad = (torch.full_like(f, float("nan")) if grad_out is None else grad_out) if need_grad else f.new_empty(0)
        message = ctypes.create_string_buffer(512)
        failed = self.lib.emu_fused_forward(
            DTYPE_CODES[f.dtype],
            rows,
            m,
            ptr(f),
            ptr(g),
            int(probs),
            ptr(y),
            ptr(a),
            ptr(log_c),
            ptr(w),
            gamma,
            tau,
            grad_scale,
            ptr(grad) if need_grad else None,
            ptr(loss),
            ptr(mass),
            ptr(risk),
            ptr(error),
            message,
            512,
            ignore_index,
            ptr(scale),
            PROB_SUM_TOL[f.dtype],
        )
        if failed:
            raise ValueError(message.value.decode())
        return loss, grad, mass, risk, error

    def queries(self) -> int:
        """Runtime queries (device attributes, occupancy, function attributes) made by the host code so far."""
        return self.lib.emu_queries()

    def make_plan(self, dtype, rows, m, *, aligned=True, sms=132, blocks=2) -> dict:
        """The pure launch-plan function on a fake device of ``sms`` multiprocessors, ``blocks`` per multiprocessor."""
        out = (ctypes.c_int64 * len(PLAN_FIELDS))()
        message = ctypes.create_string_buffer(512)
        failed = self.lib.emu_make_plan(DTYPE_CODES[dtype], rows, m, int(aligned), sms, blocks, out, message, 512)
        if failed == 2:
            raise ValueError(message.value.decode())
        assert failed == 0, "make_plan asked no occupancy"
        return dict(zip(PLAN_FIELDS, out, strict=True))

    def path(self, f) -> str:
        out = ctypes.create_string_buffer(512)
        self.lib.emu_path(DTYPE_CODES[f.dtype], f.shape[0], f.shape[1], f.data_ptr(), out, 512)
        return out.value.decode()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> Emulated:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip(f"needs a C++ compiler (found {cxx}) and the CUDA headers (found {include})")
    build = tmp_path_factory.mktemp("cuda_emulation")
    source = build / "distill_kernels_emulated.cpp"
    source.write_text(_rewrite(KERNELS.read_text()))
    library = build / "librkd_cuda_emulated.so"
    cmd = [
        cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wno-attributes",
        f"-I{KERNELS.parent}", f"-I{include}", "-include", str(EMULATION / "emu_prelude.h"),
        f'-DRKD_KERNEL_SOURCE="{source}"', str(EMULATION / "harness.cpp"), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"building the emulation failed:\n{result.stderr[-6000:]}"
    emu = Emulated(library)
    emu.configure(2, 1)
    return emu


def _inputs(rows, m, dtype, *, regime="normal", seed=0, probs=False, gamma=1.0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    y = torch.randint(0, m, (rows,), generator=gen)
    if regime == "peaked":
        f, g = f * 15, g * 15
    elif regime == "huge":
        f, g = f + 1e4, g * 30 - 1e4
    elif regime == "masked":
        masked = torch.rand(m, generator=gen) < 0.3
        masked[0] = False
        g[:, masked] = float("-inf")
        y = torch.where(masked[y], torch.zeros_like(y), y)
    if probs:
        g = torch.softmax(g / gamma, -1)
    a = torch.rand(rows, generator=gen)
    a[0], a[-1] = 0.0, 1.0
    log_c = (torch.rand(m, generator=gen) + 0.5).log()
    w = torch.rand(m, generator=gen) + 0.5
    return f.to(dtype), g.to(dtype), y, a, log_c, w


def _compare(out, f, g, y, a, log_c, w, *, gamma=1.0, tau=1.0, probs=False, grad_scale=1.0, need_grad=True, scale=None):
    ref = reference.fused_rows(
        f.double(), teacher=None if g is None else g.double(), teacher_is_probs=probs, labels=y,
        a=a.double(), gamma=gamma, log_c=None if log_c is None else log_c.double(),
        w=None if w is None else w.double(), tau=tau, grad_scale=grad_scale, need_grad=need_grad,
        scale=None if scale is None else scale.double(),
    )  # fmt: skip
    names = ("loss", "grad", "mass", "risk", "error")
    for name, got, want in zip(names, out, ref, strict=True):
        if name == "grad":
            if not need_grad:
                assert got.numel() == 0
                continue
            assert got.dtype == f.dtype
            rtol, atol = GPU_GRAD_TOL[f.dtype]
        else:
            rtol, atol = GPU_STAT_TOL
        got = got.double()
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
        scale = want[finite].abs().max().item() if finite.any() else 0.0
        torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol * max(scale, 1e-30), msg=name)


CASES = [
    # (rows, m, dtype, options): warp teams, block teams, unaligned rows, the streaming path
    (19, 37, torch.float32, dict(tau=2.0, gamma=3.0)),
    (19, 64, torch.bfloat16, dict(regime="masked", teacher_only=True)),
    (40, 200, torch.float16, dict(regime="equal", many_blocks=True)),
    (5, 1000, torch.bfloat16, dict(regime="huge", gamma=0.1)),
    (5, 1001, torch.float16, dict(tau=0.5, probs=True)),
    (9, 4096, torch.float32, dict(tau=20.0, gamma=5.0, alias=True)),
    (3, 4104, torch.bfloat16, dict(tau=3.0, many_blocks=True)),
    (2, 4099, torch.float32, dict(regime="peaked", gamma=20.0, tau=0.1, alias=True)),
    (1, 20000, torch.float32, dict(labels_only=True)),
    (2, 8193, torch.bfloat16, dict(regime="huge", tau=2.0)),
]


@pytest.mark.parametrize("rows,m,dtype,options", CASES, ids=[f"{r}x{m}-{str(d)[6:]}" for r, m, d, _ in CASES])
def test_fused_forward_matches_reference(emulated, rows, m, dtype, options):
    options = dict(options)
    gamma, tau, probs = options.get("gamma", 1.0), options.get("tau", 1.0), options.get("probs", False)
    f, g, y, a, log_c, w = _inputs(rows, m, dtype, regime=options.get("regime", "normal"), seed=m, probs=probs,
                                   gamma=gamma)  # fmt: skip
    if options.get("teacher_only"):
        y, a = None, torch.ones(rows)
    if options.get("labels_only"):
        g, a, w = None, torch.zeros(rows), None
    if options.get("many_blocks"):
        emulated.configure(8, 2)  # several row groups in the streaming pass 2
    try:
        student = f.clone()
        out = emulated.fused_forward(student, g, y, a, log_c, w, gamma=gamma, tau=tau, probs=probs, grad_scale=0.5,
                                     grad_out=student if options.get("alias") else None)  # fmt: skip
    finally:
        emulated.configure(2, 1)
    if options.get("alias"):
        assert out[1].data_ptr() == student.data_ptr()
    _compare(out, f, g, y, a, log_c, w, gamma=gamma, tau=tau, probs=probs, grad_scale=0.5)


def test_paths_and_no_gradient(emulated):
    for m, path in ((64, "a warp per row"), (1000, "a block per row"), (4096, "resident"), (4104, "streaming")):
        assert path in emulated.path(torch.zeros(4, m, dtype=torch.bfloat16)), (m, emulated.path(torch.zeros(4, m)))
    f, g, y, a, log_c, w = _inputs(6, 300, torch.float32, seed=1)
    out = emulated.fused_forward(f, g, y, a, log_c, w, tau=1.5, need_grad=False)
    _compare(out, f, g, y, a, log_c, w, tau=1.5, need_grad=False)


def test_edge_inputs(emulated):
    loss, grad, mass, _, error = emulated.fused_forward(torch.empty(0, 5), None, torch.empty(0, dtype=torch.long),
                                                        torch.empty(0), None, None)  # fmt: skip
    assert loss.shape == (0,) and grad.shape == (0, 5)
    assert torch.equal(mass, torch.zeros(5)) and torch.equal(error, torch.zeros(5))
    f = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 0.0, 0.0]])
    loss, _, mass, _, error = emulated.fused_forward(f, None, torch.tensor([2, 0, 7]), torch.zeros(3), None, None)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()  # a label outside [0, m): NaN loss
    assert error.tolist() == [0.0, 0.0, 1.0, 0.0]  # first index of the maximum on ties: rows predict 1, 0
    with pytest.raises(ValueError, match="262144"):
        emulated.fused_forward(torch.zeros(1, 262145), None, torch.zeros(1, dtype=torch.long), torch.zeros(1), None,
                               None)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scale_rows(emulated, dtype):
    for m in (7, 1000):
        grad = torch.randn(4, m, generator=torch.Generator().manual_seed(m)).to(dtype)
        go = torch.tensor([1.0, 2.0, -0.5, 0.0])
        want = (grad.float() * go[:, None]).to(dtype)
        emulated.lib.emu_scale_rows(DTYPE_CODES[dtype], grad.data_ptr(), 4, m, go.data_ptr())
        assert torch.equal(grad, want)


@pytest.mark.parametrize("m", [37, 1000, 4104], ids=["warp", "block", "streaming"])
def test_ignored_rows_and_device_scale(emulated, m):
    """Rows labelled ignore_index give loss 0, a zero gradient row and no statistics; ``scale`` (a device
    scalar) multiplies the gradient with grad_scale, on every code path."""
    f, g, y, a, log_c, w = _inputs(7, m, torch.float32, seed=m)
    y[[0, 3, 6]] = -100
    scale = torch.tensor(0.25)
    out = emulated.fused_forward(f, g, y, a, log_c, w, tau=1.5, grad_scale=0.5, scale=scale)
    _compare(out, f, g, y, a, log_c, w, tau=1.5, grad_scale=0.5, scale=scale)
    loss, grad = out[0], out[1]
    assert torch.equal(loss[[0, 3, 6]], torch.zeros(3))
    assert torch.equal(grad[[0, 3, 6]].abs(), torch.zeros(3, m))
    kept = reference.fused_rows(f[[1, 2, 4, 5]].double(), teacher=g[[1, 2, 4, 5]].double(), labels=y[[1, 2, 4, 5]],
                                a=a[[1, 2, 4, 5]].double(), log_c=log_c.double(), w=w.double(), tau=1.5)  # fmt: skip
    torch.testing.assert_close(out[2].double(), kept.mass, rtol=5e-5, atol=1e-6)
    everything = torch.full_like(y, 7)
    loss, grad, mass, _, _ = emulated.fused_forward(f, g, everything, a, log_c, w, ignore_index=7)
    assert torch.equal(loss, torch.zeros(7)) and torch.equal(grad.abs(), torch.zeros(7, m))
    assert torch.equal(mass, torch.zeros(m))


@pytest.mark.parametrize("m", [37, 1000, 4104], ids=["warp", "block", "streaming"])
@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_all_inf_student_row_is_nan(emulated, m, tau):
    """A student row that is -inf everywhere has NaN loss and a NaN gradient row, as on every backend (issue 10,
    item 26); labelled ignore_index it stays at loss 0 and a zero gradient row; the other rows are unaffected."""
    f, g, y, a, log_c, w = _inputs(5, m, torch.float32, seed=m)
    f[[1, 3]] = float("-inf")
    y[3] = -100
    loss, grad, *_ = emulated.fused_forward(f, g, y, a, log_c, w, tau=tau)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert loss[3] == 0 and torch.equal(grad[3].abs(), torch.zeros(m))
    want = reference.fused_rows(f.double(), teacher=g.double(), labels=y, a=a.double(), log_c=log_c.double(),
                                w=w.double(), tau=tau)  # fmt: skip
    ok = [0, 2, 4]
    torch.testing.assert_close(loss[ok].double(), want.loss[ok], rtol=5e-5, atol=1e-5)
    torch.testing.assert_close(grad[ok].double(), want.grad[ok], rtol=5e-4, atol=1e-5)


BAD_CASES = value_cases()


@pytest.mark.parametrize("m", [9, 300, 4104], ids=["warp", "block", "streaming"])
@pytest.mark.parametrize("match,inputs", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_values_are_flagged_in_the_kernels_pass(emulated, m, match, inputs):
    """Bad teacher probabilities and a bad teacher row with a_i = 0 give that row (only) a NaN loss on every
    code path, from which the status names the argument and the row. The rows are widened with masked
    classes (-inf scores and logits, zero probabilities), which change nothing that is checked."""
    f, g, y, a, probs = (inputs[k] for k in ("student", "teacher", "labels", "a", "probs"))
    pad = m - f.shape[1]
    f = torch.cat([f, torch.full((f.shape[0], pad), float("-inf"))], 1)
    g = torch.cat([g, torch.full((g.shape[0], pad), 0.0 if probs else float("-inf"))], 1)
    loss = emulated.fused_forward(f, g, y, a, None, None, gamma=2.0, tau=1.5, probs=probs)[0]
    others = torch.arange(f.shape[0]) != BAD_ROW
    assert torch.isnan(loss[BAD_ROW]) and torch.isfinite(loss[others]).all()
    with pytest.raises(ValueError, match=match):
        checks.enforce("sync", loss, f, g, probs, y, a, -100)


def test_launch_plan_is_computed_once_per_shape(emulated):
    """The runtime is queried (multiprocessors, occupancy) on the first call of a shape only: a training loop's
    later calls query nothing; a new batch size with the same m reuses the device's cached properties."""
    emulated.configure(2, 1)  # a fresh (fake) device: nothing cached
    f, g, y, a, log_c, w = _inputs(5, 300, torch.float32, seed=2)
    first = emulated.queries()
    out = emulated.fused_forward(f, g, y, a, log_c, w)
    after_first = emulated.queries()
    assert after_first > first
    again = emulated.fused_forward(f, g, y, a, log_c, w)
    assert emulated.queries() == after_first
    for x, z in zip(out, again, strict=True):
        assert torch.equal(x, z)
    emulated.fused_forward(f[:3], g[:3], y[:3], a[:3], log_c, w)  # another B: a new plan, no query
    assert emulated.queries() == after_first
    emulated.fused_forward(f[:, :64].contiguous(), g[:, :64].contiguous(), y % 64, a, log_c[:64], w[:64])
    assert emulated.queries() > after_first  # another kernel variant (warp teams): its occupancy, once
    emulated.configure(2, 1)
    emulated.fused_forward(f, g, y, a, log_c, w)
    assert emulated.queries() > after_first  # forgotten with the device


def test_launch_cache_is_thread_safe(emulated):
    """Threads asking for plans of many shapes at once (ctypes releases the GIL) get the plans one thread
    alone gets, and each shape's runtime queries are made once."""
    from concurrent.futures import ThreadPoolExecutor

    shapes = [(rows, m, dtype) for rows in (1, 7, 64) for m in (5, 64, 300, 1000, 4104) for dtype in DTYPE_CODES]
    students = {(rows, m, dtype): torch.zeros(rows, m, dtype=dtype) for rows, m, dtype in shapes}
    emulated.configure(3, 2)
    try:
        start = emulated.queries()
        alone = {key: emulated.path(f) for key, f in students.items()}
        queries = emulated.queries() - start
        emulated.configure(3, 2)  # forget them all
        start = emulated.queries()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda key: (key, emulated.path(students[key])), list(students) * 8))
        assert all(path == alone[key] for key, path in together)
        assert emulated.queries() - start == queries
    finally:
        emulated.configure(2, 1)


def test_misaligned_rows_get_their_own_plan(emulated):
    """Alignment is part of the cached plan's key: a student that does not start on a 16-byte boundary takes
    single-element accesses even after an aligned call of the same shape."""
    rows, m = 6, 1000
    f, g, y, a, log_c, w = _inputs(rows, m, torch.bfloat16, seed=4)
    assert "vec=8" in emulated.path(f)
    buffer = torch.empty(rows * m + 1, dtype=torch.bfloat16)
    shifted = buffer[1:].view(rows, m)
    shifted.copy_(f)
    assert "vec=1" in emulated.path(shifted)
    out = emulated.fused_forward(shifted, g, y, a, log_c, w, tau=1.5)
    _compare(out, f, g, y, a, log_c, w, tau=1.5)


def test_a_plan_of_other_arguments_is_refused(emulated):
    """fused_forward checks that its plan is this call's (it sizes the grids, the workspace and the 16-byte
    accesses): a plan made for another B, or for aligned rows given misaligned ones, is refused, not run."""
    rows, m = 4, 64
    buffer = torch.zeros(rows * m + 1)
    aligned, shifted = buffer[: rows * m].view(rows, m), buffer[1:].view(rows, m)
    y, a = torch.zeros(rows, dtype=torch.long), torch.zeros(rows)
    outs = [torch.empty(rows)] + [torch.empty(m) for _ in range(3)]
    message = ctypes.create_string_buffer(512)

    def call(student, plan_rows, plan_student):
        ptrs = [student.data_ptr(), y.data_ptr(), a.data_ptr(), *(t.data_ptr() for t in outs)]
        return emulated.lib.emu_foreign_plan(0, rows, m, *ptrs, plan_rows, plan_student.data_ptr(), message, 512)

    assert call(aligned, rows, aligned) == 0
    assert call(aligned, rows + 1, aligned) == 1 and b"made for other arguments" in message.value
    assert call(shifted, rows, aligned) == 1 and b"made for other arguments" in message.value
    assert call(shifted, rows, shifted) == 0


def test_make_plan_on_a_fake_device(emulated):
    """The plan is a pure function of (dtype, B, m, alignment) and the device's properties."""
    plan = emulated.make_plan(torch.float32, 1000, 64, sms=132, blocks=3)
    # A warp per row (8 per 256-thread block), one 4-float vector per thread; 125 blocks cover the rows.
    assert (plan["resident"], plan["vec"], plan["vectors"], plan["team"], plan["threads"]) == (1, 4, 1, 32, 256)
    assert plan["grid"] == plan["parts"] == 125
    assert plan["smem"] == 4 * 3 * 4 * 256 + 2 * 3 * 16 * 256  # statistics, then the rings of f and g
    assert plan["workspace_bytes"] == 4 * 3 * 64 * 125  # the blocks' partial statistics (a multiple of 256)
    assert emulated.make_plan(torch.float32, 10**6, 64, sms=132, blocks=3)["grid"] == 132 * 3  # persistent
    assert emulated.make_plan(torch.float32, 1000, 64, aligned=False)["vec"] == 1
    wide = emulated.make_plan(torch.float32, 4, 8192, sms=132, blocks=2)
    assert (wide["resident"], wide["splits"], wide["split_cols"], wide["tiles"]) == (0, 4, 2048, 8)
    assert wide["grid"] == 4  # row groups: min(one wave = 132 * 2 / 8 tiles, B)
    block = emulated.make_plan(torch.bfloat16, 8, 1000)
    assert (block["team"], block["threads"], block["vec"]) == (128, 128, 8)  # a block per row
    with pytest.raises(ValueError, match="262144"):
        emulated.make_plan(torch.float32, 1, 262145)


@pytest.mark.parametrize("m", [256, 1000], ids=["warp", "block"])
def test_probability_rows_at_the_tolerance_edge(emulated, m):
    """Rows of teacher probabilities whose exact sum straddles 1 + PROB_SUM_TOL: the kernels' float32 tree sum
    judges some of them otherwise than float64 (and than the host's sum) does; the status read raises exactly
    when the kernel flagged a row, naming the first one, on all rows and on the disagreeing rows alone."""
    rows = 96
    p, exact = edge_prob_rows(rows, m, spread=5e-7, seed=m)
    gen = torch.Generator().manual_seed(m)
    f, y = torch.randn(rows, m, generator=gen), torch.randint(0, m, (rows,), generator=gen)
    a = torch.full((rows,), 0.5)
    a[::3] = 0.0  # rows whose teacher term is unused are checked too
    tol = PROB_SUM_TOL[torch.float32]
    loss = emulated.fused_forward(f, p, y, a, None, None, probs=True, need_grad=False)[0]
    flagged = torch.isnan(loss)
    assert (flagged != ((exact - 1).abs() > tol)).any() and flagged.any() and not flagged.all()
    host = ~((p.sum(-1) - 1).abs() <= tol)
    for keep in (torch.arange(rows), (flagged != host).nonzero().squeeze(1)):
        inputs, sub = (loss[keep], f[keep], p[keep], True, y[keep], a[keep], -100), flagged[keep]
        if sub.any():
            with pytest.raises(ValueError, match=rf"teacher_probs rows must sum to 1 \(row {int(sub.nonzero()[0])} "):
                checks.enforce("sync", *inputs)
        else:
            checks.enforce("sync", *inputs)
