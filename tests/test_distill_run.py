"""The distillation command end to end on a tiny teacher (CPU): the result directory, resuming after a kill, and the
errors that come before any training."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_batches import _tokenizer
from test_distill import _teacher, _words
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybrid_mamba3.cli import main

FLAGS = ["--mamba-layers", "1,3", "--seq-len", "32", "--batch-size", "4", "--align-tokens", "1536", "--tokens", "2560",
         "--mimo-rank", "2", "--chunk-size", "8", "--heldout", "0.1", "--eval-tokens", "256", "--save-steps", "5",
         "--no-progress"]


def make_teacher_and_text(root):
    """root/teacher: the tiny teacher with its tokenizer; root/text: 40 documents of its words."""
    _teacher().save_pretrained(root / "teacher")
    _tokenizer().save_pretrained(root / "teacher")
    g = torch.Generator().manual_seed(3)
    (root / "text").mkdir()
    for i in range(40):
        (root / "text" / f"d{i}.txt").write_text(_words(g, int(torch.randint(10, 80, (1,), generator=g))))
    return root


@pytest.fixture(scope="module")
def teacher_and_text(tmp_path_factory):
    return make_teacher_and_text(tmp_path_factory.mktemp("distill"))


def test_distill_command_gives_a_loadable_distilled_hybrid(teacher_and_text, tmp_path, capsys):
    root = teacher_and_text
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(root / "teacher"), "--data", str(root / "text"), "--output-dir",
                 str(out), *FLAGS]) == 0
    assert "distilled hybrid saved to" in capsys.readouterr().out
    result = out / "model"
    model = AutoModelForCausalLM.from_pretrained(result)
    tok = AutoTokenizer.from_pretrained(result)
    assert model.config.mixers == ["attention", "mamba3", "attention", "mamba3"] and tok("w5")["input_ids"] == [5]
    report = json.loads((result / "distill_report.json").read_text())
    assert set(report["stages"]) == {"align", "kd"} and report["stages"]["kd"]["tokens"] >= 2560
    curves = json.loads((result / "distill_curves.json").read_text())
    for stage in ("align", "kd"):
        losses = [c["loss"] for c in curves[stage]]
        assert losses[-1] < losses[0], (stage, losses)
    for when in ("eval_before", "eval_after"):  # (a random teacher on random words: the ratio itself is noise here)
        assert set(report[when]) == {"teacher", "student", "ratio"} and 0 < report[when]["ratio"] < 2
    for name in ("README.md", "conversion_report.json", "generation_config.json", "tokenizer.json"):
        assert (result / name).exists(), name
    assert not list((out / "kd").glob("checkpoint-*"))  # a finished stage keeps its result, not its checkpoints
    for stage in ("align", "kd"):  # each stage's student is a whole hybrid directory, to evaluate apart
        assert AutoTokenizer.from_pretrained(out / stage / "student")("w5")["input_ids"] == [5]
        assert AutoModelForCausalLM.from_pretrained(out / stage / "student").config.mixers == model.config.mixers


@pytest.mark.parametrize("train", ["mamba", "lora"])
def test_killed_run_resumes_with_the_same_trajectory(teacher_and_text, tmp_path, train):
    """SIGKILL in stage kd after its checkpoint at step 5 (and a partial checkpoint-99 lying about, as a kill while
    writing leaves one): --resume skips the finished align stage and the partial checkpoint, continues from step 5,
    and logs the losses of the uninterrupted run, bit for bit (one process). With --train lora the checkpoint holds
    the adapters and the mixers (PEFT's modules_to_save), and the resumed run merges them as the whole run does."""
    root = teacher_and_text
    args = ["distill", "--teacher", str(root / "teacher"), "--data", str(root / "text"), *FLAGS, "--train", train,
            "--lora-rank", "4"]
    script = textwrap.dedent(f"""
        import os, signal, sys
        from transformers import TrainerCallback
        from hybrid_mamba3.cli import main
        from hybrid_mamba3.distill import run

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if "kd" in args.output_dir and state.global_step == 7:
                    os.kill(os.getpid(), signal.SIGKILL)

        original = run._stage
        run._stage = lambda *a: original(*a[:-1], [Kill()])
        sys.exit(main(sys.argv[1:]))
    """)
    killed = tmp_path / "killed"
    res = subprocess.run([sys.executable, "-c", script, *args, "--output-dir", str(killed)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert (killed / "align" / "DONE").exists() and (killed / "kd" / "checkpoint-5" / "COMPLETE").exists()
    (killed / "kd" / "checkpoint-99").mkdir()  # partial: no COMPLETE marker
    assert main([*args, "--output-dir", str(killed), "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main([*args, "--output-dir", str(whole)]) == 0
    got, want = (json.loads((d / "model" / "distill_report.json").read_text())["stages"] for d in (killed, whole))
    assert got["kd"]["resumed_from"].endswith("checkpoint-5") and got["align"]["curve"] == want["align"]["curve"]
    loss = lambda stage: [(c["step"], c["loss"]) for c in stage["curve"]]  # noqa: E731
    assert [x for x in loss(got["kd"]) if x[0] > 5] == [x for x in loss(want["kd"]) if x[0] > 5]
    resumed, whole_model = (AutoModelForCausalLM.from_pretrained(d / "model") for d in (killed, whole))
    assert resumed.state_dict().keys() == whole_model.state_dict().keys()
    assert all(torch.equal(v, whole_model.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_bad_input_is_refused_before_training(teacher_and_text, tmp_path, capsys):
    """Each refusal comes with a message that says what to change, before any training (exit code 2)."""
    from hybrid_mamba3 import HybridMamba3Config, HybridMamba3ForCausalLM

    root = teacher_and_text
    base = ["distill", "--teacher", str(root / "teacher"), *FLAGS]
    (tmp_path / "empty").mkdir()
    other = _teacher().config
    other.hidden_size = 32
    HybridMamba3ForCausalLM(HybridMamba3Config.from_llama(other, [1], d_state=16, headdim=16, mimo_rank=2)) \
        .save_pretrained(tmp_path / "wrong")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hybrid_mamba3.distill.data import build_shards
    other_tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "w5": 3}, unk_token="<pad>"))
    other_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=other_tok, eos_token="</s>")
    build_shards(["w5 w5 w5"] * 400, other_tok, tmp_path / "foreign", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    cases = [(["--data", str(tmp_path / "empty")], "no documents"),
             (["--data", str(root / "text"), "--student", str(tmp_path / "wrong")], "not a hybrid of this teacher"),
             (["--data", str(root / "text"), "--stage", "x"], "stage must be align, kd or both"),
             (["--data", str(root / "text"), "--seq-len", "4096"], "fewer than one batch"),
             (["--data", str(tmp_path / "foreign")], "made with another tokenizer"),
             (["--data", str(root / "text"), "--attn-implementation", "flash"], "attn_implementation must be one of"),
             (["--data", "teacher:many"], "teacher-sampled data takes a token count"),
             (["--data", str(root / "text"), "--fsdp", "--deepspeed", "configs/ds_zero2.json"], "choose one engine"),
             (["--data", str(root / "text"), "--dt-grid", "0.1,-1"], "dt grid values must be positive")]
    for i, (extra, message) in enumerate(cases):
        assert main([*base, *extra, "--output-dir", str(tmp_path / f"run{i}")]) == 2, message
        assert message in capsys.readouterr().err
    assert main([*base, "--data", str(root / "text"), "--output-dir", str(tmp_path / "busy")]) == 2
    assert "is not empty: pass resume" in capsys.readouterr().err


def test_lora_stage_merges_adapters_into_the_kept_layers(teacher_and_text, tmp_path):
    """--train lora: the new mixers train whole, the kept layers through LoRA adapters; the result is a plain hybrid
    (no adapter left) whose kept layers hold the merged adapters and whose mixers moved."""
    from safetensors.torch import load_file

    root = teacher_and_text
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(root / "teacher"), "--data", str(root / "text"), "--output-dir", str(out),
                 *FLAGS, "--stage", "kd", "--train", "lora", "--lora-rank", "4", "--lr", "1e-2"]) == 0
    before = load_file(out / "converted" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert set(after) == set(before)  # the same tensors as the converted hybrid: adapters merged, wrappers gone
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "mamba.in_proj.weight", "mamba.dt_bias"):
        assert any(k.endswith(part) for k in moved), part
    assert not any("embed" in k or "norm" in k and "mamba" not in k for k in moved)  # no adapter there
    report = json.loads((out / "model" / "distill_report.json").read_text())
    assert report["eval_after"]["student"] < report["eval_before"]["student"]


def test_recipe_keys_are_the_flags_and_flags_win(tmp_path):
    from hybrid_mamba3.cli import build_parser
    from hybrid_mamba3.distill.options import DistillOptions, load_recipe

    shipped = load_recipe("distill_smollm2")
    assert shipped["mamba_layers"] == "auto:0.25" and DistillOptions(**shipped).seq_len == 256
    mine = tmp_path / "r.yaml"
    mine.write_text("seq-len: 64\nlr: 0.01\n")
    args = build_parser().parse_args(["distill", "--config", str(mine), "--lr", "0.5", "--teacher", "t"])
    given = {k: getattr(args, k) for k in ("lr", "teacher") if hasattr(args, k)}
    opts = DistillOptions(**{**load_recipe(args.config), **given})
    assert (opts.seq_len, opts.lr, opts.teacher) == (64, 0.5, "t") and not hasattr(args, "seq_len")
    mine.write_text("sequence_length: 64\n")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe(str(mine))
    base = dict(teacher="t", output_dir="o", data=["d"])
    mine.write_text("dt-grid: [0.01, 0.1, 3]\n")  # a YAML list, or the flag's comma-separated text
    assert DistillOptions(**base, **load_recipe(str(mine))).check().dt_grid == "0.01,0.1,3"
    mine.write_text("dt-grid: [0.01, fast]\n")
    with pytest.raises(ValueError, match="comma-separated numbers"):
        DistillOptions(**base, **load_recipe(str(mine))).check()


def test_shards_command_writes_shards_once_and_keeps_what_exists(teacher_and_text, tmp_path, capsys):
    root = teacher_and_text
    out = tmp_path / "shards"
    args = ["shards", "--tokenizer", str(root / "teacher"), "--data", str(root / "text"), "--out", str(out),
            "--heldout", "0.1", "--no-progress"]
    assert main(args) == 0
    assert "train: " in capsys.readouterr().out
    train, held = (json.loads((out / s / "meta.json").read_text()) for s in ("train", "heldout"))
    assert train["documents"] + held["documents"] == 40 and held["documents"] == 4
    words = sum(len((root / "text" / f"d{i}.txt").read_text().split()) for i in range(40))
    assert train["tokens"] + held["tokens"] == words + 40  # a token per word, an EOS per document
    assert main(args) == 2  # not empty: refused, left as it was
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "train" / "meta.json").read_text()) == train


