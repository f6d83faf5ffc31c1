"""The ``rkd`` command line: ``rkd teacher``, ``rkd student``, ``rkd eval``, ``rkd demo``, ``rkd sweep``, ``rkd report``.

Options come from the defaults, then ``--config FILE`` (YAML or JSON), then the flags (later wins).
A user error (``rkd_engine.errors.UserError``: a bad value or combination, bad data, a bad file) ends
with a one-line error and exit status 2; an unusable run or checkpoint, or a diverged training, with
exit status 1; a file system error (a full disk, a read-only or missing directory) with one line
naming the path and exit status 1. Any other exception is a bug in rkd: its traceback is shown with
a hint where to report it (exit status 3). ``RKD_DEBUG=1`` shows the full traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from rkd_engine.errors import UserError
from rkd_engine.training.config import (
    CONFIG_CLASSES,
    ConfigError,
    TrainConfig,
    flag,
    load_config_file,
    merge,
    option_fields,
)

_GROUPS = {
    "data": ("data", "imbalance", "val_per_class", "test_per_class", "data_seed", "augment"),
    "model and optimisation": (
        "model",
        "model_options",
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "warmup_epochs",
        "lr_decay_at",
        "lr_decay",
        "seed",
    ),
    "objective (docs/objectives.md, docs/dro.md)": ("objective", "alpha", "dro_step", "dro_every", "val_batch"),
    "distillation": ("teacher", "method", "gamma", "tau", "teacher_weight", "val_labels", "val_gamma", "margin_scale"),
    "run": ("out", "checkpoint_every", "eval_every", "device", "backend"),
    "offline teacher (rkd cache-teacher)": ("teacher_cache", "topk_tail", "cache_augmented"),
    "teacher trained elsewhere": ("teacher_checkpoint", "teacher_model", "teacher_model_options"),
}

_MAIN_DESCRIPTION = """\
rkd trains teachers and students with the objectives of "Robust distillation for worst-class
performance" (Wang et al., UAI 2023): standard, balanced (mean of per-class risks), robust (worst
per-class risk, by DRO over classes) and a trade-off between the last two.

A typical session: train a teacher, distil a student from it, look at its worst-class accuracy.
Every run writes a directory (config.json, log.jsonl, checkpoint.pt, model.pt, metrics.json).
"""

_MAIN_EPILOG = """\
examples:
  rkd demo --out demo_out                         the paper's teacher x student grid on long-tailed digits
  rkd teacher --objective balanced --out runs/teacher-bal
  rkd student --teacher runs/teacher-bal --objective robust --out runs/student-rob
  rkd eval runs/student-rob
  rkd sweep --out sweeps/digits --seeds 5         teachers x students over alpha_t, alpha_s, gamma, with baselines
  rkd report sweeps/digits                        the paper's tables and plots from a sweep

run `rkd COMMAND --help` for the options of a command. Errors are one line (exit status 2 for bad options or
data, 1 for an unusable run or checkpoint, a diverged training or a file system error); an internal error
shows its traceback (exit status 3); RKD_DEBUG=1 shows the full traceback of every error.
"""

_EPILOGS = {
    "teacher": """\
examples:
  rkd teacher --out runs/t-std                                   standard teacher on long-tailed digits
  rkd teacher --objective robust --dro-every 8 --out runs/t-rob  DRO weights from validation error every 8 steps
  rkd teacher --objective tradeoff --alpha 0.5 --out runs/t-tdf
  rkd teacher --data cifar10:~/data/cifar-10-batches-py --imbalance 100 --model resnet56 --epochs 200 \\
              --batch-size 128 --lr-decay-at 0.5,0.75 --device cuda --out runs/c10-t
  rkd teacher --config teacher.yaml --seed 3                     a YAML/JSON file of options; flags win
  rkd teacher --out runs/t-rob --resume                          continue a killed run exactly where it stopped
""",
    "student": """\
