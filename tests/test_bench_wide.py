"""Smoke test of the wide-heads benchmark (benchmarks/bench_wide.py) at tiny shapes, CPU parts only."""

from __future__ import annotations

import csv

from conftest import load_benchmark


def test_bench_wide_runs_and_agrees_with_eager(tmp_path):
    bench = load_benchmark("bench_wide")
    rc = bench.main(
        [
            "--device", "cpu", "--layer", "64x16x300", "--loss", "32x200", "--teachers", "head,topk16,dense-logits",
            "--methods", "eager,rkd-dense,rkd-fused,rkd", "--rounds", "1", "--out", str(tmp_path), "--tag", "t",
        ]
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_wide_cpu_t.csv")))
    got = {(r["kind"], r["teacher"], r["method"]) for r in rows}
    assert ("layer", "head", "rkd-fused") in got and ("layer", "topk16", "rkd-dense") in got
    assert ("loss", "topk16", "rkd") in got and ("loss", "dense-logits", "eager") in got
    for r in rows:
        assert float(r["max_grad_err_vs_eager"]) < 1e-4, r  # every method computes the eager gradients
        assert float(r["median_ms"]) > 0
        assert r["peak_MB"] != ""  # measured in the child process
    head_rows = {r["method"]: r for r in rows if r["teacher"] == "head"}
    assert int(head_rows["rkd-fused"]["teacher_bytes_per_row"]) == 16 * 4
    assert int(next(r for r in rows if r["teacher"] == "topk16")["teacher_bytes_per_row"]) == 16 * 8
