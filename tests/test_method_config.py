"""The option checks and defaults that depend on the student method live in the method classes.

``rkd_engine/training/config.py`` asks the method class (``check_config``, ``config_defaults``, ``named``,
``own_objective``); it never branches on a method's name. These tests pin every method's rules to what
they were when config.py spelled them out, and show that a new method class gets its checks applied
without an edit to config.py.
"""

from __future__ import annotations

import ast
import dataclasses
import types
from pathlib import Path
from typing import ClassVar

import pytest

from rkd_engine.training.config import (
    STUDENT_METHODS,
    ConfigError,
    StudentConfig,
    TeacherConfig,
    resolve_defaults,
    validate,
)
from rkd_engine.training.methods import METHODS, Distill, Hinton, method_class
from rkd_engine.training.teacher_cache import check_student_use

CONFIG_PY = Path(__file__).resolve().parents[1] / "rkd_engine" / "training" / "config.py"
TEACHERS = ("teacher", "teacher_checkpoint", "teacher_cache")

# Each method's rules, as config.py stated them by name before they moved into the classes:
# (takes --teacher-weight: its default, or what the error says it does instead; --teacher-cache refusal;
#  takes --teacher-checkpoint; needs a teacher; its own objective; default --dro-step)
RULES = {
    "distill": ("uses a = 1)", None, True, True, False, None),
    "hinton": (0.5, None, True, True, False, None),
    "ada-alpha": ("sets a per example)", None, True, True, False, None),
    "ada-margin": (1.0, None, True, True, False, None),
    "group-dro": ("has no teacher target)", "it has no teacher", False, False, True, 0.01),
    "post-shift": (
        "has no teacher target)",
        "its model is the teacher itself (give --teacher)",
        False,
        True,
        True,
        0.1,
    ),
}


def _student(method: str, **options) -> StudentConfig:
    return StudentConfig(method=method, **options)


def test_every_registered_student_method_is_a_choice_of_method():
    students = {name for name, cls in METHODS.items() if cls.student}
    assert students == set(STUDENT_METHODS) == set(RULES)
    assert method_class(TeacherConfig()) is METHODS["teacher"]
    assert all(method_class(StudentConfig(method=name)) is METHODS[name] for name in STUDENT_METHODS)


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_teacher_weight_rule(method):
    weight = RULES[method][0]
    teacher = {} if method == "group-dro" else {"teacher": "t"}
    if isinstance(weight, float):
        validate(_student(method, teacher_weight=0.3, **teacher))
        resolved = resolve_defaults(_student(method, **teacher), cuda_available=False)
        assert resolved.teacher_weight == weight
        assert (
            resolve_defaults(_student(method, teacher_weight=0.3, **teacher), cuda_available=False).teacher_weight
            == 0.3
        )
        return
    message = f"--teacher-weight is used by --method hinton or ada-margin only (--method {method} {weight}"
    with pytest.raises(ConfigError) as info:
        validate(_student(method, teacher_weight=0.3, **teacher))
    assert str(info.value) == message
    assert resolve_defaults(_student(method, **teacher), cuda_available=False).teacher_weight is None


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_teacher_source_rules(method):
    _, cache_refusal, takes_checkpoint, needs_teacher, _, _ = RULES[method]
    if cache_refusal is None:
        validate(_student(method, teacher_cache="c"))
    else:
        with pytest.raises(ConfigError) as info:
            validate(_student(method, teacher_cache="c"))
        assert str(info.value) == f"--teacher-cache cannot serve --method {method}: {cache_refusal}"
    if takes_checkpoint:
        validate(_student(method, teacher_checkpoint="model.pt"))
    else:
        with pytest.raises(ConfigError, match=rf"^--method {method} takes no --teacher-checkpoint"):
            validate(_student(method, teacher_checkpoint="model.pt"))
    if needs_teacher:
        with pytest.raises(ConfigError, match=rf"--teacher RUN_DIR is required for --method {method} "):
            validate(_student(method))
    else:
        validate(_student(method))


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_objective_and_step_rules(method):
    *_, own_objective, dro_step = RULES[method]
    teacher = {"teacher": "t"} if method != "group-dro" else {}
    if own_objective:
        with pytest.raises(
            ConfigError, match=f"--method {method} is its own worst-class objective: drop --objective robust"
        ):
            validate(_student(method, objective="robust", **teacher))
        with pytest.raises(ConfigError, match=f"--tau has no effect with --method {method}"):
            validate(_student(method, tau=2.0, **teacher))
    else:
        validate(_student(method, objective="robust", tau=2.0, **teacher))
    resolved = resolve_defaults(_student(method, **teacher), cuda_available=False)
    assert resolved.dro_step == dro_step
    assert resolve_defaults(_student(method, dro_step=0.5, **teacher), cuda_available=False).dro_step == 0.5
    label = "standard" if method == "distill" else method
    assert resolved.out == str(Path("runs") / f"student-{label}-seed0")


