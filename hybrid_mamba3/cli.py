"""`hybrid-mamba3` command line. Subcommands: `demo` (build a small hybrid and generate), `convert` (a Llama
checkpoint into a hybrid, Mamba-3 layers initialised from attention), `distill`, `eval`, `sft` (LoRA fine-tuning with
TRL) and `sft-data` (an offline instruction dataset from documentation)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch



def parse_dt_grid(text: str) -> tuple[float, ...]:
    from .convert import dt_grid_values
    try:
        return dt_grid_values(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_layers(text: str):
    """'0.5' -> fraction, '1,5,9' -> indices, 'AAM' -> pattern."""
    text = text.strip()
    if set(text.upper()) <= {"A", "M"}:
        return text
    if "," in text or text.lstrip("-").isdigit():
        return [int(t) for t in text.split(",") if t.strip()]
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mamba-layers takes a fraction (0.5), indices (1,5,9) or an A/M pattern (AAM), got {text!r}") from None


def parse_convert_layers(text: str):
    """Like parse_layers, plus 'auto:<fraction>' for the data-driven choice."""
    if text.strip().lower().startswith("auto"):
        return text.strip().lower()
    return parse_layers(text)


def read_calibration(paths: Sequence[str]) -> list[str]:
    """Texts from files, or from every file under the given directories (sorted, so the order is fixed).
    HTML files are reduced to their text."""
    from pathlib import Path
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"calibration path {str(p)!r} does not exist")
    from .evals.text import read_texts
    texts = read_texts(files)
    if not texts:
        raise ValueError(f"no calibration text found in {list(paths)}")
    return texts


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert import DT_GRID, convert_llama, format_summary, save_hybrid
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{str(out)!r} exists; pass --overwrite to replace it")
    texts = read_calibration(args.calibration) if args.calibration else None
    options = dict(chunk_size=args.chunk_size, rope_fraction=args.rope_fraction, a_activation=args.a_activation)
    if args.ngroups is not None:
        options["ngroups"] = args.ngroups
    if args.siso:
        options["is_mimo"] = False
    else:
        options["mimo_rank"] = args.mimo_rank
    t0 = time.perf_counter()
    model, report = convert_llama(args.source, mamba_layers=args.mamba_layers, placement=args.placement,
                                  init=args.init, calibration_texts=texts, select=args.select, dtype=args.dtype,
                                  calibration_seq_len=args.calibration_seq_len,
                                  calibration_num_seqs=args.calibration_num_seqs, seed=args.seed,
                                  dt_grid=args.dt_grid or DT_GRID, progress=not args.no_progress, **options)
    tokenizer = None
    if not args.no_tokenizer:
        from .convert import load_tokenizer
        tokenizer = load_tokenizer(args.source)
    t1 = time.perf_counter()
    path = save_hybrid(model, out, tokenizer=tokenizer, report=report, overwrite=args.overwrite,
                       remote_code=not args.no_remote_code)
    report["times"]["save_s"] = round(time.perf_counter() - t1, 2)
    report["times"]["cli_total_s"] = round(time.perf_counter() - t0, 2)
    for target in [path / "conversion_report.json"] + ([Path(args.report)] if args.report else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=1, default=str))
    print(format_summary(report))
    print(f"saved to {path}{' (with tokenizer)' if tokenizer is not None else ''}; "
          "load with AutoModelForCausalLM.from_pretrained (import hybrid_mamba3 first, or trust_remote_code=True)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import LlamaConfig

    from . import HybridMamba3Config, HybridMamba3ForCausalLM
    from .configs import load_config
    torch.manual_seed(args.seed)
    llama = LlamaConfig(**load_config(args.layout)["llama"])
    if args.layers:
        llama.num_hidden_layers = args.layers
    cfg = HybridMamba3Config.from_llama(llama, args.mamba_layers, placement=args.placement, d_state=args.d_state,
                                        mimo_rank=args.mimo_rank, is_mimo=args.mimo_rank > 1 or args.mimo,
                                        chunk_size=args.chunk_size)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = HybridMamba3ForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()
    built = time.perf_counter() - t0
    kinds = "".join("M" if k == "linear_attention" else "A" for k in cfg.layer_types)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"hybrid of SmolLM2-135M's shape (random weights): {cfg.num_hidden_layers} layers, {len(cfg.mamba_layers)} "
          f"Mamba-3 ({'MIMO R=%d' % cfg.mamba_mimo_rank if cfg.mamba_is_mimo else 'SISO'}), layout {kinds}")
    print(f"parameters: {n_params / 1e6:.1f} M, built in {built:.1f} s on {args.device} ({args.dtype})")
    prompt = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), device=args.device)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                             min_new_tokens=args.max_new_tokens)
        took = time.perf_counter() - t0
        full = model(out[:, :-1]).logits[:, args.prompt_len - 1:].argmax(-1)  # no cache: same greedy tokens?
    new = out[:, args.prompt_len:]
    backends = {layer.mamba.last_backend for layer in model.model.layers if hasattr(layer, "mamba")}
    print(f"generated {new.shape[1]} tokens x batch {args.batch} in {took:.2f} s "
          f"({new.numel() / took:.1f} tok/s; Mamba-3 backend: {', '.join(sorted(b for b in backends if b))})")
    print(f"cached decoding == uncached forward: {bool(torch.equal(full, new))}")
    print("first sequence's new token ids:", new[0].tolist())
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved to {args.save} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def run_options(args: argparse.Namespace, options: type):
    """A run's options (DistillOptions, SFTOptions): the --config recipe's keys, the flags given over them."""
    from dataclasses import fields

    from .distill.options import load_recipe
    given = {f.name: getattr(args, f.name) for f in fields(options) if hasattr(args, f.name)}
    recipe = load_recipe(args.config, options) if args.config else {}
    return options(**{**recipe, **given})


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill.options import DistillOptions
    from .distill.run import distill
    result = distill(run_options(args, DistillOptions))
    if int(os.environ.get("RANK", "0")) != 0:  # a distributed launch: the first rank reports
        return 0
    report = json.loads((result / "distill_report.json").read_text())
    before, after = report.get("eval_before") or {}, report.get("eval_after") or {}
    if before and after:
        print(f"held-out perplexity: teacher {before['teacher']:.2f}, student {before['student']:.2f} -> "
              f"{after['student']:.2f} ({after['ratio']:.3f}x the teacher's)")
    print(f"distilled hybrid saved to {result}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from .convert import load_tokenizer
    from .distill.data import build_shards, iter_documents
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{str(out)!r} is not empty: choose another --out, or pass --overwrite to replace it")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"no tokenizer in {args.tokenizer!r}: give the teacher's directory or .gguf file")
    metas = build_shards(iter_documents(args.data), tokenizer, args.out, heldout=args.heldout, seed=args.seed,
                         max_tokens=args.max_tokens, progress=not args.no_progress)
    print(", ".join(f"{split}: {m['tokens']:,} tokens in {m['documents']:,} documents" for split, m in metas.items()))
    print(f"written to {args.out} (distill --data {args.out})")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from .distill.sft import sft
    from .distill.sft_options import SFTOptions
    out = sft(run_options(args, SFTOptions))
    if int(os.environ.get("RANK", "0")) != 0:  # a distributed launch: the first rank reports
        return 0
    report = json.loads((out / "sft_report.json").read_text())
    if "eval_before" in report:
        print(f"held-out loss {report['eval_before']:.4f} -> {report['eval_after']:.4f}")
    print(f"adapter saved to {out / 'adapter'}" + (f", merged model to {out / 'merged'}" if (out / "merged").exists()
                                                    else ""))
    return 0


def cmd_sft_data(args: argparse.Namespace) -> int:
    from .distill.instructions import build_instructions
    counts = build_instructions(args.sources, args.out, min_chars=args.min_chars, max_chars=args.max_chars,
                                seed=args.seed, max_rows=args.max_rows)
    print(f"{counts['rows']} question/answer conversations from {counts['files']} files written to {counts['path']}")
    return 0


def parse_tasks(items: Sequence[str]) -> dict:
    """["lambada_openai_local=PATH", "hellaswag"] -> {name: path or None}."""
    out = {}
    for item in items:
        name, _, path = item.partition("=")
        out[name] = path or None
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from .evals.evaluate import evaluate, table, write
    texts = read_calibration(args.perplexity) if args.perplexity else None
    if not args.tasks and not texts:
        raise ValueError("nothing to measure: give --tasks and/or --perplexity")
    result = evaluate(args.models, parse_tasks(args.tasks or []), teacher=args.teacher, ppl_texts=texts,
                      ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window, batch_size=args.batch_size,
                      limit=args.limit, progress=not args.no_progress)
    print(table(result))
    print(f"written to {write(result, args.out)}")
    return 0


def _add_option_flags(d: argparse.ArgumentParser, options: type, helps: dict) -> None:
    """One flag per field of the options dataclass; only the flags given override the recipe (--config)."""
    from dataclasses import MISSING, fields

    S = argparse.SUPPRESS
    for f in fields(options):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.name == "data":
            d.add_argument(flag, nargs="+", default=S, help=helps[f.name])
        elif "bool" in f.type:
            d.add_argument(flag, action=argparse.BooleanOptionalAction, default=S, help=helps.get(f.name))
        elif f.name == "mamba_layers":
            d.add_argument(flag, type=parse_convert_layers, default=S, help="for the conversion, as in convert")
        else:  # the annotation says (a string: the module postpones annotations): "int | None", "float", ...
            kind = int if "int" in f.type else float if "float" in f.type else str
            d.add_argument(flag, type=kind, default=S, help=f"{helps.get(f.name, '')} (default {default})".strip())


def cmd_passkey(args: argparse.Namespace) -> int:
    from .evals.passkey import passkey, table, write
    if not args.models and not args.teacher:
        raise ValueError("no model to score: give hybrid directories and/or --teacher")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    result = passkey(args.models, read_calibration(args.filler), lengths, depths, teacher=args.teacher,
                     per_cell=args.per_cell, seed=args.seed, progress=not args.no_progress)
    print(table(result))
    print(f"written to {write(result, args.out)}")
    return 0


def _add_distill_flags(d: argparse.ArgumentParser) -> None:
    from .distill.options import DistillOptions
    helps = {"teacher": "Hugging Face directory or .gguf file of the Llama-style teacher",
             "student": "a converted hybrid directory (default: convert the teacher with --mamba-layers ...)",
             "data": "text files, directories (HTML stripped), .jsonl files, a shard directory, or teacher:N "
                     "(N tokens of documents sampled from the teacher)",
             "stage": "align (layer alignment), kd (end-to-end distillation) or both",
             "tokens": "training tokens of stage kd", "align_tokens": "training tokens of stage align",
             "train": "what stage kd trains: mamba, mamba+mlp, all, or lora (the mixers + LoRA on the kept layers)",
             "deepspeed": "a DeepSpeed JSON config (e.g. configs/ds_zero2.json)",
             "fsdp": "FSDP2 through accelerate: the student sharded over the ranks (torchrun / accelerate launch)",
             "dt_grid": "comma-separated dt values the conversion's attention-init fit chooses from (default: "
                        "convert.DT_GRID)",
             "ddp_timeout": "seconds a rank waits in a collective before the run fails (a dead rank ends the run)",
             "ngroups": "B/C groups of the converted layers: a divisor of the head count, or kv (the key/value head "
                        "count: smaller layers, the same function at init); default one per head",
             "attn_implementation": "attention of teacher and student: sdpa, flex_attention, flash_attention_2 or "
                                    "eager (packed rows: sdpa takes a 4D mask, the others the boundaries)",
             "torch_compile": "stage kd's student under torch.compile (TrainingArguments' torch_compile): ~1 min of "
                              "compiling first, then a faster step",
             "resume": "continue the run in --output-dir from its newest complete checkpoint"}
    _add_option_flags(d, DistillOptions, helps)


def _add_sft_flags(d: argparse.ArgumentParser) -> None:
    from .distill.sft_options import SFTOptions
    helps = {"model": "the hybrid directory to fine-tune (with its tokenizer)",
             "data": ".jsonl files (messages, prompt/completion or text rows) or a saved dataset directory",
             "mode": "sft (TRL's SFTTrainer) or gkd (on-policy distillation from --teacher)",
             "teacher": "gkd: the original Llama (directory or .gguf)",
             "lora_targets": "mamba, attention, mlp, all, or several joined by +",
             "chat_template": "a .jinja file or a shipped template name (smollm2_assistant)",
             "assistant_only_loss": "loss on the assistant's tokens only (a chat template with generation markers)",
             "completion_only_loss": "loss on the completion only (prompt/completion rows)",
             "packing": "TRL's best-fit packing into padding-free rows", "padding_free": "TRL's padding-free rows",
             "max_steps": "optimizer steps (instead of --epochs)", "eval_fraction": "rows held out and scored",
             "deepspeed": "a DeepSpeed JSON config (e.g. configs/ds_zero3.json)",
             "merge": "also save the model with the adapter merged (OUTPUT_DIR/merged)",
             "resume": "continue the run in --output-dir from its newest complete checkpoint"}
    _add_option_flags(d, SFTOptions, helps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid-mamba3", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build a small hybrid (SmolLM2-135M's shape, random weights) and generate")
    d.add_argument("--mamba-layers", type=parse_layers, default=0.5,
                   help="fraction (0.5), indices (1,5,9) or A/M pattern (AAM); default 0.5")
    d.add_argument("--placement", default="even", choices=["even", "first", "last"])
    d.add_argument("--layout", default="smollm2_135m.yaml", help="bundled Llama layout (configs/)")
    d.add_argument("--layers", type=int, default=None, help="use only this many layers (faster)")
    d.add_argument("--d-state", type=int, default=64)
    d.add_argument("--mimo-rank", type=int, default=4)
    d.add_argument("--mimo", action="store_true", help="MIMO layout even at rank 1")
    d.add_argument("--chunk-size", type=int, default=16)
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--prompt-len", type=int, default=32)
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--save", default=None, help="directory to save the hybrid to")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", help="convert a Llama/Mistral/Qwen2 checkpoint into a hybrid")
    c.add_argument("source", help="Hugging Face model directory or .gguf file")
    c.add_argument("out", help="output directory (written atomically)")
    c.add_argument("--mamba-layers", type=parse_convert_layers, default=0.25,
                   help="fraction (0.25), indices (1,5,9), A/M pattern (AAM), or auto:<fraction> to replace the "
                        "layers that matter least on the calibration text; default 0.25")
    c.add_argument("--placement", default="even", choices=["even", "first", "last"], help="for a fraction")
    c.add_argument("--select", default="kl", choices=["kl", "ce", "layer_output"],
                   help="auto: score by the model's output KL to the teacher, by the increase in next-token "
                        "cross-entropy on the calibration text, or by the layer's output change")
    c.add_argument("--calibration", nargs="+", default=None, help="text files or directories (html is stripped)")
    c.add_argument("--calibration-seq-len", type=int, default=256)
    c.add_argument("--calibration-num-seqs", type=int, default=8)
    c.add_argument("--dt-grid", type=parse_dt_grid, default=None,
                   help="comma-separated dt values the attention-init fit chooses from (default: convert.DT_GRID)")
    c.add_argument("--init", default="attention", choices=["attention", "random"])
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved hybrid (auto: the source's); Mamba-3 decay/norm/MIMO params stay fp32")
    c.add_argument("--mimo-rank", type=int, default=4)
    c.add_argument("--siso", action="store_true", help="SISO Mamba-3 (no MIMO)")
    c.add_argument("--ngroups", default=None,
                   help="B/C groups: a divisor of the attention head count, or kv (the key/value head count); "
                        "default one per head. kv makes a smaller, faster layer that starts out computing the same")
    c.add_argument("--rope-fraction", type=float, default=0.5, choices=[0.5, 1.0])
    c.add_argument("--chunk-size", type=int, default=16)
    c.add_argument("--a-activation", default="softplus", choices=["softplus", "heavy_tail"])
    c.add_argument("--report", default=None, help="also write the report here (default: <out>/conversion_report.json)")
    c.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files")
    c.add_argument("--no-remote-code", action="store_true",
                   help="write no remote-code stubs (auto_map): nothing asks to run code when the directory is read "
                        "without hybrid_mamba3 imported (AutoTokenizer does ask otherwise), but only processes that "
                        "import hybrid_mamba3 can load the model")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="lm-eval tasks and held-out perplexity of hybrids beside their teacher",
                       description="Scores each model (hybrid directories; Llama-style directories or .gguf files) "
                                   "with lm-eval (offline tasks shipped in evals/tasks, or any lm-eval task name) and "
                                   "held-out perplexity; one table, eval.json and eval.png in --out.")
    e.add_argument("models", nargs="*", help="hybrid directories (or other causal LMs) to score")
    e.add_argument("--teacher", default=None, help="the teacher (directory or .gguf): scored first, the 100%% mark")
    e.add_argument("--tasks", nargs="+", default=None,
                   help="lambada_openai_local=PATH, multiple_choice_local=PATH, or lm-eval task names")
    e.add_argument("--perplexity", nargs="+", default=None, help="held-out text files or directories (HTML stripped)")
    e.add_argument("--ppl-tokens", type=int, default=65536)
    e.add_argument("--ppl-window", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    e.add_argument("--out", default="eval_out")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    k = sub.add_parser("passkey", help="passkey retrieval (needle in a haystack) of hybrids beside their teacher",
                       description="Accuracy of recalling a 5-digit key hidden at each depth of prompts of each "
                                   "length; a table, passkey.json and passkey.png in --out.")
    k.add_argument("models", nargs="*", help="hybrid directories (or other causal LMs) to score")
    k.add_argument("--teacher", default=None, help="the teacher (directory or .gguf), scored first")
    k.add_argument("--filler", nargs="+", required=True, help="text files or directories whose text fills the prompts")
    k.add_argument("--lengths", default="1024,4096,16384,32768", help="prompt lengths in tokens, comma-separated")
    k.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (0: start, 1: end), comma-separated")
    k.add_argument("--per-cell", type=int, default=5, help="prompts per length and depth")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", default="passkey_out")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=cmd_passkey)

    s = sub.add_parser("shards", help="tokenize text once into packed token shards (train, heldout) for distill",
                       description="Token shards that distill --data reads without tokenizing again.")
    s.add_argument("--tokenizer", required=True, help="the teacher: a Hugging Face directory or a .gguf file")
    s.add_argument("--data", nargs="+", required=True,
                   help="text files, directories (HTML stripped, .gz read), .jsonl files")
    s.add_argument("--out", required=True, help="the shard directory to write (train/, heldout/)")
    s.add_argument("--heldout", type=float, default=0.01, help="fraction of documents held out")
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_shards)

    d = sub.add_parser("distill", help="distil a converted hybrid from its Transformer teacher (align, then KD)",
                       description="Layer alignment then end-to-end knowledge distillation on transformers' Trainer, "
                                   "resumable; the result is OUTPUT_DIR/model. Flags override a --config recipe.")
    d.add_argument("--config", default=None, help="a YAML recipe: a path, or the name of one in configs/")
    _add_distill_flags(d)
    d.set_defaults(func=cmd_distill)

    s = sub.add_parser("sft", help="LoRA fine-tuning of a hybrid with TRL (SFT, or on-policy distillation: gkd)",
                       description="TRL's SFTTrainer (or GKDTrainer) with a LoRA adapter on the chosen parts of the "
                                   "hybrid; writes OUTPUT_DIR/adapter, OUTPUT_DIR/merged and sft_report.json. Flags "
                                   "override a --config recipe.")
    s.add_argument("--config", default=None, help="a YAML recipe: a path, or the name of one in configs/")
    _add_sft_flags(s)
    s.set_defaults(func=cmd_sft)

    q = sub.add_parser("sft-data", help="an offline instruction dataset (.jsonl) from documentation sections",
                       description="One question/answer conversation per documentation section (HTML h1-h4, "
                                   "Markdown, reStructuredText; a .txt file is one section).")
    q.add_argument("sources", nargs="+", help="documentation files or directories")
    q.add_argument("--out", required=True, help="the .jsonl file to write")
    q.add_argument("--min-chars", type=int, default=200, help="skip sections with less text")
    q.add_argument("--max-chars", type=int, default=1200, help="answers are cut at a sentence end before this")
    q.add_argument("--max-rows", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_sft_data)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"hybrid-mamba3: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
