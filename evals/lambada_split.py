"""LAMBADA accuracy split by where the answer is: passages whose last word already occurs earlier in the passage
(a model can copy it from the context) against those where it does not (it must be inferred). A hybrid that lost
exact recall with its replaced attention layers would lose accuracy mostly in the first group.

Accuracy is lm-eval's `lambada_openai` acc: the passage up to its last space is the context, " " + the last word the
target, and a passage counts when greedy decoding gives every target token (`passkey.recalled`: one forward, each
target token the argmax at its position). The context and target are tokenized apart, as lm-eval does when the
context does not end in a space.

    python3 evals/lambada_split.py MODEL... --teacher T --data lambada_openai_test.jsonl [--limit 1500] --out DIR

prints a table and writes DIR/lambada_split.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

GROUPS = ("all", "in_context", "not_in_context")


def passages(texts: list[str], tokenizer) -> list[dict]:
    """{"ids" (the context's tokens), "target" (" " + last word's tokens), "in_context" (the word occurs earlier as a
    whole word)} for each text with a context and a last word."""
    out = []
    for text in texts:
        context, _, word = text.strip().rpartition(" ")
        if not context or not word:
            continue
        out.append(dict(ids=tokenizer(context, add_special_tokens=False)["input_ids"],
                        target=tokenizer(" " + word, add_special_tokens=False)["input_ids"],
                        in_context=re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", context) is not None))
    return out


def read_texts(path: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """The `text` field of each row of a jsonl file; with limit, that many rows drawn at random (seeded), in order."""
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path!r} holds no rows: give LAMBADA's jsonl (one {{\"text\": ...}} a line)")
    if limit is not None and limit < len(texts):
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), limit))]
    return texts


def lambada_split(models: list[str], data: str, teacher: str | None = None, limit: int | None = None, seed: int = 0,
                  dtype: torch.dtype | None = None, device: str | None = None, progress: bool = True) -> dict:
    """{"rows": [{"model", "teacher", "layout", "groups": {group: {"acc", "n"}}}], ...}, the teacher first."""
    from tqdm.auto import tqdm

    from hybrid_mamba3.evals.evaluate import load_model
    from hybrid_mamba3.evals.passkey import recalled

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    texts = read_texts(data, limit, seed)
    rows = []
    for name in ([teacher] if teacher else []) + list(models):
        model, tokenizer, layout = load_model(name, dtype, device)
        hits = {g: [] for g in GROUPS}
        for p in tqdm(passages(texts, tokenizer), desc=Path(str(name)).name, disable=not progress):
            hit = recalled(model, p)
            hits["all"].append(hit)
            hits["in_context" if p["in_context"] else "not_in_context"].append(hit)
        groups = {g: dict(acc=sum(h) / len(h) if h else None, n=len(h)) for g, h in hits.items()}
        rows.append(dict(model=str(name), teacher=name == teacher, layout=layout, groups=groups))
        del model
    return dict(rows=rows, data=Path(data).name, limit=limit, seed=seed)


def table(result: dict) -> str:
    """One line a model: each group's accuracy (and % of the teacher's where there is one) and size."""
    from hybrid_mamba3.evals.passkey import labels

    teacher = next((r for r in result["rows"] if r["teacher"]), None)
    lines = [f"{'model':<44} " + " ".join(f"{g:>22}" for g in GROUPS)]
    for r, name in zip(result["rows"], labels(result)):
        cells = []
        for g in GROUPS:
            acc, n = r["groups"][g]["acc"], r["groups"][g]["n"]
            ref = teacher["groups"][g]["acc"] if teacher and not r["teacher"] else None
            pct = f" {100 * acc / ref:4.0f}%" if acc is not None and ref else ""
            cells.append(f"{'-' if acc is None else f'{acc:.3f}'}{pct} (n={n})".rjust(22))
        lines.append(f"{name[:44]:<44} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="hybrid directories (or other causal LMs)")
    ap.add_argument("--teacher", default=None, help="the teacher: a Hugging Face directory or a .gguf file")
    ap.add_argument("--data", required=True, help="LAMBADA's jsonl (lambada_openai_test.jsonl: a text field a row)")
    ap.add_argument("--limit", type=int, default=None, help="score this many passages drawn at random (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="lambada_split", help="folder for lambada_split.json")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not a.models and not a.teacher:
        ap.error("no model to score: give hybrid directories and/or --teacher")
    result = lambada_split(a.models, a.data, teacher=a.teacher, limit=a.limit, seed=a.seed, progress=not a.no_progress)
    print(table(result))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lambada_split.json").write_text(json.dumps(result, indent=1))
    print(f"written to {out / 'lambada_split.json'}")
    return result


if __name__ == "__main__":
    main()
