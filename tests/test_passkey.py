"""Passkey retrieval (evals/passkey.py): prompts of the asked length with the needle at the asked depth, the recall
check aligned with the key's positions, and the command end to end on a tiny teacher and hybrid."""

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hybrid_mamba3.cli import main
from hybrid_mamba3.convert import convert_llama, save_hybrid
from hybrid_mamba3.evals.passkey import INTRO, NEEDLE, make_prompts, recalled


def _bytes_tokenizer():
    """Every byte a token (a byte-level BPE without merges): any text, digits included, tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


FILLER = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 3


def test_prompts_have_the_length_and_the_needle_at_the_depth():
    tok = _bytes_tokenizer()
    prompts = make_prompts(tok, FILLER, lengths=[300, 600], depths=[0.0, 0.5, 1.0], per_cell=2, seed=3)
    assert len(prompts) == 12 and prompts == make_prompts(tok, FILLER, [300, 600], [0.0, 0.5, 1.0], 2, seed=3)
    intro = len(tok(INTRO, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    for p in prompts:
        assert len(p["ids"]) == p["length"] and tok.decode(p["target"]) == " " + p["key"]
        needle = tok(NEEDLE.format(key=p["key"]), add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(p["ids"])) if p["ids"][i:i + len(needle)] == needle)
        room = p["length"] - len(needle) - intro - len(tok("\n\nWhat is the pass key? The pass key is",
                                                            add_special_tokens=False)["input_ids"])
        assert at == intro + round(p["depth"] * room)
    with pytest.raises(ValueError, match="no room for filler"):
        make_prompts(tok, FILLER, lengths=[50], depths=[0.5])
    with pytest.raises(ValueError, match="filler text is empty"):
        make_prompts(tok, [""], lengths=[300], depths=[0.5])


class _Oracle(torch.nn.Module):
    """Logits whose argmax at each position is the token `shift` positions later in the input (1: a perfect
    next-token predictor, since the recall check feeds prompt + key)."""

    def __init__(self, shift: int, vocab: int = 300):
        super().__init__()
        self.shift, self.vocab, self.w = shift, vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False, logits_to_keep=0):
        nxt = torch.roll(ids, -self.shift, dims=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), dict(logits=logits[:, -logits_to_keep:]))


def test_recall_is_judged_at_the_positions_that_predict_the_key():
    tok = _bytes_tokenizer()
    p = make_prompts(tok, FILLER, lengths=[300], depths=[0.5], per_cell=1)[0]
    assert recalled(_Oracle(1), p) and not recalled(_Oracle(0), p) and not recalled(_Oracle(2), p)


def test_passkey_command_scores_teacher_and_hybrid(tmp_path, capsys):
    tok = _bytes_tokenizer()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=1024))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    hybrid, report = convert_llama(teacher, mamba_layers=[1], d_state=16, mimo_rank=2, chunk_size=8, progress=False)
    save_hybrid(hybrid, tmp_path / "hybrid", tokenizer=tok, report=report)
    (tmp_path / "filler.txt").write_text(FILLER[0])
    assert main(["passkey", str(tmp_path / "hybrid"), "--teacher", str(tmp_path / "teacher"), "--filler",
                 str(tmp_path / "filler.txt"), "--lengths", "300,500", "--depths", "0,1", "--per-cell", "1",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert [r["layout"] for r in result["rows"]] == ["AA", "AM"] and "(teacher)" in printed
    for r in result["rows"]:
        assert set(r["grid"]) == {"300", "500"} and all(0 <= a <= 1 for g in r["grid"].values() for a in g.values())
    assert (tmp_path / "out" / "passkey.png").exists() or importlib.util.find_spec("matplotlib") is None
    assert main(["passkey", "--filler", str(tmp_path / "filler.txt")]) == 2  # nothing to score
    from hybrid_mamba3.evals.passkey import labels  # table and plot name two runs' "model" folders apart
    two = dict(rows=[dict(model="/x/run1/model", teacher=False), dict(model="/x/run2/model", teacher=False)])
    assert labels(two) == ["run1/model", "run2/model"]
