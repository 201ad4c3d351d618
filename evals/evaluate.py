"""`hybrid-mamba3 eval`: hybrids beside their teacher on lm-eval tasks and held-out perplexity, one table.

For each model (a hybrid directory, or a Llama-style directory or .gguf file such as the teacher): every task's
metrics with their standard errors (lm-eval), held-out perplexity on the given text, its Mamba-3 layout and parameter
count; then each metric as a % of the teacher's (perplexity: teacher / model, so higher is better there too). Writes
eval.json and, where matplotlib is, eval.png (one bar group per metric).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .lm_eval_tasks import lm_eval_scores
from .perplexity import perplexity, tokenize_texts

HIGHER_IS_WORSE = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def load_model(path: str, dtype: torch.dtype, device: str):
    """(model, tokenizer, layout) of a hybrid directory, or of a Llama-style directory / .gguf (all attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..convert import load_source

    p = Path(path)
    if p.is_dir() and (p / "config.json").exists() and AutoConfig.from_pretrained(p).model_type == "hybrid_mamba3":
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(p)
        layout = "".join("A" if m == "attention" else "M" for m in model.config.mixers)
    else:
        model, tokenizer, _ = load_source(path, dtype=dtype)
        layout = "A" * model.config.num_hidden_layers
    if tokenizer is None:
        raise ValueError(f"{path!r} has no tokenizer files: lm-eval and perplexity need them")
    return model.to(device).eval(), tokenizer, layout


def evaluate(models: list[str], tasks: dict[str, str | None], teacher: str | None = None,
             ppl_texts: list[str] | None = None, ppl_tokens: int = 65536, ppl_window: int = 1024,
             batch_size: int = 8, limit: int | None = None, dtype: torch.dtype | None = None,
             device: str | None = None, progress: bool = True) -> dict:
    """Scores of the teacher (first, when given) and each model: {"rows": [...], "teacher": name or None}."""
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    names = ([teacher] if teacher else []) + list(models)
    rows = []
    for name in tqdm(names, desc="models", disable=not progress):
        model, tokenizer, layout = load_model(name, dtype, device)
        row = dict(model=name, teacher=name == teacher, layout=layout, mamba_layers=layout.count("M"),
                   params=sum(p.numel() for p in model.parameters()))
        row["tasks"] = lm_eval_scores(model, tokenizer, tasks, batch_size=batch_size, limit=limit) if tasks else {}
        if ppl_texts:
            ids = tokenize_texts(ppl_texts, tokenizer, ppl_tokens)
            row["perplexity"] = perplexity(model, ids, window=ppl_window, progress=progress)["ppl"]
        rows.append(row)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    _relative_to_teacher(rows)
    return dict(rows=rows, teacher=teacher, tasks=tasks, ppl_tokens=ppl_tokens, ppl_window=ppl_window)


def _relative_to_teacher(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["teacher"]), None)
    if ref is None:
        return
    for r in rows:
        rel = {}
        for task, metrics in r["tasks"].items():
            for metric, value in metrics.items():
                base = ref["tasks"].get(task, {}).get(metric)
                if metric.endswith("_stderr") or base in (None, 0) or value == 0:
                    continue
                rel[f"{task}/{metric}"] = 100 * (base / value if metric in HIGHER_IS_WORSE else value / base)
        if "perplexity" in r and "perplexity" in ref:
            rel["heldout/perplexity"] = 100 * ref["perplexity"] / r["perplexity"]
        r["pct_of_teacher"] = rel


def short_names(paths: list[str]) -> list[str]:
    """Each path's shortest tail of parts that no other path ends with: run/align/student and run/kd/student show as
    align/student and kd/student, run/model as model."""
    parts = [Path(p).parts or (str(p),) for p in paths]
    out = []
    for i, mine in enumerate(parts):
        n = 1
        while n < len(mine) and any(other[-n:] == mine[-n:] for j, other in enumerate(parts) if j != i):
            n += 1
        out.append("/".join(mine[-n:]))
    return out


def table(result: dict) -> str:
    """One line per model: layout, parameters, each metric +- stderr, perplexity, and % of the teacher."""
    cols = sorted({(t, m) for r in result["rows"] for t, ms in r["tasks"].items() for m in ms
                   if not m.endswith("_stderr")})
    head = ["model", "M/L", "params"] + [f"{t}/{m}" for t, m in cols] + ["ppl", "% of teacher (mean)"]
    lines = [head]
    names = short_names([r["model"] for r in result["rows"]])
    for r, name in zip(result["rows"], names):
        cells = [name + (" (teacher)" if r["teacher"] else ""),
                 f"{r['mamba_layers']}/{len(r['layout'])}", f"{r['params'] / 1e6:.1f}M"]
        for t, m in cols:
            v, se = r["tasks"].get(t, {}).get(m), r["tasks"].get(t, {}).get(m + "_stderr")
            cells.append("-" if v is None else f"{v:.4g}" + ("" if se is None or math.isnan(se) else f" ±{se:.2g}"))
        cells.append(f"{r['perplexity']:.3f}" if "perplexity" in r else "-")
        pct = r.get("pct_of_teacher") or {}
        cells.append(f"{sum(pct.values()) / len(pct):.1f}%" if pct else "-")
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def write(result: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result, table=table(result))
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    keys = sorted({k for r in result["rows"] for k in (r.get("pct_of_teacher") or {})})
    if keys:
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(keys)), 4))
        width = 0.8 / len(result["rows"])
        names = short_names([r["model"] for r in result["rows"]])
        for i, (r, name) in enumerate(zip(result["rows"], names)):
            vals = [(r.get("pct_of_teacher") or {}).get(k, 0) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=20, ha="right")
        ax.set_ylabel("% of the teacher")
        ax.axhline(100, color="k", lw=0.5)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=120)
        plt.close(fig)
    return out