def test_attention_implementation_reaches_teacher_and_student(teacher_and_text, tmp_path, monkeypatch):
    """--attn-implementation sets both models' attention for the stages (sdpa turns packed rows into a 4D mask that
    keeps it off its flash kernel; flex_attention and flash_attention_2 take the boundaries instead)."""
    from hybrid_mamba3.distill.trainer import DistillTrainer

    seen = set()
    compute_loss = DistillTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.add((self.stage, model.config._attn_implementation, self.teacher.config._attn_implementation))
        return compute_loss(self, model, inputs, *args, **kwargs)
    monkeypatch.setattr(DistillTrainer, "compute_loss", spy)
    root = teacher_and_text
    assert main(["distill", "--teacher", str(root / "teacher"), "--data", str(root / "text"), "--output-dir",
                 str(tmp_path / "run"), *FLAGS, "--stage", "kd", "--attn-implementation", "eager"]) == 0
    assert seen == {("kd", "eager", "eager")}


def test_data_sampled_from_the_teacher(teacher_and_text, tmp_path):
    """--data teacher:N: documents sampled from the teacher (nothing to read), N tokens in all, the same for the same
    seed, then the run as with files."""
    from hybrid_mamba3.convert import load_source
    from hybrid_mamba3.distill.data import load_meta, teacher_documents

    root = teacher_and_text
    assert main(["distill", "--teacher", str(root / "teacher"), "--data", "teacher:1200", "--output-dir",
                 str(tmp_path / "run"), *FLAGS]) == 0
    meta = {split: load_meta(tmp_path / "run" / "data" / split) for split in ("train", "heldout")}
    # N tokens sampled (one row may run past N by up to --seq-len); the shards hold what the decoded text tokenizes
    # to again, fewer by the special tokens a random teacher samples and decoding drops
    assert 0.8 * 1200 <= meta["train"]["tokens"] + meta["heldout"]["tokens"] <= 1200 + 32 + 1
    assert (tmp_path / "run" / "model" / "distill_report.json").exists()
    teacher, tok, _ = load_source(str(root / "teacher"))
    first = list(teacher_documents(teacher, tok, 100, length=16, batch_size=4, seed=1, progress=False))
    assert first == list(teacher_documents(teacher, tok, 100, length=16, batch_size=4, seed=1, progress=False))
    assert first != list(teacher_documents(teacher, tok, 100, length=16, batch_size=4, seed=2, progress=False))
    assert all(isinstance(t, str) and t for t in first)


