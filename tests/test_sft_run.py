"""`hybrid-mamba3 sft` and `sft-data` end to end on tiny models (CPU): an instruction set from documentation, a recipe
run that leaves an adapter and a merged hybrid, on-policy distillation (TRL's GKD) with left-padded generation inside
training, and the errors that come before any training."""

import json

import pytest
import torch
from peft import PeftModel
from test_distill import _teacher
from test_model import hybrid
from test_sft import chat_tokenizer, conversations
from transformers import AutoModelForCausalLM

from hybrid_mamba3.cli import main
from hybrid_mamba3.convert import convert_llama

FLAGS = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--max-length", "64", "--logging-steps", "1",
         "--eval-fraction", "0.25", "--no-progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """root/hybrid: a tiny hybrid; root/teacher + root/student: a tiny Llama and its conversion; all with the chat
    tokenizer; root/chat.jsonl: 16 conversations."""
    root = tmp_path_factory.mktemp("sft_run")
    torch.manual_seed(0)  # the same tiny models in every run (the held-out loss must fall in 3 steps)
    tok = chat_tokenizer()
    hybrid((1, 3)).save_pretrained(root / "hybrid")
    teacher = _teacher()
    teacher.save_pretrained(root / "teacher")
    student, _ = convert_llama(teacher, mamba_layers=[1, 3], init="attention", d_state=16, mimo_rank=2,
                               chunk_size=8, progress=False)
    student.save_pretrained(root / "student")
    for name in ("hybrid", "teacher", "student"):
        tok.save_pretrained(root / name)
    conversations(16, turns=2).to_json(root / "chat.jsonl", lines=True)
    return root


def test_sft_data_builds_conversations_from_documentation_sections(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    body = "This sentence explains the thing in some detail. " * 8
    (docs / "page.html").write_text(f"<html><head><title>x</title></head><body><div role='main'><h1>Widgets</h1><p>"
                                    f"{body}</p><h2>Making widgets<a>\u00b6</a></h2><p>{body}</p><h2>Short</h2><p>no"
                                    "</p></div></body></html>")
    (docs / "guide.md").write_text(f"# Guide\n\n{body}\n\n## Install\n\n{body}\n")
    (docs / "ref.rst").write_text(f"Reference\n=========\n\n{body}\n")
    (docs / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "instructions.jsonl"
    assert main(["sft-data", str(docs), "--out", str(out), "--min-chars", "100", "--max-chars", "120"]) == 0
    assert "5 question/answer conversations from 3 files" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = [r["messages"][0]["content"] for r in rows]
    assert any("Making widgets" in q and "Widgets" in q for q in questions)  # heading and page title
    assert not any("Short" in q for q in questions)  # too little text
    for r in rows:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"].startswith("This sentence") and assistant["content"].endswith("detail.")
        assert len(assistant["content"]) <= 120  # cut at a sentence end


def test_sft_recipe_run_leaves_an_adapter_and_a_merged_hybrid(models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora-targets: mamba+mlp\nlora_r: 4\nlora_alpha: 8\nchat_template: smollm2_assistant\n"
                      "assistant_only_loss: true\npacking: true\nbatch_size: 2\n")
    out = tmp_path / "run"
    assert main(["sft", "--config", str(recipe), "--model", str(models / "hybrid"), "--data",
                 str(models / "chat.jsonl"), "--output-dir", str(out), *FLAGS]) == 0
    assert "held-out loss" in capsys.readouterr().out
    report = json.loads((out / "sft_report.json").read_text())
    assert report["options"]["batch_size"] == 4 and report["options"]["packing"]  # the flag over the recipe
    assert report["lora_targets"] == 2 * 2 + 4 * 3 and len(report["curve"]) == 3
    assert report["eval_after"] < report["eval_before"]
    assert 0 < report["tokens"] <= 3 * 4 * 64 and report["tokens_per_s"] > 0  # steps x rows x max_length at most
    assert 0 < report["train_seconds"] < report["seconds"]
    ids = torch.randint(9, 97, (2, 11))
    base = AutoModelForCausalLM.from_pretrained(models / "hybrid").eval()
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    scale = base_logits.abs().max()
    assert (merged - adapted).abs().max() < 1e-5 * scale < (adapted - base_logits).abs().max()
    assert (out / "adapter" / "chat_template.jinja").exists()


def test_gkd_generates_from_left_padded_prompts_inside_training(models, tmp_path, monkeypatch):
    """mode gkd: TRL's GKDTrainer (trl.experimental.gkd in TRL 1.x), teacher the tiny Llama, student its hybrid
    with LoRA; lmbda 1: every step trains on the student's own completions of left-padded prompts."""
    from trl.experimental.gkd import GKDTrainer

    seen = []
    generate = GKDTrainer.generate_on_policy_outputs

    def spy(model, inputs, generation_config):
        out = generate(model, inputs, generation_config)
        seen.append((type(model.get_base_model()).__name__, bool((inputs["prompt_attention_mask"][:, 0] == 0).any()),
                     out[0].shape[1] - inputs["prompts"].shape[1]))
        return out

    monkeypatch.setattr(GKDTrainer, "generate_on_policy_outputs", staticmethod(spy))
    out = tmp_path / "gkd"
    assert main(["sft", "--mode", "gkd", "--model", str(models / "student"), "--teacher", str(models / "teacher"),
                 "--data", str(models / "chat.jsonl"), "--output-dir", str(out), "--lmbda", "1",
                 "--max-new-tokens", "4", "--lora-targets", "mamba", "--no-merge", *FLAGS]) == 0
    assert len(seen) == 3 and all(m == "HybridMamba3ForCausalLM" and left and 0 < new <= 4 for m, left, new in seen)
    report = json.loads((out / "sft_report.json").read_text())
    assert all(torch.isfinite(torch.tensor(c["loss"])) for c in report["curve"])
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "merged").exists()


