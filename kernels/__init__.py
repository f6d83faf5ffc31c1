"""Triton kernels of rkd (shipped as ``rkd_engine.kernels``).

``distill``: the fused distillation rows (loss, gradient, per-class statistics) and ``scale_rows_``;
``topk``: the loss with a sparse top-k teacher. The submodules import Triton, so this package
imports none of them eagerly: ``import rkd_engine`` works where Triton is absent, and the Triton
interpreter (``TRITON_INTERPRET=1``) can still be switched on before the first kernel is defined.
Launch them through ``rkd_engine.ops.triton_backend``, which checks inputs and picks the configuration.
"""
