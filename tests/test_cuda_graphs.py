"""A student step with the robust loss, captured in a CUDA graph and replayed, against the same steps run
eagerly (issue 14). Needs a CUDA GPU; skipped elsewhere.

The step (student forward, ``RobustDistillationLoss("robust")`` with ``validate=False``, backward, SGD with
momentum) is captured once after warm-up steps on a side stream, as ``torch.cuda.graphs`` asks; between
replays new batches are copied into the graph's static inputs and, every K steps, the DRO weights move
(``update_weights`` from a validation pass, eagerly, in place). The replayed run must end with the eager
run's weights and DRO state: a replay re-runs only the graph's kernels, so anything the loss kept on the
host side between calls (``log c`` of the costs, see ``ops.call.capturing``) would freeze the costs of
capture time and make the runs part after the first update.

Written and checked for syntax on a CPU machine; not yet run on a GPU when it landed.
"""

from __future__ import annotations

import pytest
import torch

from rkd_engine import RobustDistillationLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

M, D, B, STEPS, K, WARMUP = 10, 32, 64, 12, 4, 3


def _run(backend: str, captured: bool) -> tuple[dict, dict]:
    """STEPS training steps after WARMUP ones, with a DRO update every K; the final parameters and DRO state."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, M).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = RobustDistillationLoss(M, "robust", temperature=2.0, step_size=1.0, backend=backend).cuda()
    loss_fn.set_prior(torch.linspace(1.0, 3.0, M, device="cuda"))
    batches = [(torch.randn(B, D, generator=gen), torch.randn(B, M, generator=gen) * 3) for _ in range(WARMUP + STEPS)]
    x_val = torch.randn(4 * B, D, generator=gen).cuda()
    y_val = torch.randint(0, M, (4 * B,), generator=gen).cuda()
    x = torch.empty(B, D, device="cuda")
    g = torch.empty(B, M, device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), teacher_logits=g).loss.backward()
        opt.step()

    def dro_update() -> None:
        with torch.no_grad():
            stats = loss_fn(model(x_val), labels=y_val)
        loss_fn.update_weights(stats.error, stats.mass)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for xb, gb in batches[:WARMUP]:
            x.copy_(xb)
            g.copy_(gb)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = None
    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    for k, (xb, gb) in enumerate(batches[WARMUP:]):
        x.copy_(xb)
        g.copy_(gb)
        if graph is not None:
            graph.replay()
        else:
            step()
        if (k + 1) % K == 0:
            dro_update()
    torch.cuda.synchronize()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    dro = {name: t.detach().clone() for name, t in loss_fn.dro.state_dict().items() if isinstance(t, torch.Tensor)}
    return params, dro


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_captured_steps_match_eager_steps_with_dro_updates(backend):
    from rkd_engine.ops.dispatch import explain_backends

    reason = explain_backends("cuda", torch.float32, M).get(backend)
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    eager_params, eager_dro = _run(backend, captured=False)
    graph_params, graph_dro = _run(backend, captured=True)
    assert int(eager_dro["num_updates"]) == STEPS // K
    assert not torch.allclose(eager_dro["weights"], torch.full_like(eager_dro["weights"], 1.0 / M))  # lambda moved
    for name, want in eager_params.items():
        torch.testing.assert_close(graph_params[name], want, rtol=1e-5, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    for name, want in eager_dro.items():
        torch.testing.assert_close(graph_dro[name], want, rtol=1e-5, atol=1e-6, msg=lambda s, n=name: f"dro {n}: {s}")
