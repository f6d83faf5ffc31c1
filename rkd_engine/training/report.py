"""``rkd report SWEEP_DIR``: the paper's tables and plots from a sweep's ``runs.csv``.

- Table 1 form: teacher objective (rows) x student objective (columns), test average and worst-class
  accuracy, mean and standard error over seeds, one table per teacher temperature ``gamma``.
- Table 2 form: the trade-off selected by the paper's rule (highest mean validation worst-class
  accuracy among the trade-off students whose mean validation average accuracy is no lower than
  standard distillation's minus its standard error) against the baselines, each baseline with a
  teacher temperature at its best validation worst-class accuracy (standard distillation: at its best
  validation average accuracy).
- Plots: ``pareto.png`` (average against worst-class accuracy of every grid point, labelled
  ``(alpha_t, alpha_s)``, with the frontier), ``per_class_recall.png`` (standard distillation against
  the selected robust student), ``calibration.png`` (teacher per-class calibration error against the
  student's worst-class accuracy).
- ``report.md``, ``table1.csv``, ``table2.csv`` next to them, and a few checks of the paper's findings
  (docs/paper-results.md) computed from the numbers.

The standard error is the sample standard deviation over seeds (``ddof = 1``) over ``sqrt(n)``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkd_engine.errors import UserError
from rkd_engine.training.runs import atomic_write

METRICS = ("average", "balanced", "worst", "worst_k")
BASELINE_NAMES = {
    "post-shift": "post-shift (NM'21 Alg. 3)",
    "group-dro": "Group DRO, no distillation",
    "ada-alpha": "AdaAlpha",
    "ada-margin": "AdaMargin",
    "hinton": "Hinton distillation",
}


class ReportError(UserError, ValueError):
    """A sweep directory that cannot be reported (no runs.csv, no finished runs, ...)."""


@dataclass
class Cell:
    """One configuration aggregated over seeds."""

    key: tuple
    rows: list[dict[str, Any]] = field(default_factory=list)
    variant: tuple = (None, None)  # (val_gamma, dro_step) of a DRO student; None: the run's default

    @property
    def n(self) -> int:
        return len(self.rows)

    def values(self, column: str) -> list[float]:
        return [float(r[column]) for r in self.rows if r.get(column) not in ("", None)]

    def mean(self, column: str) -> float:
        v = self.values(column)
        return sum(v) / len(v) if v else math.nan

    def se(self, column: str) -> float:
        v = self.values(column)
        return statistics.stdev(v) / math.sqrt(len(v)) if len(v) >= 2 else math.nan

    def recall(self) -> list[float | None]:
        """Per-class test recall averaged over seeds (``None`` for a class absent from every test set)."""
        lists = [json.loads(r["test_recall"]) for r in self.rows if r.get("test_recall")]
        out: list[float | None] = []
        for values in zip(*lists, strict=True):
            present = [v for v in values if v is not None]
            out.append(sum(present) / len(present) if present else None)
        return out


def _float(x: Any) -> float | None:
    return None if x in ("", None) else float(x)


def read_runs(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    root = Path(sweep_dir)
    path = root / "runs.csv"
    if not path.exists():
        raise ReportError(f"{root} is not a sweep directory (no runs.csv); run `rkd sweep --out {root}` first")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"{path} is not a readable CSV file ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise ReportError(f"{path} holds no finished runs yet")
    spec_path = root / "sweep.json"
    try:
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{spec_path} is not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise ReportError(f"{spec_path} must hold a JSON object, got {type(spec).__name__}")
    needed = ["seed", "alpha_t", "alpha_s", "gamma"] + [f"{s}_{m}" for s in ("val", "test") for m in METRICS]
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ReportError(f"{path} lacks the column(s) {', '.join(missing)}; it was not written by rkd sweep")
    for line, r in enumerate(rows, start=2):
        try:
            r["seed"] = int(r["seed"])
            for c in ("alpha_t", "alpha_s", "gamma"):
                r[c] = _float(r[c])
            for c in ("val_gamma", "dro_step"):  # grid dimensions that older sweeps do not have
                r[c] = _float(r.get(c))
            for split in ("val", "test"):
                for m in METRICS:
                    r[f"{split}_{m}"] = float(r[f"{split}_{m}"])
        except (TypeError, ValueError) as exc:
            raise ReportError(f"{path} line {line}: a bad value ({exc})") from None
    return rows, spec


def group_variants(rows: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """One cell per configuration: ``(kind, teacher, student, gamma)`` and its ``(val_gamma, dro_step)``."""
    cells: dict[tuple, Cell] = {}
    for r in rows:
        key = (r["kind"], r["teacher"], r["student"] if r["kind"] != "teacher" else "", r["gamma"])
        variant = (r.get("val_gamma"), r.get("dro_step"))
        cells.setdefault((key, variant), Cell(key, variant=variant)).rows.append(dict(r))
    return list(cells.values())


def group(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, Cell]:
    """Cells keyed by ``(kind, teacher, student, gamma)``; teachers by ``("teacher", name, "", None)``.

    Where the sweep's grid has several ``val_gamma`` or ``dro_step`` for a key, the cell is the one with
    the highest mean validation worst-class accuracy (chosen on validation, as the paper tunes them)."""
    cells: dict[tuple, Cell] = {}
    for c in group_variants(rows):
        best = cells.get(c.key)
        if best is None or c.mean("val_worst") > best.mean("val_worst"):
            cells[c.key] = c
    return cells


def _variant_label(cell: Cell) -> str:
    """``, val γ=0.1, η=0.3`` for a cell of a sweep with those grid dimensions ('' otherwise)."""
    val_gamma, dro_step = cell.variant
    return (f", val γ={val_gamma:g}" if val_gamma is not None else "") + (
        f", η={dro_step:g}" if dro_step is not None else ""
    )


def fmt(cell: Cell | None, column: str) -> str:
    if cell is None or not cell.values(column):
        return "-"
    mean, se = 100 * cell.mean(column), 100 * cell.se(column)
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} ± {se:.1f}"


def _name(tag: str) -> str:
    """``standard`` / ``a0.5`` -> a readable objective name."""
    if tag == "standard":
        return "standard"
    alpha = float(tag[1:])
    return {0.0: "balanced (α=0)", 1.0: "robust (α=1)"}.get(alpha, f"trade-off α={alpha:g}")


def _order(tags: Iterable[str]) -> list[str]:
    return sorted(set(tags), key=lambda t: (t != "standard", float(t[1:]) if t != "standard" else 0.0))


# ------------------------------------------------------------------------------------------ tables
@dataclass
class Report:
    cells: dict[tuple, Cell]
    gammas: list[float]
    teachers: list[str]
    students: list[str]
    standard: Cell
    selected: Cell | None
    selection_note: str
    table2: list[tuple[str, Cell]]
    seeds: int
    spec: dict[str, Any]
    planned_runs: int | None = None  # runs of the whole sweep (from sweep.json), None if unknown
    planned_seeds: int | None = None
    eligible: list[Cell] = field(default_factory=list)
    finished_runs: int = 0  # rows of runs.csv

    @property
    def incomplete(self) -> bool:
        """Fewer runs finished than the sweep plans (cells may average over different numbers of seeds)."""
        return self.planned_runs is not None and self.finished_runs < self.planned_runs

    def seeds_note(self, cell: Cell | None) -> str:
        """`` (n=2)`` when ``cell`` has fewer seeds than the sweep, else nothing."""
        full = self.planned_seeds or self.seeds
        return f" (n={cell.n})" if cell is not None and cell.n < full else ""


def _best(cells: Sequence[Cell], column: str) -> Cell | None:
    return max(cells, key=lambda c: c.mean(column)) if cells else None


def analyse(rows: list[dict[str, Any]], spec: Mapping[str, Any] | None = None) -> Report:
    cells = group(rows)
    variants = group_variants(rows)
    students = [c for k, c in cells.items() if k[0] == "student"]
    if not students:
        raise ReportError("the sweep has no finished student runs yet")
    gammas = sorted({k[3] for k in cells if k[0] == "student"})
    teachers = _order(k[1] for k in cells if k[0] in ("teacher", "student"))
    student_tags = _order(k[2] for k in cells if k[0] == "student")
    std_cells = [c for c in students if c.key[1] == "standard" and c.key[2] == "standard"]
    if not std_cells:
        raise ReportError("standard distillation (standard teacher, standard student) has not finished in any seed")
    standard = _best(std_cells, "val_average")
    floor = standard.mean("val_average") - (
        0.0 if math.isnan(standard.se("val_average")) else standard.se("val_average")
    )
    # Every (alpha_t, alpha_s, gamma, val_gamma, dro_step) point is a candidate: the rule picks over all of them.
    candidates = [c for c in variants if c.key[0] == "student" and c.key[2] != "standard"]
    eligible = [c for c in candidates if c.mean("val_average") >= floor - 1e-12]
    if eligible:
        selected = _best(eligible, "val_worst")
        note = (
            f"highest mean validation worst-class accuracy among the {len(eligible)} of {len(candidates)} trade-off "
            f"students whose mean validation average accuracy is at least standard distillation's minus its "
            f"standard error ({100 * floor:.1f}%)"
        )
    else:
        selected = _best(candidates, "val_worst")
        note = (
            "NO trade-off student reached standard distillation's validation average accuracy within its standard "
            "error; shown: the highest validation worst-class accuracy without that constraint"
        )
    table2: list[tuple[str, Cell]] = []
    teacher_std = cells.get(("teacher", "standard", "", None))
    if teacher_std is not None:
        table2.append(("standard teacher alone", teacher_std))
    table2.append((f"standard distillation (γ={standard.key[3]:g})", standard))

    def at_best_gamma(teacher: str, student: str, kind: str = "student") -> Cell | None:
        return _best([c for c in cells.values() if c.key[:3] == (kind, teacher, student)], "val_worst")

    for tag, label in (
        ("a0", "balanced student (standard teacher)"),
        ("a1", "robust student (standard teacher, NM'21)"),
    ):
        c = at_best_gamma("standard", tag)
        if c is not None:
            table2.append((f"{label} (γ={c.key[3]:g}{_variant_label(c)})", c))
    for method, label in BASELINE_NAMES.items():
        c = at_best_gamma("" if method == "group-dro" else "standard", method, "baseline")
        if c is not None:
            gamma = "" if c.key[3] is None or method in ("group-dro", "post-shift") else f" (γ={c.key[3]:g})"
            table2.append((label + gamma, c))
    if selected is not None:
        t, s, g = selected.key[1:]
        label = f"selected trade-off: teacher {_name(t)}, student {_name(s)}, γ={g:g}{_variant_label(selected)}"
        table2.append((label, selected))
    seeds = len({r["seed"] for r in rows})
    return Report(
        cells,
        gammas,
        teachers,
        student_tags,
        standard,
        selected,
        note,
        table2,
        seeds,
        dict(spec or {}),
        eligible=eligible,
    )


def table1(rep: Report, gamma: float) -> list[list[str]]:
    """Header and rows of the Table 1 grid at ``gamma`` (cells ``average / worst``, % with SE)."""
    header = ["teacher \\ student", "teacher alone"] + [_name(s) for s in rep.students]
    out = [header]
    for t in rep.teachers:
        alone = rep.cells.get(("teacher", t, "", None))
        row = [_name(t), f"{fmt(alone, 'test_average')} / {fmt(alone, 'test_worst')}{rep.seeds_note(alone)}"]
        for s in rep.students:
            c = rep.cells.get(("student", t, s, gamma))
            row.append(f"{fmt(c, 'test_average')} / {fmt(c, 'test_worst')}{rep.seeds_note(c)}")
        out.append(row)
    return out


def table2(rep: Report) -> list[list[str]]:
    header = [
        "method",
        "test average",
        "test worst-class",
        "test balanced",
        "test worst-k",
        "val average",
        "val worst",
        "λ distance",
        "seeds",
    ]
    out = [header]
    for label, c in rep.table2:
        out.append(
            [
                label,
                fmt(c, "test_average"),
                fmt(c, "test_worst"),
                fmt(c, "test_balanced"),
                fmt(c, "test_worst_k"),
                fmt(c, "val_average"),
                fmt(c, "val_worst"),
                _fmt_distance(c),
                str(c.n),
            ]
        )
    return out


def _fmt_distance(cell: Cell) -> str:
    """Mean total-variation distance of the final ``lambda`` from uniform ('-' where no ``lambda`` moved)."""
    values = cell.values("lambda_distance")
    return f"{sum(values) / len(values):.2f}" if values else "-"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _csv_text(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


# ---------------------------------------------------------------------------------------- findings
def findings(rep: Report) -> list[str]:
    """Checks of docs/paper-results.md on this sweep, each a sentence with its numbers."""
    out: list[str] = []
    std, sel = rep.standard, rep.selected
    if sel is not None:
        gain = sel.mean("test_worst") - std.mean("test_worst")
        diff = sel.mean("test_average") - std.mean("test_average")
        se = std.se("test_average")
        within = diff >= -(0 if math.isnan(se) else se)
        verdict = "holds" if gain > 0 and within else "does not hold"
        out.append(
            f"A robust objective beats standard distillation on worst-class accuracy without losing average accuracy "
            f"beyond its standard error: {verdict} here (selected trade-off: worst-class {100 * gain:+.1f} points, "
            f"average {100 * diff:+.1f} points; standard distillation's average SE {100 * se:.1f})."
        )
    students = [c for k, c in rep.cells.items() if k[0] == "student"]
    better = [
        c
        for c in students
        if c.key[2] != "standard"
        and c.mean("test_worst") > std.mean("test_worst")
        and c.mean("test_average")
        >= std.mean("test_average") - (0 if math.isnan(std.se("test_average")) else std.se("test_average"))
    ]
    out.append(
        f"{len(better)} of {sum(1 for c in students if c.key[2] != 'standard')} trade-off grid points have a higher mean "
        "test worst-class accuracy than standard distillation and an average no lower beyond its standard error."
    )
    gamma = std.key[3]
    robust = [c for c in students if c.key[2] == "a1" and c.key[3] == gamma]
    teachers = [c for k, c in rep.cells.items() if k[0] == "teacher"]
    if robust and teachers:
        best_teacher = max(teachers, key=lambda c: c.mean("test_worst")).key[1]
        best_for_robust = max(robust, key=lambda c: c.mean("test_worst")).key[1]
        same = "is also" if best_teacher == best_for_robust else "is NOT"
        out.append(
            f"The teacher with the best worst-class accuracy ({_name(best_teacher)}) {same} the best teacher for a "
            f"robust student (γ={gamma:g}: {_name(best_for_robust)}); the paper found it often is not."
        )
    both = rep.cells.get(("student", "a1", "a1", gamma))
    one_sided = [
        c for c in students if c.key[3] == gamma and (c.key[1] == "a1") != (c.key[2] == "a1") and "a1" in c.key[1:3]
    ]
    if both is not None and one_sided:
        best_one = max(one_sided, key=lambda c: c.mean("test_worst"))
        word = "beats" if both.mean("test_worst") > best_one.mean("test_worst") else "does not beat"
        out.append(
            f"Robust on both sides (worst-class {100 * both.mean('test_worst'):.1f}) {word} the best robust-on-one-side "
            f"pair (teacher {_name(best_one.key[1])}, student {_name(best_one.key[2])}: "
            f"{100 * best_one.mean('test_worst'):.1f}); the paper found it wins only on TinyImageNet."
        )
    out += _robust_vs_balanced(rep, students)
    out += _alpha_s_sets_average(students, gamma)
    return out


def _robust_vs_balanced(rep: Report, students: list[Cell]) -> list[str]:
    """The robust student against the balanced one of the same teacher and gamma."""
    out: list[str] = []
    pairs = []
    for c in students:
        if c.key[2] == "a1":
            bal = rep.cells.get(("student", c.key[1], "a0", c.key[3]))
            if bal is not None and c.n >= 2 and bal.n >= 2:
                gap = c.mean("test_worst") - bal.mean("test_worst")
                pairs.append((abs(gap) > c.se("test_worst") + bal.se("test_worst"), gap, c))
    if pairs:
        apart = [p for p in pairs if p[0]]
        largest = max(pairs, key=lambda p: abs(p[1]))
        out.append(
            f"The robust student (α_s = 1) and the balanced one (α_s = 0) differ in mean test worst-class accuracy by "
            f"more than the sum of their standard errors for {len(apart)} of {len(pairs)} (teacher, γ) pairs; "
            f"largest gap {100 * largest[1]:+.1f} points (teacher {_name(largest[2].key[1])}, "
            f"γ={largest[2].key[3]:g})."
        )
    return out


def _alpha_s_sets_average(students: list[Cell], gamma: float) -> list[str]:
    """Whether the student's alpha moves average accuracy more than the teacher's."""
    out: list[str] = []
    grid = [c for c in students if c.key[3] == gamma and c.key[1] != "standard" and c.key[2] != "standard"]
    if len(grid) >= 4:
        by_s: dict[str, list[float]] = defaultdict(list)
        by_t: dict[str, list[float]] = defaultdict(list)
        for c in grid:
            by_s[c.key[2]].append(c.mean("test_average"))
            by_t[c.key[1]].append(c.mean("test_average"))
        spread = lambda d: max(sum(v) / len(v) for v in d.values()) - min(sum(v) / len(v) for v in d.values())  # noqa: E731
        s_spread, t_spread = spread(by_s), spread(by_t)
        word = "holds" if s_spread > t_spread else "does not hold"
        out.append(
            f"alpha_s mostly sets average accuracy: {word} (range of mean test average over alpha_s "
            f"{100 * s_spread:.1f} points, over alpha_t {100 * t_spread:.1f} points)."
        )
    return out


def selection_diagnostics(rep: Report) -> list[str]:
    """How far validation predicts test for the selected trade-off and the baselines tuned on validation.

    The selected cell is the maximum of many noisy validation estimates, and post-shift fits ``m``
    shifts to the validation set's worst class: both read optimistic on validation. The mean drop from
    validation to test worst-class accuracy, and the best test worst-class accuracy among the eligible
    candidates (an oracle: what a perfect validation estimate would have picked), say how much of a gap
    to a baseline is the selection's and how much the method's.
    """
    out: list[str] = []
    tuned = [(label, c) for label, c in rep.table2 if c.key[0] == "baseline" or c is rep.selected]
    for label, c in tuned:
        drop = c.mean("val_worst") - c.mean("test_worst")
        out.append(
            f"{label}: validation worst-class {100 * c.mean('val_worst'):.1f}, test {100 * c.mean('test_worst'):.1f} "
            f"(drop {100 * drop:+.1f} points)."
        )
    if rep.selected is not None and rep.eligible:
        oracle = _best(rep.eligible, "test_worst")
        t, s, g = oracle.key[1:]
        out.append(
            f"Oracle among the {len(rep.eligible)} eligible candidates (picked on test, for reference only): teacher "
            f"{_name(t)}, student {_name(s)}, γ={g:g}{_variant_label(oracle)}: test average "
            f"{100 * oracle.mean('test_average'):.1f} ± {100 * oracle.se('test_average'):.1f}, worst-class "
            f"{100 * oracle.mean('test_worst'):.1f} ± {100 * oracle.se('test_worst'):.1f}."
        )
    return out


# ------------------------------------------------------------------------------------------- plots
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)
    ]
    return sorted(front, key=lambda i: points[i][0])


def _save(fig: Any, out: Path, name: str, names: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    names.append(name)


def plot_all(rep: Report, out: Path) -> list[str]:
    """Writes the three PNGs; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names: list[str] = []
    # The grid at the selected trade-off's temperature (standard distillation's where none was selected).
    gamma = (rep.selected or rep.standard).key[3]
    title = f"{rep.spec.get('data', '')} rho={rep.spec.get('imbalance', '')}, {rep.seeds} seed(s), γ={gamma:g}"
    _plot_pareto(plt, rep, gamma, title, out, names)
    if rep.selected is not None:
        _plot_recall(plt, rep, title, out, names)
    _plot_calibration(plt, rep, gamma, title, out, names)
    return names