@pytest.mark.gpu
def test_data_sampled_on_the_gpu_then_layers_chosen_by_data(teacher_and_text, tmp_path):
    """--data teacher:N on a GPU, where the teacher samples on CUDA, with the layers chosen from the data after: the
    conversion's calibration pass finds the teacher where the ids are (an H100 run once failed there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = teacher_and_text
    flags = list(FLAGS)
    flags[flags.index("--mamba-layers") + 1] = "auto:0.5"
    assert main(["distill", "--teacher", str(root / "teacher"), "--data", "teacher:1200", "--output-dir",
                 str(tmp_path / "run"), *flags]) == 0
    report = json.loads((tmp_path / "run" / "model" / "distill_report.json").read_text())
    assert report["conversion"]["choice"] == "data-driven" and len(report["conversion"]["mamba_layers"]) == 2


def test_torch_compile_compiles_stage_kd_and_saves_a_plain_hybrid(teacher_and_text, tmp_path):
    """--torch-compile: stage kd's student runs under torch.compile through TrainingArguments (dynamo's eager backend
    here: inductor needs a compiler toolchain), dynamo captures graphs of it, and the saved hybrid's weights are the
    trained ones under the plain names (no compile wrapper's prefix) and load back."""
    root = teacher_and_text
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        assert main(["distill", "--teacher", str(root / "teacher"), "--data", str(root / "text"), "--output-dir",
                     str(tmp_path / "run"), *FLAGS, "--stage", "kd", "--torch-compile", "--torch-compile-backend",
                     "eager"]) == 0
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()
    result = tmp_path / "run" / "model"
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "converted").state_dict()
    distilled = AutoModelForCausalLM.from_pretrained(result).state_dict()
    assert distilled.keys() == converted.keys()
    moved = [k for k in converted if not torch.equal(converted[k], distilled[k])]
    assert moved and all(".mamba." in k or "mamba" in k for k in moved), moved  # --train mamba: only the mixers


