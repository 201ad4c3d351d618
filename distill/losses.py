"""Distillation losses, per real token, and never a whole batch of vocabulary-sized logits at once.

- `distillation_loss`: forward KL from the teacher's next-token distribution to the student's (temperature T, the
  usual T^2 scale; optionally only over the teacher's top-k tokens), plus a weighted cross-entropy on the data. Both
  are averaged over the positions that predict a real next token (labels[t + 1] != -100: padding and each document's
  first token, the separators, are out), so the loss does not grow with the sequence length, nor count padding:
  the two defects of reference implementations. The logits are made chunk by chunk of tokens from the final hidden
  states, through the models' own output heads (modules, so ZeRO-3 gathers them); KL and CE are computed per token in
  fp32 (`kernels.kl_div.kl_rows`: one fused pass over the logits on CUDA), and each chunk is recomputed in the
  backward (activation checkpointing, reentrant: the non-reentrant kind checks the recomputed tensors' metadata,
  which ZeRO-3's gathered parameters fail): memory holds one chunk of logits, not a batch. The backward must be
  `.backward()` (reentrant checkpoints do not support `torch.autograd.grad`).
- `alignment_loss`: stage 1's per-layer MSE between each new layer's output and the teacher attention output it
  replaces, normalised by the target's energy (so layers of any scale count alike), averaged over layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.kl_div import kl_rows


def _chunk_terms(hs: torch.Tensor, ht: torch.Tensor, y: torch.Tensor, student_head: nn.Module,
                 teacher_head: nn.Module, temperature: float, top_k: int | None, want_ce: bool) -> torch.Tensor:
    """(KL sum, CE sum) over a chunk of positions, as a 2-vector (fp32; fp64 for fp64 logits)."""
    zs = student_head(hs)
    with torch.no_grad():
        zt = teacher_head(ht)
    if zs.shape[-1] != zt.shape[-1]:
        raise ValueError(f"student and teacher vocabularies differ ({zs.shape[-1]} vs {zt.shape[-1]} logits)")
    if not top_k:  # per-token KL and CE from the logits as they are (fused on CUDA: kernels/triton_kl.py)
        terms = kl_rows(zs, zt, y if want_ce else None, temperature)
        kl, ce = terms if want_ce else (terms, None)
        return torch.stack((kl.sum() * temperature ** 2, ce.sum() if want_ce else kl.new_zeros(())))
    # the teacher's top-k tokens, renormalised; the student's full distribution
    zs = zs.to(torch.promote_types(zs.dtype, torch.float32))
    ls = F.log_softmax(zs / temperature, dim=-1)
    vals, idx = zt.to(zs.dtype).topk(top_k, dim=-1)
    lt = F.log_softmax(vals / temperature, dim=-1)
    kl = (lt.exp() * (lt - ls.gather(-1, idx))).sum()
    ce = F.cross_entropy(zs, y, reduction="sum") if want_ce else zs.new_zeros(())
    return torch.stack((kl * temperature ** 2, ce))


def distillation_loss(student_hidden: torch.Tensor, student_head: nn.Module, teacher_hidden: torch.Tensor,
                      teacher_head: nn.Module, labels: torch.Tensor, *, temperature: float = 1.0,
                      top_k: int | None = None, kl_weight: float = 1.0, ce_weight: float = 0.0,
                      chunk_tokens: int = 2048, num_items: torch.Tensor | int | None = None
                      ) -> tuple[torch.Tensor, dict]:
    """kl_weight x KL + ce_weight x CE, each a mean over the positions t with labels[:, t + 1] != -100; with
    `num_items`, each a sum over those positions divided by num_items instead (the positions of all the micro-batches
    one optimizer step accumulates, so that each token weighs the same whatever micro-batch it fell in).

    student_hidden, teacher_hidden: (B, L, D) final hidden states (after the final norm); the heads map them to
    logits. labels: (B, L) the input ids with -100 where nothing is to be predicted (as causal-LM labels).
    Returns (loss, {"kl": mean KL, "ce": mean CE (0 unless weighted), "tokens": positions counted})."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    valid = labels[:, 1:] != -100
    hs, ht, y = student_hidden[:, :-1][valid], teacher_hidden[:, :-1][valid], labels[:, 1:][valid]
    n = y.numel()
    if n == 0:  # nothing to predict: a zero that keeps the graph (every rank must backpropagate something)
        zero = student_hidden.sum() * 0.0
        return zero, dict(kl=0.0, ce=0.0, tokens=0)
    sums = 0
    for a in range(0, n, chunk_tokens):
        args = (hs[a:a + chunk_tokens], ht[a:a + chunk_tokens], y[a:a + chunk_tokens], student_head, teacher_head,
                temperature, top_k, ce_weight != 0)
        sums = sums + (checkpoint(_chunk_terms, *args, use_reentrant=True) if torch.is_grad_enabled()
                       else _chunk_terms(*args))
    kl, ce = sums / n
    loss = kl_weight * kl + ce_weight * ce
    if num_items is not None:
        loss = loss * (n / num_items)
    return loss, dict(kl=float(kl.detach()), ce=float(ce.detach()), tokens=n)


def alignment_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor],
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over layers of sum((out - target)^2) / sum(target^2), over the real tokens (mask (B, L) True; all
    without a mask), in fp32."""
    if len(outputs) != len(targets) or not outputs:
        raise ValueError(f"need one target per output, got {len(outputs)} outputs and {len(targets)} targets")
    terms = []
    for out, tgt in zip(outputs, targets):
        out, tgt = out.float(), tgt.float()
        if mask is not None:
            out, tgt = out[mask], tgt[mask]
        terms.append((out - tgt).square().sum() / tgt.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()
