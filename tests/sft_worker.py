"""One `hybrid_mamba3.distill.sft.sft` run of a few steps on tiny models, for tests that need their own process
(DeepSpeed): `python tests/sft_worker.py OUT.json [ds_zero2|ds_zero3|none] [sft|gkd]`.
sft: LoRA on every part, packed rows, assistant-only loss. gkd: on-policy distillation from the tiny Llama (every step
generates). Writes the logged losses, the saved adapter's LoRA B norms, whether the merged model loads, and (ZeRO-3)
what the end of training saw: the B/C norm weights partitioned, and greedy generation through the partitioned model
(its hooks gathering each module's parameters) equal to generation with every parameter gathered."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from safetensors.torch import load_file  # noqa: E402
from test_distill import _teacher  # noqa: E402
from test_model import hybrid  # noqa: E402
from test_sft import chat_tokenizer, conversations  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from hybrid_mamba3 import mamba3  # noqa: E402
from hybrid_mamba3.convert import convert_llama  # noqa: E402
from hybrid_mamba3.distill.sft import sft  # noqa: E402
from hybrid_mamba3.distill.sft_options import SFTOptions  # noqa: E402

out, ds, mode = sys.argv[1], sys.argv[2], sys.argv[3]
config = None if ds == "none" else str(Path(__file__).resolve().parents[1] / "configs" / f"{ds}.json")
work = Path(out).parent / f"work-{ds}-{mode}"
work.mkdir(parents=True, exist_ok=True)
if ds == "ds_zero3" and mode == "gkd":
    # every parameter partitioned: ZeRO-3 keeps those under stage3_param_persistence_threshold elements (1e5 by
    # default; the B/C norm weights have d_state) whole on every rank, which would hide a read that skips its module
    ds_config = json.loads(Path(config).read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config = str(work / "ds_zero3_partition_all.json")
    Path(config).write_text(json.dumps(ds_config))
torch.manual_seed(0)
tok = chat_tokenizer()
if mode == "gkd":
    teacher = _teacher()
    teacher.save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    model, _ = convert_llama(teacher, mamba_layers=[1, 3], init="attention", d_state=16, mimo_rank=2, chunk_size=8,
                             progress=False)
else:
    model = hybrid((1, 3))
model.save_pretrained(work / "model")
tok.save_pretrained(work / "model")
conversations(16, turns=2).to_json(work / "chat.jsonl", lines=True)
probe = {}


class Probe(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        if ds != "ds_zero3":
            return
        import deepspeed

        layer = model.get_base_model().model.layers[1].mamba
        probe["norms_partitioned"] = mamba3._partitioned(layer.B_norm.weight, layer.C_norm.weight)
        prompt = torch.tensor([[0, 0, 4, 6, 20, 30, 5, 4, 7], [4, 6, 11, 12, 13, 14, 5, 4, 7]])
        mask = (prompt != 0).long()
        model.eval()
        kw = dict(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
        with torch.no_grad():
            hooks = model.generate(**kw)
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                gathered = model.generate(**kw)
        probe["same_generation"] = torch.equal(hooks.sequences, gathered.sequences)
        probe["scores_diff"] = max(float((a - b).abs().max()) for a, b in zip(hooks.scores, gathered.scores))


result = sft(SFTOptions(
    model=str(work / "model"), data=[str(work / "chat.jsonl")], output_dir=str(work / "run"), mode=mode,
    teacher=str(work / "teacher") if mode == "gkd" else None, lora_targets="all", lora_r=4, lora_alpha=8,
    chat_template="smollm2_assistant", assistant_only_loss=mode == "sft", packing=mode == "sft", max_steps=3,
    batch_size=4, lr=1e-2, warmup_ratio=0.0, max_length=64, logging_steps=1, eval_fraction=0.25, deepspeed=config,
    bf16=False, lmbda=1.0, max_new_tokens=4, progress=False), callbacks=[Probe()])
if int(os.environ.get("RANK", "0")) == 0:
    report = json.loads((result / "sft_report.json").read_text())
    adapter = load_file(result / "adapter" / "adapter_model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(result / "merged")
    Path(out).write_text(json.dumps(dict(
        losses=[c["loss"] for c in report["curve"]], eval=[report["eval_before"], report["eval_after"]],
        lora_b=[float(v.norm()) for k, v in adapter.items() if "lora_B" in k], n_adapter=len(adapter),
        merged=type(merged).__name__, **probe)))
