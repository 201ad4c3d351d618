"""Batch- and length-bucketed generation: one static cache, and so one compiled decode step, per bucket.

transformers' `generate(cache_implementation="static")` builds a new `StaticCache` for each call, sized to that call's
batch and `prompt + max_new_tokens`. On a GPU it compiles the decode step (CUDA graphs), and a new batch size or cache
length is a new shape: a recompile and a new capture (~17 s for the 1B shape on an H100, `evals/bench_model.py`'s
`decode_warmup_s`). A server sees every batch size. `BucketedGenerator` rounds the batch up to the next bucket
(repeating the last row, whose copies finish when it does and are dropped from the output) and the cache length up
to a multiple of `length_multiple`, and keeps one `StaticCache` per (rows, length), reset before each call: calls
that fall into one bucket reuse the cache's tensors at the same addresses and the same compiled step, with no
recompile and no re-capture. Everything else is `generate()`'s own (sampling, stopping, beams, streamers).
"""

from __future__ import annotations

import torch
from transformers import StaticCache

from .cache import CACHE_KWARG


class BucketedGenerator:
    """`generate()` through static caches kept per bucket.

        gen = BucketedGenerator(model, batch_buckets=(1, 2, 4, 8, 16, 32, 64), length_multiple=256)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)   # left padding, as usual

    Batches larger than the largest bucket run at their own size. The output holds the caller's rows only (times
    num_return_sequences / num_beams, as generate() returns them)."""

    def __init__(self, model, batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), length_multiple: int = 256):
        if not batch_buckets or any(not isinstance(b, int) or b < 1 for b in batch_buckets):
            raise ValueError(f"batch_buckets must be positive ints, got {batch_buckets!r}")
        if not isinstance(length_multiple, int) or length_multiple < 1:
            raise ValueError(f"length_multiple must be a positive int, got {length_multiple!r}")
        self.model = model
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self.length_multiple = length_multiple
        self.caches: dict[tuple[int, int], StaticCache] = {}

    def bucket(self, batch: int) -> int:
        """The rows a batch of `batch` prompts runs as."""
        return next((b for b in self.batch_buckets if b >= batch), batch)

    def cache_length(self, prompt_length: int, max_new_tokens: int) -> int:
        need = prompt_length + max_new_tokens
        return -(-need // self.length_multiple) * self.length_multiple

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        for name in ("cache_implementation", "cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise ValueError(f"BucketedGenerator brings its own static caches: do not pass {name}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, prompt length), got shape {tuple(input_ids.shape)}")
        config = self.model.generation_config
        new, length = kwargs.pop("max_new_tokens", None), kwargs.pop("max_length", None)
        new = new or config.max_new_tokens
        if new is None:  # generate() counts max_length from the start of the prompt
            new = max((length or config.max_length) - input_ids.shape[1], 1)
        batch = input_ids.shape[0]
        rows = self.bucket(batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if rows > batch:  # the last prompt again: a real sequence, so its rows stop when it stops
            extra = rows - batch
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(extra, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(extra, -1)])
        key = (rows, self.cache_length(input_ids.shape[1], new))
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = StaticCache(config=self.model.config, max_cache_len=key[1])
        else:
            cache.reset()
        out = self.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new,
                                  **{CACHE_KWARG: cache}, **kwargs)
        per_prompt = out.shape[0] // rows  # num_return_sequences / beams: generate() keeps each prompt's rows together
        return out[: batch * per_prompt]
