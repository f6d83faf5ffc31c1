"""Reproduce the paper's study on embedded data: long-tailed digits at two imbalance ratios.

Runs ``rkd sweep`` with ``benchmarks/recipes/digits_lt.yaml`` (5 x 5 grid of ``alpha_t`` x ``alpha_s``,
``gamma`` in {1, 3}, every baseline of docs/baselines.md, 5 seeds) at ``rho = 100`` and ``rho = 10``,
then ``rkd report`` on each, and copies what is worth keeping (``runs.csv``, ``report.md``, the
tables and the plots; not the run directories) to ``benchmarks/results/reproduce/digits_rho<rho>/``.

    python benchmarks/reproduce.py                       # both ratios, 5 seeds (minutes on 2 cores)
    python benchmarks/reproduce.py --imbalance 100 --seeds 3 --work /tmp/rkd-sweeps
    python benchmarks/reproduce.py --alpha 0,0.5,1 --gamma 1   # a 3 x 3 subset (165 runs per ratio)

The sweeps live in ``--work`` (default ``sweeps/``), so running the command again after an
interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT

from rkd_engine.training.report import write_report
from rkd_engine.training.sweep import load_spec, run_sweep

RECIPE = ROOT / "benchmarks" / "recipes" / "digits_lt.yaml"
KEEP = (
    "runs.csv",
    "sweep.json",
    "report.md",
    "table1.csv",
    "table2.csv",
    "pareto.png",
    "per_class_recall.png",
    "calibration.png",
    "lambda.png",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imbalance", default="100,10", help="comma-separated imbalance ratios (default: 100,10)")
    parser.add_argument("--seeds", default=None, help="number of seeds (default: the recipe's, 5)")
    parser.add_argument("--workers", default=None, help="parallel runs (default: the CPU count)")
    parser.add_argument("--alpha", default=None, help="alpha_t and alpha_s values (default: the recipe's 5)")
    parser.add_argument("--gamma", default=None, help="teacher temperatures (default: the recipe's 1,3)")
    parser.add_argument("--work", type=Path, default=ROOT / "sweeps", help="where the sweeps run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reproduce")
    args = parser.parse_args(argv)
    for rho in [r.strip() for r in args.imbalance.split(",") if r.strip()]:
        tag = f"digits_rho{float(rho):g}"
        flags = {"imbalance": rho, "seeds": args.seeds, "workers": args.workers}
        spec = load_spec(RECIPE, {**flags, "alpha_t": args.alpha, "alpha_s": args.alpha, "gamma": args.gamma})
        sweep_dir = args.work / tag
        started = time.perf_counter()
        run_sweep(spec, sweep_dir)
        print(f"{tag}: sweep took {time.perf_counter() - started:.0f} s", file=sys.stderr)
        write_report(sweep_dir, quiet=True)
        dest = args.out / tag
        dest.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (sweep_dir / name).exists():
                shutil.copy2(sweep_dir / name, dest / name)
        print(f"{tag}: wrote {dest}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
