"""The Hugging Face Trainer adapter, offline, with tiny randomly initialised models built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rkd_engine import RobustDistillationLoss, distill_loss
from rkd_engine.integrations.hf import DRO_STATE_FILE, RobustDistillationTrainer

VOCAB = 32


def _args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "max_steps": 1,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _tiny_llama(seed: int, **options):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **options,
    )
    return transformers.LlamaForCausalLM(config)


def _lm_rows(n: int, length: int, seed: int) -> list[dict]:
    """Token rows whose labels ignore a random-length prompt (so micro-batches keep different token counts)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        labels[:prompt] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.int64), "labels": labels})
    return rows


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train_lm(tmp_path, rows, batch, accumulation, loss, teacher_weight=1.0):
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    trainer = RobustDistillationTrainer(
        model=student,
        args=_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation),
        train_dataset=rows,
        teacher=teacher,
        loss=loss,
        teacher_weight=teacher_weight,
        task="causal-lm",
    )
    trainer.train()
    return _params(student)


def test_gradient_accumulation_2x8_equals_one_batch_of_16(tmp_path):
    rows = _lm_rows(16, 12, seed=3)
    loss = RobustDistillationLoss(VOCAB, "standard", temperature=2.0)
    before = _params(_tiny_llama(0))
    one = _train_lm(tmp_path / "a", rows, 16, 1, loss)
    two = _train_lm(tmp_path / "b", rows, 8, 2, loss)
    assert not torch.allclose(one, before, atol=1e-4)  # the step moved the weights
    torch.testing.assert_close(two, one, atol=2e-6, rtol=1e-5)


def test_causal_lm_step_equals_plain_loop(tmp_path):
    rows = _lm_rows(8, 10, seed=4)
    loss = RobustDistillationLoss(VOCAB, "standard", temperature=2.0)
    trained = _train_lm(tmp_path, rows, 8, 1, loss, teacher_weight=0.5)

    # The plain loop: the kept next-token rows only, their summed loss over their number, one SGD step.
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    f = student(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    with torch.no_grad():
        g = teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    out = distill_loss(f[keep], labels=y[keep], teacher_logits=g[keep], temperature=2.0, teacher_weight=0.5)
    out.loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    torch.testing.assert_close(trained, _params(student), atol=2e-6, rtol=1e-5)


class _ScaledLlama(transformers.LlamaForCausalLM):
    """A causal LM that changes its scores after the head (as soft-capped or scaled models do)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def _head_rows(model) -> list[int]:
    """Records the rows (positions) the model's output layer is called on."""
    calls: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: calls.append(inp[0][..., 0].numel()))
    return calls


def _plain_loss_and_grads(student, teacher, batch, teacher_weight):
    """The plain loop's loss on the kept next-token rows of the full models' logits, and its gradients."""
    f = student(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, VOCAB)
    with torch.no_grad():
        g = teacher(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, VOCAB)
    y = batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    out = distill_loss(f[keep], labels=y[keep], teacher_logits=g[keep], temperature=2.0, teacher_weight=teacher_weight)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def _trainer_loss_and_grads(tmp_path, student, teacher, batch, teacher_weight):
    trainer = RobustDistillationTrainer(
        model=student,
        args=_args(tmp_path),
        teacher=teacher,
        loss=RobustDistillationLoss(VOCAB, "standard", temperature=2.0),
        teacher_weight=teacher_weight,
        task="causal-lm",
    )
    value = trainer.compute_loss(student, batch)
    value.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return trainer, value.detach(), grads


def _tied_llama(seed: int):
    return _tiny_llama(seed, tie_word_embeddings=True)


