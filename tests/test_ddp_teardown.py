"""Tearing down a two-process gloo group cannot deadlock (``rkd_engine.training.distributed._RETIRED_GROUPS``).

Gloo joins its worker threads in the process group's destructor while a worker may need the GIL, so the
destructor must run with the GIL released. rkd makes the group's Python wrapper drop the last reference;
the first test checks that this destructor does release the GIL (another Python thread runs while it
waits for a busy worker), the second runs whole teardowns in a loop: ``RKD_TEARDOWN_RUNS=100`` for the
long check (default 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import rkd_env

_PRELUDE = """
import gc, os, sys, threading, time
import torch, torch.distributed as dist
from torch import nn
from rkd_engine.training import distributed
rank, store = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)

def runloop_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return names.count("pt_gloo_runloop")
"""

# Rank 0 drops its last reference to a group whose worker is busy in an all_reduce that rank 1 joins only
# after 2 s; a second Python thread counts how often it runs meanwhile.
_GIL_SCRIPT = """
runs, stop = [0], [False]
def spin():
    while not stop[0]:
        runs[0] += 1
        time.sleep(0.001)
threading.Thread(target=spin, daemon=True).start()
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
t = torch.ones(1000)
if rank == 0:
    work = dist.all_reduce(t, async_op=True)
    group = dist.group.WORLD
    dist.destroy_process_group()
    del work
    gc.collect()
    before, start = runs[0], time.time()
    del group  # the last reference: the destructor joins the worker, which waits for rank 1
    print(f"RESULT joined_s={time.time() - start:.2f} other_thread_runs={runs[0] - before}", flush=True)
else:
    time.sleep(2.0)
    dist.all_reduce(t)
    dist.destroy_process_group()
stop[0] = True
"""

# Each iteration ends like an rkd run: DDP steps, statistics all-reduced, RNG states gathered, close(); then
# the run and its model are freed and the retired group released (what exit does after a CLI run).
_LOOP_SCRIPT = """
runs = int(sys.argv[3])

class Run:
    def go(self, it):
        dist.init_process_group("gloo", init_method=f"file://{store}.{it}", rank=rank, world_size=2)
        ctx = distributed.DistContext(rank, 2, torch.device("cpu"), owns_group=True)
        try:
            self.model = ctx.wrap(nn.Linear(6, 4))
            opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
            for _ in range(2):
                loss = self.model(torch.randn(8, 6)).logsumexp(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                ctx.all_reduce_(torch.ones(4), torch.zeros(4))
            ctx.barrier()
            ctx.all_gather_object(torch.get_rng_state())
            ctx.broadcast_object({"step": it})
            ctx.barrier()
        finally:
            ctx.close()

for it in range(runs):
    Run().go(it)
    gc.collect()
    distributed._release_retired_groups()
    print(f"teardown {it} threads_left={runloop_threads()}", flush=True)
"""


def _two_ranks(tmp_path: Path, body: str, *args: str, timeout: float) -> list[str]:
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(_PRELUDE) + textwrap.dedent(body))
    env = rkd_env()
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), store, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the two ranks did not finish within {timeout} s (a teardown hang)")
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
    return outputs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_group_destructor_releases_the_gil_while_it_joins(tmp_path):
    out = _two_ranks(tmp_path, _GIL_SCRIPT, timeout=300)[0]
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    fields = dict(item.split("=") for item in line.split()[1:])
    # The worker was busy until rank 1 joined (about 2 s later): the join waited for it, and another Python
    # thread ran all along, so the destructor did not hold the GIL.
    assert float(fields["joined_s"]) > 0.5, line
    assert int(fields["other_thread_runs"]) >= 10, line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_teardowns_in_a_loop_finish_and_join_their_threads(tmp_path):
    runs = int(os.environ.get("RKD_TEARDOWN_RUNS", "3"))
    outputs = _two_ranks(tmp_path, _LOOP_SCRIPT, str(runs), timeout=120 + 30 * runs)
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("teardown")]
        assert len(lines) == runs, out[-3000:]
        assert all(line.endswith("threads_left=0") for line in lines), out[-3000:]
