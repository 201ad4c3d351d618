"""Passkey retrieval (needle in a haystack): can a model recall a key it read far back? The known weak spot of
hybrids, whose Mamba-3 layers hold a fixed-size state instead of every past token.

A prompt of `length` tokens: an instruction, filler text (documents of the given corpus, tokenized, cut to fit), and
at `depth` (0: the start, 1: the end) the needle "The pass key is 71432. Remember it. 71432 is the pass key."; then
"What is the pass key? The pass key is". The model is right when greedy decoding gives the key's tokens, judged as
lm-eval's loglikelihood `acc` is (each target token the argmax at its position), in one forward of prompt + key.
Keys are random 5-digit numbers and the filler starts at a random document, from a seed: every model sees the same
prompts. `hybrid-mamba3 passkey MODEL... --teacher T --filler DIR` scores each model over lengths x depths, prints
a table and writes passkey.json and passkey.png (one accuracy grid per model).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

INTRO = ("There is an important pass key hidden in the text below. Find it and remember it: you will be asked for "
         "it at the end.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def make_prompts(tokenizer, filler: list[str], lengths: list[int], depths: list[float], per_cell: int = 5,
                 seed: int = 0) -> list[dict]:
    """Prompts for every (length, depth): {"length", "depth", "key", "ids" (prompt token ids), "target" (the key's
    ids)}. filler: texts whose tokens fill the prompt (repeated when short)."""
    stream = [t for text in filler if text.strip()
              for t in tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]]
    if not stream:
        raise ValueError("the filler text is empty: give text files or directories with prose in them")
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = []
    for length in lengths:
        for depth in depths:
            if not 0 <= depth <= 1:
                raise ValueError(f"depths are fractions in [0, 1], got {depth}")
            for _ in range(per_cell):
                key = str(rng.randint(10000, 99999))
                needle, fixed = ids(NEEDLE.format(key=key)), bos + ids(INTRO) + ids(QUESTION)
                room = length - len(fixed) - len(needle)
                if room < 1:
                    raise ValueError(f"length {length} leaves no room for filler (the instruction, needle and question "
                                     f"take {len(fixed) + len(needle)} tokens): use longer lengths")
                start = rng.randrange(len(stream))
                fill = [stream[(start + i) % len(stream)] for i in range(room)]
                at = round(depth * room)
                prompt = bos + ids(INTRO) + fill[:at] + needle + fill[at:] + ids(QUESTION)
                prompts.append(dict(length=length, depth=depth, key=key, ids=prompt, target=ids(" " + key)))
    return prompts


@torch.no_grad()
def recalled(model, prompt: dict) -> bool:
    """Whether greedy decoding after the prompt gives the key: one forward over prompt + key, the argmax at each
    position that predicts a key token compared with it."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt["ids"] + prompt["target"]], device=device)
    n = len(prompt["target"])
    logits = model(ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1]
    return bool((logits.argmax(-1).cpu() == torch.tensor(prompt["target"])).all())


def passkey(models: list[str], filler: list[str], lengths: list[int], depths: list[float], teacher: str | None = None,
            per_cell: int = 5, seed: int = 0, dtype: torch.dtype | None = None, device: str | None = None,
            progress: bool = True) -> dict:
    """Accuracy of each model (the teacher first) at each length and depth: {"rows": [{"model", "layout", "grid":
    {length: {depth: accuracy}}, "mean"}], ...}. The prompts are built with each model's own tokenizer."""
    from tqdm.auto import tqdm

    from .evaluate import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    rows = []
    for name in ([teacher] if teacher else []) + list(models):
        model, tokenizer, layout = load_model(name, dtype, device)
        prompts = make_prompts(tokenizer, filler, lengths, depths, per_cell, seed)
        hits: dict = {}
        for p in tqdm(prompts, desc=Path(str(name)).name, disable=not progress):
            hits.setdefault(p["length"], {}).setdefault(p["depth"], []).append(recalled(model, p))
        grid = {L: {d: sum(v) / len(v) for d, v in by_depth.items()} for L, by_depth in hits.items()}
        mean = sum(a for by_depth in grid.values() for a in by_depth.values()) / sum(map(len, grid.values()))
        rows.append(dict(model=str(name), teacher=name == teacher, layout=layout, grid=grid, mean=mean))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return dict(rows=rows, lengths=lengths, depths=depths, per_cell=per_cell, seed=seed)


def labels(result: dict) -> list[str]:
    """Each row's model by the shortest tail of its path that tells it from the others (run1/model, run2/model)."""
    from .evaluate import short_names

    return [name + (" (teacher)" if r["teacher"] else "")
            for r, name in zip(result["rows"], short_names([r["model"] for r in result["rows"]]))]


def table(result: dict) -> str:
    lengths = result["lengths"]
    lines = [f"{'model':<36} {'M/L':>6} " + " ".join(f"{L:>7}" for L in lengths) + f" {'mean':>6}"]
    for r, name in zip(result["rows"], labels(result)):
        per_length = [sum(r["grid"][L].values()) / len(r["grid"][L]) for L in lengths]
        lines.append(f"{name[:36]:<36} {str(r['layout'].count('M')) + '/' + str(len(r['layout'])):>6} "
                     + " ".join(f"{a:>7.2f}" for a in per_length) + f" {r['mean']:>6.2f}")
    return "\n".join(lines)


def write(result: dict, out_dir) -> Path:
    """passkey.json, and passkey.png (accuracy by length x depth, one panel per model) where matplotlib is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    rows = result["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 1, 3.2), squeeze=False)
    for ax, r, name in zip(axes[0], rows, labels(result)):
        grid = [[r["grid"][L][d] for L in result["lengths"]] for d in result["depths"]]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(result["lengths"])), [str(L) for L in result["lengths"]], fontsize=7)
        ax.set_yticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]], fontsize=7)
        ax.set(title=name[-32:], xlabel="tokens", ylabel="depth")
    fig.tight_layout()
    fig.savefig(out / "passkey.png", dpi=120)
    plt.close(fig)
    return out
