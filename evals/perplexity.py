"""Held-out perplexity of a causal LM on texts or token ids, in chunked or sliding windows."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def tokenize_texts(texts: Sequence[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """One stream of token ids: each text tokenized, documents separated by the EOS token."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, data, tokenizer=None, window: int = 1024, stride: int | None = None, max_tokens: int | None = None,
               batch_size: int = 1, device=None, progress: bool = True, desc: str = "perplexity") -> dict:
    """exp(mean next-token NLL) over `data` (a list of texts with `tokenizer`, or a 1-D id tensor / list).

    The stream is cut into windows of `window` tokens starting every `stride` tokens (default: stride =
    window, non-overlapping chunks). With stride < window each window scores only its last `stride` tokens
    and sees the rest as context (the first window scores all of its tokens), so every token is scored
    once. Returns {"ppl", "nll", "tokens", "window", "stride"}.
    """
    from tqdm.auto import tqdm
    if isinstance(data, torch.Tensor):
        ids = data.long().flatten()
    elif len(data) and isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("texts need a tokenizer")
        ids = tokenize_texts(data, tokenizer, max_tokens)
    else:
        ids = torch.as_tensor(list(data), dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window], got {stride} with window {window}")
    if len(ids) < 2:
        raise ValueError("need at least two tokens")
    device = device or next(model.parameters()).device
    # (start, end, first scored target index) per window
    spans = []
    start = 0
    while True:
        end = min(start + window, len(ids))
        first = 1 if start == 0 else max(1, window - stride)
        if end - start > first:
            spans.append((start, end, first))
        if end == len(ids):
            break
        start += stride
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(spans), desc=desc, disable=not progress)
        i = 0
        while i < len(spans):
            group = [s for s in spans[i:i + batch_size] if s[1] - s[0] == spans[i][1] - spans[i][0]] or [spans[i]]
            x = torch.stack([ids[a:b] for a, b, _ in group]).to(device)
            logits = model(x, use_cache=False).logits.float()
            for j, (a, b, first) in enumerate(group):
                lp = F.cross_entropy(logits[j, first - 1:-1], x[j, first:], reduction="sum")
                nll += float(lp)
                count += b - a - first
            i += len(group)
            bar.update(len(group))
            bar.set_postfix(ppl=f"{math.exp(nll / max(count, 1)):.2f}")
        bar.close()
    finally:
        model.train(was_training)
    mean = nll / count
    return dict(ppl=math.exp(mean), nll=mean, tokens=count, window=window, stride=stride)
