"""Robust distillation inside a Hugging Face ``Trainer``: a tiny BERT student, long-tailed classes, offline.

A tiny BERT teacher is fitted on a long-tailed token-classification task (class ``c`` carries its
marker token ``c`` most of the time); two tiny BERT students are then distilled from it with
``RobustDistillationTrainer``, one with the standard objective and one with the robust objective
(DRO over classes from a balanced validation set every 4 steps). On the balanced test set the robust
student's worst class is far better (13% -> 46% in one run). Everything is built from configs with
random weights: nothing is downloaded. About half a minute of CPU time.

    pip install rkd-engine[hf]
    python examples/hf_trainer.py
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from rkd_engine import RobustDistillationLoss
from rkd_engine.integrations.hf import RobustDistillationTrainer

VOCAB, M, LENGTH = 32, 3, 6


def make_rows(counts, seed):
    """Class c puts marker c in one slot with probability 0.8 (else a random class's marker) among noise tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c, n in enumerate(counts):
        for _ in range(n):
            ids = torch.randint(M, VOCAB, (LENGTH,), generator=gen)
            own = float(torch.rand((), generator=gen)) < 0.8
            ids[int(torch.randint(0, LENGTH, (1,), generator=gen))] = (
                c if own else int(torch.randint(0, M, (1,), generator=gen))
            )
            rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.int64), "labels": c})
    return rows


def tiny_bert(seed):
    torch.manual_seed(seed)
    config = BertConfig(
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
    return BertForSequenceClassification(config)


def fit_teacher(rows, steps=150):
    teacher = tiny_bert(10)
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


def main():
    torch.set_num_threads(1)
    train = make_rows((300, 60, 12), seed=0)  # long-tailed: 25x more of class 0 than class 2
    val, test = make_rows((30,) * M, seed=1), make_rows((100,) * M, seed=2)
    teacher = fit_teacher(train)
    with torch.no_grad():  # pi_t: the teacher marginal on the training set
        prior = torch.softmax(teacher(input_ids=torch.stack([r["input_ids"] for r in train])).logits, -1).mean(0)
    with tempfile.TemporaryDirectory() as out:
        for objective in ("standard", "robust"):
            loss = RobustDistillationLoss(M, objective, temperature=1.0, prior=prior, step_size=0.5)
            args = TrainingArguments(
                output_dir=os.path.join(out, objective),
                per_device_train_batch_size=32,
                max_steps=120,
                learning_rate=1e-2,
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                use_cpu=True,
                seed=0,
                disable_tqdm=True,
            )
            trainer = RobustDistillationTrainer(
                model=tiny_bert(0),
                args=args,
                train_dataset=train,
                eval_dataset=test,
                teacher=teacher,
                loss=loss,
                teacher_weight=1.0,  # q = p: the teacher only, no cross-entropy term
                dro_dataset=val,
                dro_every=4,
            )
            trainer.train()
            m = trainer.evaluate()
            per_class = " ".join(f"{m[f'eval_class_{j}_accuracy']:.2f}" for j in range(M))
            print(
                f"{objective:>8} student  accuracy {100 * m['eval_accuracy']:.1f}%  "
                f"worst-class {100 * m['eval_worst_accuracy']:.1f}%  per class [{per_class}]"
            )
            if objective == "robust":
                print("final lambda:", [round(w, 3) for w in loss.dro.weights.tolist()])


if __name__ == "__main__":
    main()
