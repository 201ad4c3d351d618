#!/usr/bin/env python3
"""The real LoRA SFT run's summary: the runs' reports side by side, and greedy answers of several models to the
held-out questions.

    python3 evals/sft_compare.py --data instructions.jsonl --runs packed=RUN1 unpacked=RUN2 \
        --models teacher=SmolLM2.gguf distilled=DIR sft=RUN1/merged --out OUT/sft_smollm2

RUN is a `hybrid-mamba3 sft` output directory (its sft_report.json). The questions are the first --questions rows of
the held-out split that run made (the same seeded split of --data, from the first run's options), asked through each
model's own chat template. Writes OUT.json (reports: loss before/after, tokens, tokens/s, curve; answers per model)
and OUT.png (the loss curves), and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def held_out_questions(data: list[str], fraction: float, seed: int, n: int) -> list[list[dict]]:
    """The first n held-out conversations without their last (assistant) message: the prompts to answer."""
    from hybrid_mamba3.distill.sft import load_rows

    rows = load_rows(data)
    held = rows.train_test_split(test_size=fraction, seed=seed)["test"] if fraction and len(rows) > 1 else rows
    if "messages" not in held.column_names:
        raise SystemExit(f"--data needs conversations (a messages column), got columns {held.column_names}")
    return [row["messages"][:-1] for row in held.select(range(min(n, len(held))))]


def answers(source: str, prompts: list[list[dict]], max_new_tokens: int, device: str) -> list[str]:
    """Greedy answers of the model at `source` (a directory or .gguf), through its tokenizer's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrid_mamba3.convert import load_source

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if str(source).endswith(".gguf"):  # (a GGUF teacher: its tokenizer and chat template come from the file)
        model, tokenizer, _ = load_source(source, dtype=dtype)
    else:  # a hybrid or Llama directory
        model, tokenizer = AutoModelForCausalLM.from_pretrained(source, dtype=dtype), None
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
    model = model.to(device).eval()
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"].to(device)
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True).strip())
    del model
    return out


def plot(reports: dict, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no PNG: matplotlib not importable ({e})"
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in reports.items():
        ax.plot([c["step"] for c in r["curve"]], [c["loss"] for c in r["curve"]],
                label=f"{name}: held-out {r.get('eval_before', float('nan')):.3f} -> "
                      f"{r.get('eval_after', float('nan')):.3f}, {r.get('tokens_per_s', 0):,.0f} tok/s")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA SFT of the hybrid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    if any("=" not in i for i in items):
        raise SystemExit(f"{flag} takes name=path pairs, got {items}")
    return dict(i.split("=", 1) for i in items)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="the SFT data (as given to hybrid-mamba3 sft)")
    ap.add_argument("--runs", nargs="+", required=True, help="name=sft output directory")
    ap.add_argument("--models", nargs="*", default=[], help="name=model directory or .gguf to answer the questions")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", required=True, help="path without suffix: OUT.json and OUT.png")
    a = ap.parse_args(argv)
    runs, models = _pairs(a.runs, "--runs"), _pairs(a.models, "--models")
    reports = {}
    for name, run in runs.items():
        path = Path(run) / "sft_report.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: --runs takes finished hybrid-mamba3 sft output directories")
        reports[name] = json.loads(path.read_text())
    options = next(iter(reports.values()))["options"]
    prompts = held_out_questions(a.data, options["eval_fraction"], options["seed"], a.questions)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    said = {name: answers(src, prompts, a.max_new_tokens, device) for name, src in models.items()}
    result = dict(reports=reports, questions=[p[-1]["content"] for p in prompts], answers=said)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=1, default=str))
    print(f"{'run':<12} {'held-out before':>16} {'after':>8} {'tokens':>10} {'tokens/s':>10}")
    for name, r in reports.items():
        print(f"{name:<12} {r.get('eval_before', float('nan')):>16.4f} {r.get('eval_after', float('nan')):>8.4f} "
              f"{r.get('tokens', 0):>10} {r.get('tokens_per_s', 0):>10.0f}")
    for i, q in enumerate(result["questions"]):
        print(f"\nQ{i}: {q}")
        for name in said:
            print(f"  {name}: {said[name][i][:200]!r}")
    print(plot(reports, a.out + ".png"))
    return result


if __name__ == "__main__":
    main()
