"""The training engine: teachers and students for every objective of docs/objectives.md, runs, evaluation, demo.

``train_teacher(TeacherConfig(...))`` and ``train_student(StudentConfig(...))`` train one run into a
run directory (``config.json``, ``log.jsonl``, ``checkpoint.pt``, ``model.pt``, ``metrics.json``);
``evaluate_run`` re-evaluates a finished run; ``run_demo`` runs the paper's Table 1 grid on
long-tailed digits. The ``rkd`` command line (``rkd_engine.cli``) is a thin layer over these.
"""

from rkd_engine.training.config import ConfigError, StudentConfig, TeacherConfig
from rkd_engine.training.engine import RunResult, resolve_config, train_student, train_teacher
from rkd_engine.training.evaluation import evaluate_run, load_model_file
from rkd_engine.training.runs import CheckpointError, RunDirError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "RunDirError",
    "RunResult",
    "StudentConfig",
    "TeacherConfig",
    "evaluate_run",
    "load_model_file",
    "resolve_config",
    "train_student",
    "train_teacher",
]
