"""Adapters to other people's trainers; each one is an optional extra and is imported only on request.

- ``rkd_engine.integrations.hf``: ``RobustDistillationTrainer``, a Hugging Face ``transformers.Trainer``
  whose ``compute_loss`` is rkd's fused distillation loss (``pip install rkd-engine[hf]``).
- ``rkd_engine.integrations.lightning``: ``RobustDistillationModule``, a Lightning ``LightningModule``
  distilling a student from a frozen teacher (``pip install rkd-engine[lightning]``).
- ``rkd_engine.integrations.common``: the framework-free pieces both use (per-token loss with ignored
  positions, flat per-class metrics).

Importing ``rkd_engine`` or this package imports neither framework.
"""
