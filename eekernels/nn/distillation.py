"""Weighted ensemble self-distillation (MPEE, mpee.txt eq. 11-14).

The exit classifiers' (memory-blended) logits ``C^l_zm`` are the students. An attention
over the students makes the teacher (eq. 12)::

    s_l   = V^T tanh(W_eta C^l_zm + b_eta)          per sample
    eta_l = softmax over l of s_l
    t     = sum_l eta_l C^l_zm

and each student is pulled towards it (eq. 13)::

    L_KD = sum_l tau^2 KL(softmax(C^l_zm / tau) || softmax(t / tau))

The total MPEE loss is ``L = L_CE + L_KD`` (eq. 14) with ``L_CE = sum_l CE(C^l_zm, y)``
(eq. 11). Batch reduction: every cross-entropy and KL term is the mean over the batch;
the sums over exits are plain sums, as in the paper.

KL direction. Eq. 13 as printed is KL(student || teacher); the usual distillation loss
(Hinton et al.) is KL(teacher || student). ``direction`` chooses; the default follows the
paper.

The teacher is a target: in L_KD it is detached, so each student moves towards it and
the teacher is not pulled towards the students (without the detach the term is a
consensus loss that can shrink every exit towards the others, teacher included). The
paper does not say how the attention (W_eta, b_eta, V) learns; here it learns from the
teacher's own cross-entropy with the label, ``CE(t, y)``, computed on detached students,
so only the attention gets that gradient and it learns to weight the exits by how well
they predict (eq. 12's "importance of students to the final prediction"). The total loss
is ``L_CE + L_KD + CE(t, y)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ["AttentionTeacher", "KD_DIRECTIONS", "MPEELoss", "ensemble_distillation_loss", "exit_ce_loss",
           "mpee_loss"]

#: "student_teacher": KL(softmax(C/tau) || softmax(t/tau)) as printed in mpee.txt eq. 13;
#: "teacher_student": KL(softmax(t/tau) || softmax(C/tau)), Hinton-style distillation.
KD_DIRECTIONS = ("student_teacher", "teacher_student")


class TeacherOutput(NamedTuple):
    """Result of :class:`AttentionTeacher`.

    Attributes:
        teacher: [B, C] the attention-combined teacher logits t (mpee.txt eq. 12).
        weights: [E, B] the attention weights eta over the E students (sum to 1 over E).
    """

    teacher: torch.Tensor
    weights: torch.Tensor


class AttentionTeacher(nn.Module):
    """The attention-combined teacher of mpee.txt eq. 12.

    Args:
        num_labels: classes C (the students' logit size).
        attention_dim: size of the attention's hidden projection W_eta (the paper does not
            give it; default 4 * C, at least 16).
    """

    def __init__(self, num_labels: int, attention_dim: Optional[int] = None):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"AttentionTeacher: num_labels must be >= 1, got {num_labels}")
        dim = attention_dim if attention_dim is not None else max(16, 4 * num_labels)
        if dim < 1:
            raise ValueError(f"AttentionTeacher: attention_dim must be >= 1, got {attention_dim}")
        self.proj = nn.Linear(num_labels, dim)  # W_eta, b_eta
        self.context = nn.Linear(dim, 1, bias=False)  # the context vector V

    def forward(self, student_logits: torch.Tensor) -> TeacherOutput:
        """student_logits [E, B, C] (each exit's C^l_zm) -> :class:`TeacherOutput`."""
        if student_logits.dim() != 3 or student_logits.shape[-1] != self.proj.in_features:
            raise ValueError(f"AttentionTeacher: student logits must be [E, B, {self.proj.in_features}], "
                             f"got {tuple(student_logits.shape)}")
        z = student_logits.to(self.proj.weight.dtype)
        score = self.context(torch.tanh(self.proj(z))).squeeze(-1)  # [E, B]
        eta = torch.softmax(score.float(), dim=0)  # over the students, per sample (eq. 12)
        teacher = (eta[..., None] * student_logits.float()).sum(dim=0)
        return TeacherOutput(teacher, eta)


def exit_ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_CE of mpee.txt eq. 11: sum over exits of the batch-mean cross-entropy of softmax(C^l_zm)."""
    e, b, c = student_logits.shape
    flat = student_logits.float().reshape(e * b, c)
    per = nn.functional.cross_entropy(flat, labels.long().repeat(e), reduction="none").view(e, b)
    return per.mean(dim=1).sum()


def ensemble_distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                               direction: str = "student_teacher") -> torch.Tensor:
    """L_KD of mpee.txt eq. 13: sum over exits of tau^2 * batch-mean KL between each student
    [E, B, C] and the teacher [B, C] at temperature tau (``direction``: see module docs)."""
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"ensemble_distillation_loss: direction must be one of {KD_DIRECTIONS}, got {direction!r}")
    if not temperature > 0:
        raise ValueError(f"ensemble_distillation_loss: temperature must be > 0, got {temperature}")
    if student_logits.dim() != 3 or tuple(teacher.shape) != tuple(student_logits.shape[1:]):
        raise ValueError(f"ensemble_distillation_loss: students must be [E, B, C] and the teacher [B, C], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher.shape)}")
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)[None].expand_as(log_s)
    if direction == "student_teacher":
        kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1)  # KL(p_student || p_teacher), eq. 13 as printed
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return temperature ** 2 * kl.mean(dim=1).sum()


class MPEELoss(NamedTuple):
    """The MPEE loss and its parts: ``loss = ce + kd + teacher_ce`` (mpee.txt eq. 14, and
    the attention's own loss, see the module docs); ``teacher`` [B, C] is t (eq. 12)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    teacher_ce: torch.Tensor
    teacher: torch.Tensor


def mpee_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_module: AttentionTeacher,
              temperature: float = 1.0, direction: str = "student_teacher") -> MPEELoss:
    """L = L_CE + L_KD (mpee.txt eq. 11-14) for student logits [E, B, C] and labels [B],
    with the teacher t (eq. 12) detached in L_KD, plus CE(t, y) on detached students, which
    trains the teacher's attention alone."""
    teacher = teacher_module(student_logits.detach()).teacher
    ce = exit_ce_loss(student_logits, labels)
    kd = ensemble_distillation_loss(student_logits, teacher.detach(), temperature, direction)
    teacher_ce = nn.functional.cross_entropy(teacher, labels.long())
    return MPEELoss(ce + kd + teacher_ce, ce, kd, teacher_ce, teacher)