examples:
  rkd student --teacher runs/t-std --out runs/s-std                       standard distillation (a = 1)
  rkd student --teacher runs/t-bal --objective robust --gamma 3 --out runs/s-rob
  rkd student --teacher runs/t-bal --objective robust --val-labels onehot --out runs/s-rob-1h
  rkd student --teacher runs/t-std --method hinton --teacher-weight 0.5 --tau 4 --out runs/s-hinton
  rkd student --teacher runs/t-std --method post-shift --out runs/s-post     the teacher, post-shifted
  rkd student --method group-dro --out runs/s-gdro                        Group DRO without a teacher
  rkd student --teacher-checkpoint teacher.pt2 --data digits --out runs/s-ext   a torch.export/TorchScript teacher
  torchrun --nproc_per_node=2 -m rkd_engine.cli student --teacher runs/t-std --out runs/s-ddp

methods: distill (the paper's student, q = p), hinton (q = (1-a) e_y + a p, student temperature tau),
post-shift (f_y = log(shift_y p_y), shift tuned for worst-class validation accuracy), group-dro (no
teacher, online DRO weights from the batch losses), ada-alpha (a per example from the teacher margin),
ada-margin (a per-example margin from the teacher margin); see docs/baselines.md.
A student uses its teacher's data split; the data options default to the teacher's.
""",
}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


_METAVARS = {"data": "SPEC", "out": "DIR", "teacher": "RUN_DIR", "model": "NAME", "lr_decay_at": "F1,F2"}
_METAVARS.update(teacher_cache="CACHE", teacher_checkpoint="FILE", teacher_model="NAME")


def _metavar(name: str, kind: str) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    return "N" if kind.endswith("int") else "X"


def _add_train_options(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    fields = {f.name: f for f in option_fields(cls)}
    defaults = cls()
    for title, names in _GROUPS.items():
        present = [n for n in names if n in fields]
        if not present:
            continue
        group = parser.add_argument_group(title)
        for name in present:
            meta = fields[name].metadata
            default = getattr(defaults, name)
            shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
            help_text = meta["help"] + ("" if shown in (None, {}) else f" (default: {shown})")
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta.get("choices") else _metavar(name, meta["kind"])
            if meta["kind"] == "bool":
                group.add_argument(
                    flag(name),
                    dest=name,
                    action="store_const",
                    const=True,
                    default=argparse.SUPPRESS,
                    help=meta["help"],
                )
            elif meta["kind"] == "options":
                group.add_argument(
                    flag(name)[:-1],  # --model-option, --teacher-model-option
                    dest=name,
                    action="append",
                    metavar="KEY=VALUE",
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                group.add_argument(flag(name), dest=name, metavar=metavar, default=argparse.SUPPRESS, help=help_text)
    control = parser.add_argument_group("control")
    control.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
    control.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    control.add_argument("--overwrite", action="store_true", help="start again in an existing --out directory")
    control.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    """The ``rkd`` argument parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="rkd", description=_MAIN_DESCRIPTION, epilog=_MAIN_EPILOG, formatter_class=fmt)
    from rkd_engine import __version__

    parser.add_argument("--version", action="version", version=f"rkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_train_commands, _add_cache_teacher, _add_eval, _add_demo, _add_sweep, _add_report):
        add(sub, fmt)
    return parser


# The training commands (their options: CONFIG_CLASSES[name]): name, one-line help and description.
_TRAIN_COMMANDS = (
    (
        "teacher",
        "train a teacher on labels",
        "Train a teacher with a standard, balanced, robust or trade-off objective.",
    ),
    (
        "student",
        "distil a student from a teacher run",
        "Distil a student from a teacher run (or run a baseline method).",
    ),
)


def _add_train_commands(sub: Any, fmt: type) -> None:
    """``rkd teacher`` and ``rkd student``: every training option, grouped, and the control flags."""
    for name, help_text, description in _TRAIN_COMMANDS:
        parser = sub.add_parser(
            name, help=help_text, formatter_class=fmt, description=description, epilog=_EPILOGS[name]
        )
        _add_train_options(parser, CONFIG_CLASSES[name])


def _add_eval(sub: Any, fmt: type) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a finished run",
        formatter_class=fmt,
        description="Evaluate a run's model: accuracy, balanced, worst-class and worst-k accuracy, "
        "per-class recall, ECE. Prints the report and writes RUN_DIR/eval.json.",
        epilog="examples:\n  rkd eval runs/s-rob\n  rkd eval runs/s-rob --data digits --split test\n",
    )
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by rkd teacher or rkd student")
    ev.add_argument("--data", metavar="SPEC", help="evaluate on this data source instead of the run's own")
    ev.add_argument(
        "--split", default="val,test", metavar="SPLITS", help="comma-separated: train, val, test (default: val,test)"
    )
    ev.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="device (default: cpu)")