def test_only_the_margin_methods_refuse_a_topk_cache():
    refusing = {name for name, cls in METHODS.items() if cls.needs_label_probability}
    assert refusing == {"ada-alpha", "ada-margin"}
    cache = types.SimpleNamespace(layout="topk", k=2, num_classes=5, path="c")
    for name in STUDENT_METHODS:
        use = dict(method=name, augment=None, cache_augmented=False)
        if name in refusing:
            with pytest.raises(ConfigError, match=f"--method {name} needs the teacher's probability of the label"):
                check_student_use(cache, needs_label_probability=True, **use)
        check_student_use(cache, needs_label_probability=False, **use)
        check_student_use(types.SimpleNamespace(layout="dense"), needs_label_probability=True, **use)


def test_the_general_teacher_checks_stay_in_config():
    with pytest.raises(ConfigError, match="pass one teacher: --teacher or --teacher-checkpoint, not several"):
        validate(_student("distill", teacher="t", teacher_checkpoint="model.pt"))
    with pytest.raises(ConfigError, match="--teacher-model and --teacher-model-option describe"):
        validate(_student("distill", teacher="t", teacher_model="mlp"))
    with pytest.raises(ConfigError, match="--teacher-weight must be a number in"):
        validate(_student("hinton", teacher="t", teacher_weight=2.0))
    assert resolve_defaults(TeacherConfig(objective="robust"), cuda_available=False).out == str(
        Path("runs") / "teacher-robust-seed0"
    )


def _compared_strings(tree: ast.AST) -> set[str]:
    """String literals that a comparison (``==``, ``!=``, ``in``, ``not in``) in ``tree`` tests against."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                for leaf in ast.walk(side):
                    if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                        found.add(leaf.value)
    return found


def test_config_never_branches_on_a_method_name():
    tree = ast.parse(CONFIG_PY.read_text())
    assert not _compared_strings(tree) & set(STUDENT_METHODS)
    assert "hinton" in _compared_strings(ast.parse("if cfg.method in ('hinton', 'x'):\n    pass\n"))  # it would see one


class _Toy(Hinton):
    """A new method: one class, registered, its name added to the ``--method`` choices (nothing else)."""

    name = "toy"
    default_teacher_weight = 0.25
    without_teacher_weight: ClassVar[str] = "unused"
    teacher_cache_refusal = "a toy cannot read a cache"
    own_objective = True
    default_dro_step = 0.05


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", _Toy)
    field = {f.name: f for f in dataclasses.fields(StudentConfig)}["method"]
    monkeypatch.setattr(field, "metadata", {**field.metadata, "choices": (*STUDENT_METHODS, "toy")})
    return _Toy


def test_a_new_method_class_gets_its_checks_and_defaults_without_config_edits(toy):
    with pytest.raises(ConfigError, match="--teacher RUN_DIR is required for --method toy"):
        validate(_student("toy"))
    with pytest.raises(ConfigError, match="--method toy is its own worst-class objective"):
        validate(_student("toy", teacher="t", objective="balanced"))
    with pytest.raises(ConfigError, match="--teacher-cache cannot serve --method toy: a toy cannot read a cache"):
        validate(_student("toy", teacher_cache="c"))
    with pytest.raises(ConfigError, match=r"used by --method hinton or ada-margin or toy only \(--method distill"):
        validate(_student("distill", teacher="t", teacher_weight=0.5))
    validate(_student("toy", teacher="t", teacher_weight=0.5))
    resolved = resolve_defaults(_student("toy", teacher="t"), cuda_available=False)
    assert (resolved.teacher_weight, resolved.dro_step) == (0.25, 0.05)
    assert resolved.out == str(Path("runs") / "student-toy-seed0")
    assert issubclass(method_class(resolved), Distill)