def _plot_pareto(plt: Any, rep: Report, gamma: float, title: str, out: Path, names: list[str]) -> None:
    """``pareto.png``: the grid at ``gamma`` with its Pareto frontier, standard distillation, the selected
    trade-off and the baselines as extra markers."""
    fig, ax = plt.subplots(figsize=(7.5, 6.2), dpi=120)
    grid = [c for k, c in rep.cells.items() if k[0] == "student" and k[3] == gamma]
    pts = [(100 * c.mean("test_average"), 100 * c.mean("test_worst")) for c in grid]
    tdf = [i for i, c in enumerate(grid) if c.key[2] != "standard"]
    std = [i for i, c in enumerate(grid) if c.key[2] == "standard"]
    sc = ax.scatter(
        [pts[i][0] for i in tdf],
        [pts[i][1] for i in tdf],
        c=[float(grid[i].key[2][1:]) for i in tdf],
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=30,
        zorder=3,
    )
    fig.colorbar(sc, ax=ax, label="alpha_s")
    ax.scatter(
        [pts[i][0] for i in std],
        [pts[i][1] for i in std],
        marker="s",
        color="gray",
        s=30,
        zorder=3,
        label="standard students",
    )
    for c, (x, y) in zip(grid, pts, strict=True):
        t = "std" if c.key[1] == "standard" else c.key[1][1:]
        s = "std" if c.key[2] == "standard" else c.key[2][1:]
        ax.annotate(f"({t},{s})", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto frontier of the grid")
    x, y = 100 * rep.standard.mean("test_average"), 100 * rep.standard.mean("test_worst")
    ax.scatter(
        [x],
        [y],
        s=160,
        facecolors="none",
        edgecolors="tab:blue",
        lw=2,
        zorder=4,
        label=f"standard distillation (γ={rep.standard.key[3]:g})",
    )
    if rep.selected is not None:
        x, y = 100 * rep.selected.mean("test_average"), 100 * rep.selected.mean("test_worst")
        ax.scatter([x], [y], s=220, marker="*", color="tab:red", zorder=4, label="selected trade-off")
    for _label, c in rep.table2:
        if c.key[0] == "baseline":
            ax.scatter([100 * c.mean("test_average")], [100 * c.mean("test_worst")], marker="x", s=50, zorder=4)
            ax.annotate(
                c.key[2],
                (100 * c.mean("test_average"), 100 * c.mean("test_worst")),
                textcoords="offset points",
                xytext=(3, -8),
                fontsize=6,
            )
    ax.set_xlabel("average test accuracy (%)")
    ax.set_ylabel("worst-class test accuracy (%)")
    ax.set_title(f"(alpha_t, alpha_s) grid: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    _save(fig, out, "pareto.png", names)


def _plot_recall(plt: Any, rep: Report, title: str, out: Path, names: list[str]) -> None:
    """``per_class_recall.png``: standard distillation against the selected robust student."""
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    for i, (label, c, color) in enumerate(
        (("standard distillation", rep.standard, "tab:blue"), ("selected trade-off", rep.selected, "tab:red"))
    ):
        rec = c.recall()
        xs = [j + (i - 0.5) * 0.4 for j in range(len(rec))]
        ax.bar(xs, [100 * (v or 0) for v in rec], width=0.4, color=color, label=label)
    ax.set_xlabel("class (0 = head, largest in training)")
    ax.set_ylabel("test recall (%)")
    ax.set_title(f"per-class recall: {title}", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, out, "per_class_recall.png", names)


def _plot_calibration(plt: Any, rep: Report, gamma: float, title: str, out: Path, names: list[str]) -> None:
    """``calibration.png``: the teacher's per-class calibration error against the student's worst-class accuracy."""
    pts2 = [
        (c.mean("teacher_calibration_max"), 100 * c.mean("test_worst"), c)
        for k, c in rep.cells.items()
        if k[0] == "student" and k[3] == gamma and k[2] != "standard" and c.values("teacher_calibration_max")
    ]
    if not pts2:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sc = ax.scatter(
        [p[0] for p in pts2], [p[1] for p in pts2], c=[float(p[2].key[2][1:]) for p in pts2], cmap="viridis", s=30
    )
    fig.colorbar(sc, ax=ax, label="alpha_s")
    for x, y, c in pts2:
        if c.key[2] == "a1":
            ax.annotate(_name(c.key[1]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel("teacher per-class calibration error (max over classes, test, at γ)")
    ax.set_ylabel("student worst-class test accuracy (%)")
    ax.set_title(f"teacher calibration vs student worst class: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, out, "calibration.png", names)


def _lambda_trace(sweep_dir: Path, run: str) -> tuple[list[int], list[list[float]]]:
    """Steps and ``lambda`` of one run's ``log.jsonl`` "train" records (empty if it logged none)."""
    steps: list[int] = []
    weights: list[list[float]] = []
    path = sweep_dir / "runs" / run / "log.jsonl"
    if not path.exists():
        return steps, weights
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "train" and "dro_weights" in record:
            steps.append(int(record["step"]))
            weights.append(record["dro_weights"])
    if steps and steps[0] > 0:  # lambda starts uniform
        steps.insert(0, 0)
        weights.insert(0, [1.0 / len(weights[0])] * len(weights[0]))
    return steps, weights


def plot_lambda(rep: Report, sweep_dir: Path, out: Path) -> list[str]:
    """``lambda.png``: ``lambda`` per class against training steps for the selected trade-off and the
    robust student of the standard teacher (their first seed); returns its name, or none without
    matplotlib or logged ``lambda``."""
    panels = []
    robust = rep.cells.get(("student", "standard", "a1", rep.standard.key[3]))
    for title, cell in (("selected trade-off", rep.selected), ("robust student, standard teacher", robust)):
        if cell is not None and cell.rows:
            row = min(cell.rows, key=lambda r: r["seed"])
            steps, weights = _lambda_trace(Path(sweep_dir), row["run"])
            if steps:
                panels.append((f"{title} ({row['run']})", steps, weights))
    if not panels:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (title, steps, weights) in zip(axes[0], panels, strict=True):
        m = len(weights[0])
        cmap = plt.get_cmap("viridis")
        for j in range(m):
            ax.plot(steps, [w[j] for w in weights], color=cmap(j / max(1, m - 1)), lw=1.2, label=f"class {j}")
        ax.axhline(1.0 / m, color="gray", ls=":", lw=1, label="uniform")
        ax.set_xlabel("training step")
        ax.set_ylabel("λ_j")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    names: list[str] = []
    _save(fig, out, "lambda.png", names)
    return names


# -------------------------------------------------------------------------------------------- main
def planned(spec: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(runs, seeds)`` the sweep described by ``spec`` (its ``sweep.json``) plans, or ``None`` if unknown."""
    from rkd_engine.training.sweep import make_spec, plan

    try:
        sweep = make_spec({k: v for k, v in spec.items() if k not in ("workers",)})
    except (ValueError, TypeError):
        return None
    return len(plan(sweep)), len(sweep.seeds)


def completeness_note(rep: Report) -> str | None:
    """A warning for a sweep that has not finished (``None`` if it has, or if its plan is unknown)."""
    if not rep.incomplete:
        return None
    return (
        f"the sweep is incomplete: {rep.finished_runs} of {rep.planned_runs} runs have finished "
        f"({rep.seeds} of {rep.planned_seeds} seeds have at least one); means are over the seeds each cell has, "
        "shown as (n=...) where fewer than all"
    )


def write_report(sweep_dir: str | Path, out: str | Path | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Write ``report.md``, ``table1.csv``, ``table2.csv`` and the plots into ``out`` (default: the
    sweep directory); print the markdown unless ``quiet``. Returns paths and the selection."""
    rows, spec = read_runs(sweep_dir)
    rep = analyse(rows, spec)
    rep.planned_runs, rep.planned_seeds = planned(spec) or (None, None)
    rep.finished_runs = len(rows)
    incomplete = completeness_note(rep)
    if incomplete:
        sys.stderr.write(f"rkd report: warning: {incomplete}\n")
    out = Path(out) if out is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(rep, out) + plot_lambda(rep, Path(sweep_dir), out)
    t1_rows: list[list[str]] = []
    parts = [
        f"# Sweep report: {spec.get('data', '?')}, imbalance rho = {spec.get('imbalance', '?')}, {rep.seeds} seed(s)",
        "",
        "Test accuracy in %, mean ± standard error over seeds. Average = standard accuracy (the test set is "
        "balanced, so it equals balanced accuracy); worst = lowest per-class recall.",
    ]
    if incomplete:
        parts += ["", f"**Warning: {incomplete}.**"]
    if any(c.variant != (None, None) for c in group_variants(rows)):
        parts += [
            "",
            "A DRO student's cell shows, of its validation temperatures and DRO step sizes, the one with the highest "
            "mean validation worst-class accuracy; the selection rule below picks over all of them.",
        ]
    for g in rep.gammas:
        t1 = table1(rep, g)
        if not t1_rows:
            t1_rows.append(["gamma", *t1[0]])
        t1_rows += [[f"{g:g}", *r] for r in t1[1:]]
        parts += ["", f"## Table 1: teacher x student, average / worst-class (γ = {g:g})", "", markdown_table(t1)]
    t2 = table2(rep)
    parts += [
        "",
        "## Table 2: selected trade-off against the baselines",
        "",
        f"Selection rule: {rep.selection_note}.",
        "",
        markdown_table(t2),
    ]
    checks = findings(rep)
    parts += ["", "## The paper's findings (docs/paper-results.md), checked here", ""] + [f"- {f}" for f in checks]
    diagnostics = selection_diagnostics(rep)
    if diagnostics:
        parts += ["", "## Selection on validation: how well it predicts test", ""] + [f"- {d}" for d in diagnostics]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    text = "\n".join(parts) + "\n"
    atomic_write(out / "report.md", lambda fh: fh.write(text.encode()))
    atomic_write(out / "table1.csv", lambda fh: fh.write(_csv_text(t1_rows)))
    atomic_write(out / "table2.csv", lambda fh: fh.write(_csv_text(t2)))
    if not quiet:
        sys.stdout.write(text)
    sel = rep.selected.key if rep.selected is not None else None
    return {
        "report": str(out / "report.md"),
        "plots": plots,
        "selected": sel,
        "findings": checks,
        "incomplete": rep.incomplete,
    }