def _add_demo(sub: Any, fmt: type) -> None:
    demo = sub.add_parser(
        "demo",
        help="the paper's teacher x student grid on long-tailed digits",
        formatter_class=fmt,
        description="Train standard, balanced and robust teachers on long-tailed digits, distil "
        "standard, balanced and robust students from each (the paper's Table 1 grid), print the "
        "average and worst-class test accuracy, write DIR/results.json and DIR/pareto.png.",
        epilog="examples:\n  rkd demo --out demo_out\n  rkd demo --out demo_out --seeds 5\n",
    )
    demo.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: demo_out)")
    demo.add_argument("--seeds", default=None, metavar="N", help="number of seeds averaged over (default: 5)")
    demo.add_argument(
        "--imbalance", default=None, metavar="RHO", help="imbalance ratio rho of the training set (default: 100)"
    )
    demo.add_argument("--epochs", default=None, metavar="N", help="epochs of every teacher and student (default: 30)")
    demo.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="device (default: cpu)")
    demo.add_argument("--backend", default="auto", metavar="NAME", help="loss backend (default: auto)")
    demo.add_argument("--quiet", action="store_true", help="print only the table")


# ``rkd sweep``'s plain options (flag, metavar, help), in the order of its help, before and after the
# repeatable --set options.
_SWEEP_GRID_OPTIONS = (
    ("--config", "FILE", "YAML or JSON file of sweep options (keys as the flags)"),
    ("--data", "SPEC", "data source (default: digits)"),
    ("--imbalance", "RHO", "imbalance ratio of the training set (default: 100)"),
    ("--seeds", "N|S,S,..", "number of seeds, or a list of seeds (default: 3)"),
    ("--alpha-t", "A,A,..", "teacher trade-offs (default: 0,0.25,0.5,0.75,1)"),
    ("--alpha-s", "A,A,..", "student trade-offs (default: 0,0.25,0.5,0.75,1)"),
    ("--gamma", "G,G,..", "teacher temperatures (default: 1)"),
    (
        "--val-gamma",
        "G,G,..",
        "validation temperatures of the DRO students (default: gamma; 'default' drops a config file's list)",
    ),
    (
        "--dro-step",
        "E,E,..",
        "DRO step sizes of the DRO students (default: the DRO schedule's; 'default' drops a file's list)",
    ),
    ("--baselines", "LIST", None),  # help: the baselines known, filled in by _add_sweep
    ("--epochs", "N", "epochs of every run (shortcut for --set epochs=N)"),
    ("--model", "NAME", "model of every run (shortcut for --set model=NAME)"),
)
_SWEEP_RUN_OPTIONS = (
    ("--workers", "N", "parallel runs (default: the CPU count; 1 on cuda)"),
    ("--device", "{cpu,cuda}", "device of every run (default: cpu)"),
    ("--backend", "NAME", "loss backend (default: auto)"),
)
_SWEEP_RAY_OPTIONS = (
    ("--address", "ADDR", "Ray cluster to use (default: RAY_ADDRESS, else a local one)"),
    ("--cpus-per-run", "N", "Ray: CPUs each run asks for (default: 1)"),
    ("--gpus-per-run", "N", "Ray: GPUs each run asks for (default: 1 on cuda, else 0)"),
)


