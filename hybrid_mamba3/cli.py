"""`hybrid-mamba3` command line. Subcommands: `demo` (build a small hybrid and generate)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch



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
