"""Per-token distillation divergence from logits: `kl_rows`, its torch reference and its fused CUDA path.

    student_logits, teacher_logits  [N, V]  one row per token (any float dtype; computed in fp32, fp64 for fp64)
    labels                          [N]     optional next tokens; < 0 is ignored (CE 0), as cross_entropy's -100
    -> kl [N] fp32: KL(softmax(teacher / T) || softmax(student / T)) per row, without the T^2 factor
       ce [N] fp32: cross_entropy(student, label) per row at temperature 1 (only with labels)

Gradients flow to the student's logits only. On CUDA the fused Triton kernels run (`triton_kl`), elsewhere the
reference; both are tested against each other (tests/test_kl_div.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_kl import kl_rows_triton, triton


def kl_rows_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`kl_rows` in torch: log-softmaxes of both in fp32 (fp64 for fp64 logits)."""
    zs = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    zt = teacher_logits.to(zs.dtype)
    ls = F.log_softmax(zs / temperature, dim=-1)
    lt = F.log_softmax(zt / temperature, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    if labels is None:
        return kl
    return kl, F.cross_entropy(zs, labels.masked_fill(labels < 0, -100), reduction="none")


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL (and CE with labels) of student logits against a teacher's; see the module docstring."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must be [N, V] of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)} (their vocabularies must match)")
    if labels is not None and labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be [N] = {student_logits.shape[0]}, got {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits.requires_grad:
        raise ValueError("the teacher's logits get no gradient here: compute them under torch.no_grad() (or detach)")
    fused = (triton is not None and student_logits.is_cuda and teacher_logits.is_cuda
             and student_logits.dtype != torch.float64)
    if fused:
        return kl_rows_triton(student_logits, teacher_logits, labels, temperature)
    return kl_rows_reference(student_logits, teacher_logits, labels, temperature)