def _add_sweep(sub: Any, fmt: type) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="the paper's grid over alpha_t, alpha_s, gamma and seeds, with the baselines",
        formatter_class=fmt,
        description="Train standard and trade-off teachers (one per alpha_t; alpha 0 = balanced, 1 = robust), "
        "distil a standard and a trade-off student (one per alpha_s) from each at each gamma, and run the "
        "baselines (post-shift, Group DRO, AdaAlpha, AdaMargin, Hinton) from the standard teacher, for every "
        "seed, in parallel worker processes. Finished runs are skipped: the same command continues a killed "
        "sweep. Writes DIR/runs.csv (one row per run) and DIR/runs/<run>/; `rkd report DIR` makes the tables.",
        epilog=_SWEEP_EPILOG,
    )
    sweep.add_argument("--out", required=True, metavar="DIR", help="sweep directory")
    baselines = "all (default), none, or some of: " + ", ".join(_baselines())
    for name, metavar, help_text in _SWEEP_GRID_OPTIONS:
        sweep.add_argument(name, metavar=metavar, help=help_text or baselines)
    for name, what in (("set", "every run"), ("teacher-set", "the teachers"), ("student-set", "the students")):
        sweep.add_argument(
            f"--{name}",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"a training option (as in rkd teacher/student) for {what}, e.g. lr=0.05 (repeatable)",
        )
    for name, metavar, help_text in _SWEEP_RUN_OPTIONS:
        sweep.add_argument(name, metavar=metavar, help=help_text)
    sweep.add_argument(
        "--executor",
        default="local",
        metavar="{local,ray}",
        help="local: a process pool on this machine (default); ray: each run a Ray task (pip install 'rkd-engine[ray]')",
    )
    for name, metavar, help_text in _SWEEP_RAY_OPTIONS:
        sweep.add_argument(name, metavar=metavar, help=help_text)
    sweep.add_argument("--quiet", action="store_true", help="no progress lines")
    sweep.add_argument(
        "--cache-teachers",
        action="store_const",
        const=True,
        help="cache each teacher's outputs once it is trained (DIR/caches/); its students read the cache "
        "instead of loading and running the teacher (identical results; see rkd cache-teacher)",
    )


def _add_report(sub: Any, fmt: type) -> None:
    rep = sub.add_parser(
        "report",
        help="the paper's tables and plots from a sweep",
        formatter_class=fmt,
        description="Read SWEEP_DIR/runs.csv and write report.md (Table 1: teacher x student grid; Table 2: "
        "the trade-off selected by the paper's rule against the baselines; checks of the paper's findings), "
        "table1.csv, table2.csv, pareto.png, per_class_recall.png and calibration.png; print the markdown.",
        epilog="examples:\n  rkd report sweeps/digits\n  rkd report sweeps/digits --out reports/digits\n",
    )
    rep.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a directory written by rkd sweep")
    rep.add_argument("--out", metavar="DIR", help="where to write the report (default: SWEEP_DIR)")
    rep.add_argument("--quiet", action="store_true", help="do not print the report")


_SWEEP_EPILOG = """\
examples:
  rkd sweep --out sweeps/digits                               5 x 5 grid, 3 seeds, long-tailed digits (rho 100)
  rkd sweep --out sweeps/small --alpha-t 0,1 --alpha-s 0,1 --seeds 2 --baselines none
  rkd sweep --out sweeps/digits10 --imbalance 10 --gamma 1,3 --val-gamma 0.1,1 --seeds 5
  rkd sweep --config benchmarks/recipes/cifar10_lt.yaml --out sweeps/c10 --device cuda
  rkd sweep --out /shared/sweeps/digits --executor ray --address HEAD:6379 --cpus-per-run 2
  rkd report sweeps/digits

A config file holds the same keys (data, imbalance, seeds, alpha_t, alpha_s, gamma, val_gamma, dro_step, baselines, workers,
device, backend) plus `common`, `teacher` and `student`: mappings of training options for every run,
the teachers or the students (flags --set, --teacher-set, --student-set add to them).
"""


def _add_cache_teacher(sub: Any, fmt: type) -> None:
    cache = sub.add_parser(
        "cache-teacher",
        help="store a teacher's outputs once, for students that never run it",
        formatter_class=fmt,
        description="Run a finished teacher once over its training, validation and test sets (evaluation mode, "
        "no augmentation) and write its outputs to CACHE: .npy files and manifest.json (provenance, sizes, "
        "checksums), readable with numpy alone. The training set is stored dense (any --gamma), or as the top k "
        "scores per row with the log-normalisers at --temperatures. `rkd student --teacher-cache CACHE` then "
        "trains without the teacher. A killed run leaves CACHE.partial/; the same command continues it.",
        epilog="examples:\n"
        "  rkd cache-teacher runs/t-bal --out caches/t-bal                    dense scores (small m)\n"
        "  rkd cache-teacher runs/t-bal --out caches/t-bal-k5 --top-k 5 --temperatures 1,3,5\n"
        "  rkd student --teacher-cache caches/t-bal --objective robust --gamma 3 --out runs/s-rob\n",
    )
    cache.add_argument("run_dir", metavar="RUN_DIR", help="a finished run written by rkd teacher")
    cache.add_argument("--out", required=True, metavar="CACHE", help="cache directory to write")
    cache.add_argument("--top-k", metavar="K", help="store the top K classes per training row (default: dense)")
    cache.add_argument(
        "--temperatures",
        default="1,3,5",
        metavar="G,G,..",
        help="teacher temperatures of a top-k cache (default: 1,3,5)",
    )
    cache.add_argument(
        "--dtype", default="float32", metavar="{float32,float16}", help="stored scores (default: float32)"
    )
    cache.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="device (default: cpu)")
    cache.add_argument("--overwrite", action="store_true", help="replace a cache made with other options")
    cache.add_argument("--quiet", action="store_true", help="no progress")