@pytest.mark.parametrize("student_kind", ["untied", "tied"])
def test_causal_lm_fused_head_equals_plain_loop_without_student_logits(tmp_path, student_kind):
    make = _tiny_llama if student_kind == "untied" else _tied_llama
    rows = _lm_rows(6, 12, seed=7)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    student, teacher = make(0), _tiny_llama(1)
    calls, teacher_calls = _head_rows(student), _head_rows(teacher)
    trainer, value, grads = _trainer_loss_and_grads(tmp_path, student, teacher, batch, 0.5)
    # Fused: the heads ran only on the one-time probe (1 row, at most 8 positions), never on the batch.
    assert trainer.fused_head("student", student, batch) is student.get_output_embeddings()
    assert trainer.fused_head("teacher", teacher, batch) is teacher.get_output_embeddings()
    assert calls and max(calls) <= 8 and max(teacher_calls) <= 8
    calls.clear()
    trainer.compute_loss(student, batch)
    assert calls == []
    want, want_grads = _plain_loss_and_grads(make(0), _tiny_llama(1), batch, 0.5)
    torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-5)
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_causal_lm_fused_student_with_a_dense_teacher_and_the_logits_fallback(tmp_path):
    rows = _lm_rows(4, 10, seed=8)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    # A teacher whose head is wrapped gives dense logits; the student's head is still fused.
    teacher = _tiny_llama(1)
    teacher.lm_head = torch.nn.Sequential(teacher.lm_head)
    student = _tiny_llama(0)
    trainer, value, grads = _trainer_loss_and_grads(tmp_path, student, teacher, batch, 1.0)
    assert trainer.fused_head("student", student, batch) is student.lm_head
    assert trainer.fused_head("teacher", teacher, batch) is None
    want, want_grads = _plain_loss_and_grads(_tiny_llama(0), teacher, batch, 1.0)
    torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # A student that rescales its scores after the head fails the one-time probe: the logits path.
    torch.manual_seed(0)
    student = _ScaledLlama(_tiny_llama(0).config)
    student.load_state_dict(_tiny_llama(0).state_dict())
    calls = _head_rows(student)
    trainer, value, grads = _trainer_loss_and_grads(tmp_path, student, _tiny_llama(1), batch, 0.5)
    assert trainer.fused_head("student", student, batch) is None
    assert max(calls) == 4 * 10  # the whole batch went through the head
    reference = _ScaledLlama(student.config)
    reference.load_state_dict(_tiny_llama(0).state_dict())
    want, want_grads = _plain_loss_and_grads(reference, _tiny_llama(1), batch, 0.5)
    torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_implicit_cross_entropy_and_bad_arguments(tmp_path):
    loss = RobustDistillationLoss(VOCAB, "standard")
    teacher = _tiny_llama(1)
    with pytest.raises(ValueError, match="compute_loss_func"):
        RobustDistillationTrainer(
            model=_tiny_llama(0), args=_args(tmp_path), teacher=teacher, loss=loss, compute_loss_func=lambda *a: 0
        )
    with pytest.raises(ValueError, match="teacher_weight"):
        RobustDistillationTrainer(
            model=_tiny_llama(0), args=_args(tmp_path), teacher=teacher, loss=loss, teacher_weight=2
        )
    with pytest.raises(ValueError, match="dro_dataset"):
        RobustDistillationTrainer(
            model=_tiny_llama(0), args=_args(tmp_path), teacher=teacher, loss=RobustDistillationLoss(VOCAB, "robust")
        )
    # The student equal to the teacher with a = 1: the loss is the teacher's entropy, with no label term.
    student = _tiny_llama(1)
    trainer = RobustDistillationTrainer(
        model=student, args=_args(tmp_path), teacher=teacher, loss=loss, task="causal-lm"
    )
    rows = _lm_rows(2, 8, seed=5)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    value = trainer.compute_loss(student, batch)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1], -1)
    keep = batch["labels"][:, 1:] != -100
    entropy = -(logp.exp() * logp).sum(-1)[keep].mean()
    torch.testing.assert_close(value, entropy, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- long-tailed sequence classification
M, LENGTH = 3, 6
TRAIN_COUNTS = (300, 60, 12)


def _cls_rows(counts, seed: int) -> list[dict]:
    """Class c puts its marker token c in a random slot with probability 0.8, else a random class's marker;
    the other slots are noise tokens. Under a long-tailed prior a tail marker alone loses to the head."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c, n in enumerate(counts):
        for _ in range(n):
            ids = torch.randint(M, VOCAB, (LENGTH,), generator=gen)
            marker = c if float(torch.rand((), generator=gen)) < 0.8 else int(torch.randint(0, M, (1,), generator=gen))
            ids[int(torch.randint(0, LENGTH, (1,), generator=gen))] = marker
            rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.int64), "labels": c})
    return rows


def _tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=M,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _fit_teacher(rows, steps: int = 150):
    teacher = _tiny_bert(10)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    ids = torch.stack([r["input_ids"] for r in rows])
    y = torch.tensor([r["labels"] for r in rows])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(teacher(input_ids=ids[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


@pytest.mark.slow
def test_robust_objective_lifts_the_worst_class_inside_the_trainer(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend (several times slower on a busy machine)
    try:
        _robust_vs_standard(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _robust_vs_standard(tmp_path):
    train, val, test = _cls_rows(TRAIN_COUNTS, 0), _cls_rows((30,) * M, 1), _cls_rows((100,) * M, 2)
    teacher = _fit_teacher(train)
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in train])
        prior = torch.softmax(teacher(input_ids=ids).logits, -1).mean(0)
    results = {}
    for objective in ("standard", "robust"):
        loss = RobustDistillationLoss(M, objective, prior=prior, step_size=0.5)
        trainer = RobustDistillationTrainer(
            model=_tiny_bert(0),
            args=_args(
                tmp_path / objective,
                per_device_train_batch_size=32,
                max_steps=120,
                learning_rate=1e-2,
                optim="adamw_torch",
                save_strategy="steps",
                save_steps=120,
            ),
            train_dataset=train,
            eval_dataset=test,
            teacher=teacher,
            loss=loss,
            dro_dataset=val,
            dro_every=4,
        )
        trainer.train()
        results[objective] = trainer.evaluate()
        if objective == "robust":
            state = torch.load(tmp_path / objective / "checkpoint-120" / DRO_STATE_FILE, weights_only=True)
            torch.testing.assert_close(state["dro"]["weights"], loss.dro.weights)
            assert state["num_updates"] == 30
            assert "eval_dro_weight_2" in results[objective]
    std, rob = results["standard"], results["robust"]
    assert {"eval_accuracy", "eval_balanced_accuracy", "eval_class_2_accuracy"} <= set(std)
    assert rob["eval_worst_accuracy"] > std["eval_worst_accuracy"] + 0.1, (std, rob)


# ---------------------------------------------------------------------------------------- resume
class _StopAt(transformers.TrainerCallback):
    """Stops training after optimiser step ``step`` (after that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _dro_run(out, train, val, teacher, *, stop_at=None, resume=None):
    loss = RobustDistillationLoss(M, "robust", step_size=0.5)
    trainer = RobustDistillationTrainer(
        model=_tiny_bert(0),
        args=_args(
            out, per_device_train_batch_size=8, max_steps=8, learning_rate=0.1, save_strategy="steps", save_steps=4
        ),
        train_dataset=train,
        teacher=teacher,
        loss=loss,
        dro_dataset=val,
        dro_every=2,
        dro_val_batch=5,  # fewer than the 9 rows: each update draws its own rows from the step's seed
    )
    if stop_at is not None:
        trainer.add_callback(_StopAt(stop_at))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, loss


@pytest.mark.slow
def test_resumed_run_ends_with_the_uninterrupted_dro_state_and_weights(tmp_path):
    train, val = _cls_rows((24, 12, 6), 0), _cls_rows((3,) * M, 1)
    teacher = _tiny_bert(10).eval()
    whole, whole_loss = _dro_run(tmp_path / "whole", train, val, teacher)
    first, first_loss = _dro_run(tmp_path / "parts", train, val, teacher, stop_at=4)
    assert first.state.global_step == 4 and first.dro_schedule.num_updates == 2
    checkpoint = tmp_path / "parts" / "checkpoint-4"
    assert (checkpoint / DRO_STATE_FILE).is_file()
    resumed, resumed_loss = _dro_run(tmp_path / "parts", train, val, teacher, resume=str(checkpoint))
    assert resumed.state.global_step == 8
    uniform = torch.full((M,), 1.0 / M)
    assert not torch.allclose(whole_loss.dro.weights, uniform, atol=1e-4)  # lambda moved
    assert not torch.allclose(first_loss.dro.weights, whole_loss.dro.weights, atol=1e-6)  # half-way differs
    torch.testing.assert_close(resumed_loss.dro.weights, whole_loss.dro.weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(resumed_loss.dro.state_dict(), whole_loss.dro.state_dict(), atol=1e-6, rtol=1e-5)
    assert resumed.dro_schedule.num_updates == whole.dro_schedule.num_updates == 4
    assert resumed.dro_schedule.last_step == whole.dro_schedule.last_step == 8
    torch.testing.assert_close(_params(resumed.model), _params(whole.model), atol=1e-6, rtol=1e-5)
    # A checkpoint without the DRO state cannot silently restart lambda.
    (checkpoint / DRO_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=DRO_STATE_FILE):
        _dro_run(tmp_path / "parts", train, val, teacher, resume=str(checkpoint))