def test_bf16_comes_from_the_deepspeed_configs_autocast():
    """With the shipped DeepSpeed configs the Trainer's bf16 flag stays off (their torch_autocast does bf16): the flag
    would make accelerate add DeepSpeed's bf16 mode, which casts every parameter, fp32 Mamba-3 ones included, to bf16
    (a ZeRO-2 run with it saved bf16-rounded adapters, measured)."""
    from pathlib import Path

    from hybrid_mamba3.distill.run import trainer_bf16

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert not any(trainer_bf16(True, str(configs / f"ds_zero{s}.json")) for s in (2, 3))
    assert trainer_bf16(True, None) and not trainer_bf16(False, None)


@pytest.mark.parametrize("args,message", [
    (["--mode", "gkd"], "give --teacher"),
    (["--mode", "gkd", "--teacher", "t", "--packing"], "packing and padding_free do not apply"),
    (["--lora-targets", "attention+ssm"], "unknown LoRA target part 'ssm'"),
    (["--model", "TEACHER"], "is not a hybrid"),
])
def test_bad_input_is_refused_before_training(models, tmp_path, capsys, args, message):
    argv = ["sft", "--model", str(models / "hybrid"), "--data", str(models / "chat.jsonl"), "--output-dir",
            str(tmp_path / "run"), *FLAGS, *args]
    argv = [str(models / "teacher") if a == "TEACHER" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_key_is_refused(models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_rank: 8\n")
    assert main(["sft", "--config", str(recipe), "--model", str(models / "hybrid")]) == 2
    assert "unknown recipe keys ['lora_rank']" in capsys.readouterr().err


def test_sft_compare_reports_runs_and_answers_held_out_questions(models, tmp_path):
    """evals/sft_compare.py (the real run's summary): both runs' reports, and each model's greedy answers to the
    questions of the run's own held-out split."""
    from hybrid_mamba3.distill.sft import load_rows
    from hybrid_mamba3.evals import sft_compare as compare
    for name, packing in (("packed", "--packing"), ("unpacked", "--no-packing")):
        assert main(["sft", "--model", str(models / "hybrid"), "--data", str(models / "chat.jsonl"), "--output-dir",
                     str(tmp_path / name), packing, "--chat-template", "smollm2_assistant", *FLAGS]) == 0
    result = compare.main(["--data", str(models / "chat.jsonl"), "--runs", f"packed={tmp_path / 'packed'}",
                           f"unpacked={tmp_path / 'unpacked'}", "--models", f"base={models / 'hybrid'}",
                           f"sft={tmp_path / 'packed' / 'merged'}", "--questions", "2", "--max-new-tokens", "3",
                           "--out", str(tmp_path / "summary")])
    held = load_rows(str(models / "chat.jsonl")).train_test_split(test_size=0.25, seed=0)["test"]
    assert result["questions"] == [held[i]["messages"][-2]["content"] for i in range(2)]
    assert set(result["answers"]) == {"base", "sft"} and all(len(a) == 2 for a in result["answers"].values())
    assert all(r["tokens_per_s"] > 0 for r in result["reports"].values())
    assert json.loads((tmp_path / "summary.json").read_text())["questions"] == result["questions"]
    with pytest.raises(SystemExit, match="name=path"):
        compare.main(["--data", "x", "--runs", "packed", "--out", str(tmp_path / "y")])


def test_resumed_sft_reports_the_tokens_of_its_own_steps(models, tmp_path):
    """tokens / tokens_per_s of a resumed run count the steps after its checkpoint: the two calls' tokens add up to
    the Trainer's own count at the end."""
    out = tmp_path / "run"
    args = ["sft", "--model", str(models / "hybrid"), "--data", str(models / "chat.jsonl"), "--output-dir", str(out),
            "--no-merge", *FLAGS, "--save-steps", "1"]
    assert main([*args, "--max-steps", "2"]) == 0
    first = json.loads((out / "sft_report.json").read_text())
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    second = json.loads((out / "sft_report.json").read_text())
    assert second["resumed_from"].endswith("checkpoint-2")
    total = json.loads((out / "train" / "checkpoint-4" / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert 0 < second["tokens"] < total == first["tokens"] + second["tokens"]