def _cache_teacher(args: argparse.Namespace) -> int:
    from rkd_engine.training.teacher_cache import cache_teacher

    top_k = None if args.top_k is None else _positive_int("--top-k", args.top_k)
    temps = []
    for item in args.temperatures.split(","):
        try:
            temps.append(float(item))
        except ValueError:
            raise ConfigError(
                f"--temperatures must be comma-separated numbers > 0, got {args.temperatures!r}"
            ) from None
    cache = cache_teacher(
        args.run_dir,
        args.out,
        top_k=top_k,
        temperatures=temps,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    if not args.quiet:
        size = sum(entry["bytes"] for entry in cache.manifest["files"].values())
        print(f"wrote {cache.path} ({cache.layout}, k = {cache.k} of m = {cache.num_classes}, {size} bytes)")
    return 0


def _baselines() -> tuple[str, ...]:
    from rkd_engine.training.config import STUDENT_METHODS

    return tuple(m for m in STUDENT_METHODS if m != "distill")


def _key_values(flag_name: str, items: list[str]) -> dict[str, Any]:
    """``["lr=0.05", "model_options={hidden_sizes: [16]}"]`` -> options; values read as YAML (else kept as text)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--{flag_name} expects KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out[key.strip().replace("-", "_")] = parsed
    return out


def _sweep(args: argparse.Namespace) -> int:
    from rkd_engine.training.sweep import SweepFailed, load_spec, run_sweep

    common = _key_values("set", args.set)
    for name in ("epochs", "model"):
        if getattr(args, name) is not None:
            common[name] = getattr(args, name)
    flags = {
        "data": args.data,
        "imbalance": args.imbalance,
        "seeds": args.seeds,
        "alpha_t": args.alpha_t,
        "alpha_s": args.alpha_s,
        "gamma": args.gamma,
        "val_gamma": args.val_gamma,
        "dro_step": args.dro_step,
        "baselines": args.baselines,
        "workers": args.workers,
        "device": args.device,
        "backend": args.backend,
        "common": common or None,
        "teacher": _key_values("teacher-set", args.teacher_set) or None,
        "student": _key_values("student-set", args.student_set) or None,
    }
    flags["cache_teachers"] = args.cache_teachers
    spec = load_spec(args.config, flags)
    try:
        run_sweep(
            spec,
            args.out,
            quiet=args.quiet,
            executor=args.executor,
            address=args.address,
            cpus_per_run=args.cpus_per_run,
            gpus_per_run=args.gpus_per_run,
        )
    except SweepFailed as exc:
        sys.stderr.write(f"rkd sweep: {exc}\n")
        return 1
    if not args.quiet:
        print(f"wrote {args.out}/runs.csv; next: rkd report {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from rkd_engine.training.report import write_report

    write_report(args.sweep_dir, args.out, quiet=args.quiet)
    return 0


def _flag_values(args: argparse.Namespace, cls: type[TrainConfig]) -> dict[str, Any]:
    names = {f.name for f in option_fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _train(args: argparse.Namespace) -> int:
    from rkd_engine.training import engine
    from rkd_engine.training.runs import RunDir

    cls = CONFIG_CLASSES[args.command]
    file_values = load_config_file(args.config) if args.config else {}
    flags = _flag_values(args, cls)
    layers: list[dict[str, Any]] = []
    if args.resume:
        out = flags.get("out", file_values.get("out"))
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        stored = RunDir(out).read_config()
        kind = "student" if "method" in stored or "teacher" in stored else "teacher"
        if kind != args.command:
            raise ConfigError(f"{out} is a {kind} run: continue it with `rkd {kind} --out {out} --resume`")
        layers.append(stored)
    file_cfg = merge(cls, *layers, file_values, source=args.config or "")
    config = merge(cls, file_cfg.to_dict(), flags)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    run = engine.train_teacher if args.command == "teacher" else engine.train_student
    result = run(config, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    if result.metrics and not args.quiet:
        print(f"wrote {result.path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rkd_engine.training.evaluation import evaluate_run, summary_line, write_eval

    splits = tuple(s.strip() for s in args.split.split(",") if s.strip())
    if not splits or any(s not in ("train", "val", "test") for s in splits):
        raise ConfigError(f"--split must list train, val and/or test, got {args.split!r}")
    if args.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is available here (use --device cpu)")
    result = evaluate_run(args.run_dir, data=args.data, splits=splits, device=args.device, write=False)
    print(f"{result['run']} on {result['data']}")
    for name in splits:
        rep = result[name]
        print(f"  {name:5s} {summary_line(rep)}  ece {rep['ece']:.3f}  ({rep['num_examples']} examples)")
        recalls = " ".join("  -  " if r is None else f"{100 * r:5.1f}" for r in rep["per_class_recall"])
        print(f"        per-class recall: {recalls}", flush=True)
    # Written after printing: a read-only run directory still shows the metrics before the error.
    write_eval(args.run_dir, result, data=args.data)
    return 0


def _positive_int(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        out = int(value)
    except ValueError:
        out = 0
    if out < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return out


def _demo(args: argparse.Namespace) -> int:
    from rkd_engine.training.demo import run_demo

    imbalance = None
    if args.imbalance is not None:
        try:
            imbalance = float(args.imbalance)
        except ValueError:
            imbalance = 0.0
        if not imbalance >= 1:
            raise ConfigError(f"--imbalance must be a number >= 1, got {args.imbalance!r}")
    if args.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
    run_demo(
        args.out,
        seeds=_positive_int("--seeds", args.seeds),
        imbalance=imbalance,
        epochs=_positive_int("--epochs", args.epochs),
        device=args.device,
        backend=args.backend,
        quiet=args.quiet,
    )
    return 0


# File system errors that come from the user's environment, not from a bug: reported in one line.
_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOENT,
        errno.ENAMETOOLONG,
        errno.EIO,
    }
)

BUG_HINT = (
    "this is an internal error of rkd, not a problem with your input: please report it to the rkd maintainers "
    "(the project's issue tracker) with the command line, `rkd --version` and the traceback above"
)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _os_error_line(exc: OSError) -> str:
    """``PATH: reason`` for a file system error, with what to do about a full disk or a read-only place."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or _one_line(exc)
    line = f"{where}: {reason}" if where else reason
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        line += " (the disk is full: free some space or choose another --out; a run continues with --resume)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        line += " (rkd cannot write there: choose a writable --out)"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rkd`` console script; returns the exit status.

    A ``UserError`` or a file system error is one line on stderr; any other exception shows its
    traceback and ``BUG_HINT`` (exit status 3).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"teacher": _train, "student": _train, "eval": _eval, "demo": _demo, "sweep": _sweep, "report": _report}
    handlers["cache-teacher"] = _cache_teacher
    debug = bool(os.environ.get("RKD_DEBUG"))
    try:
        return handlers[args.command](args)
    except UserError as exc:
        if debug:
            raise
        sys.stderr.write(f"rkd {args.command}: error: {_one_line(exc)}\n")
        return exc.exit_status
    except OSError as exc:
        if debug or exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        sys.stderr.write(f"rkd {args.command}: error: {_os_error_line(exc)}\n")
        return 1
    except KeyboardInterrupt:
        hint = "the same command continues the sweep" if args.command == "sweep" else "a run continues with --resume"
        sys.stderr.write(f"rkd {args.command}: interrupted ({hint})\n")
        return 130
    except Exception:
        if debug:
            raise
        traceback.print_exc()
        sys.stderr.write(f"rkd {args.command}: {BUG_HINT}\n")
        return 3


if __name__ == "__main__":
    sys.exit(main())