def test_sampling_rows_fill_a_third_of_free_memory_with_caches():
    """Rows sampled from the teacher at once: 16 on a CPU; on a GPU, as many (16 to 1024) as a third of the free
    memory holds the key/value caches of (layers x 2 x kv heads x head dim x length x element size a row)."""
    from transformers import LlamaConfig

    from hybrid_mamba3.distill.run import sampling_rows

    smol = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    per_row = 30 * 2 * 3 * 64 * 1024 * 2  # SmolLM2-135M's cache for 1024 tokens in bf16: ~23.6 MB
    assert sampling_rows(smol, torch.bfloat16, 1024, None) == 16
    assert sampling_rows(smol, torch.bfloat16, 1024, 3 * 300 * per_row + 5) == 300
    assert sampling_rows(smol, torch.float32, 1024, 3 * 300 * per_row) == 150
    assert sampling_rows(smol, torch.bfloat16, 1024, 80 << 30) == 1024  # capped
    assert sampling_rows(smol, torch.bfloat16, 1024, 1 << 20) == 16  # floor: a nearly full card still samples


def test_tf32_as_asked_else_on_for_bf16_on_a_gpu_with_tf32_cores(monkeypatch):
    """TrainingArguments' tf32 for the loss's fp32 output head: the flag when given; unset (None, torch's default)
    without a GPU, before Ampere, or without bf16; on for bf16 from Ampere on."""
    from hybrid_mamba3.distill.run import _tf32

    assert _tf32(True, False) is True and _tf32(False, True) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _tf32(None, True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert _tf32(None, True) is True and _tf32(None, False) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert _tf32(None, True) is None
