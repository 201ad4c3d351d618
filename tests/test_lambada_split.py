"""evals/lambada_split.py: LAMBADA accuracy split by whether the last word occurs earlier in the passage, on tiny
models and passages (CPU)."""

import json

import torch
from test_batches import _tokenizer
from test_distill import _teacher

from hybrid_mamba3.evals import lambada_split as ls


def test_passages_split_on_whole_words():
    tok = _tokenizer()
    got = ls.passages(["w5 w6 w7 w5", "w5 w55 w6", "w8", "w9 w10 w11 "], tok)
    assert [p["in_context"] for p in got] == [True, False, False]  # (w5 is not inside w55; "w8" has no context)
    assert got[0]["ids"] == [5, 6, 7] and got[0]["target"] == [5]


def test_split_accuracies_count_each_passage_once(tmp_path):
    """A teacher saved with its tokenizer, scored on passages built so that it must copy (last word seen) or not: the
    groups partition the passages and each accuracy is the greedy match of `passkey.recalled` over its group."""
    from hybrid_mamba3.evals.passkey import recalled

    tok = _tokenizer()
    model = _teacher()
    model.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 97, (int(n),), generator=g)) for n in
             torch.randint(3, 30, (40,), generator=g)]
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = ls.main([str(tmp_path / "t"), "--data", str(tmp_path / "lambada.jsonl"), "--out", str(tmp_path / "o"),
                      "--no-progress"])
    groups = result["rows"][0]["groups"]
    split = ls.passages(texts, tok)
    assert groups["all"]["n"] == len(split) == groups["in_context"]["n"] + groups["not_in_context"]["n"]
    assert 0 < groups["in_context"]["n"] < len(split)
    want = [recalled(model, p) for p in split if p["in_context"]]
    assert groups["in_context"]["acc"] == sum(want) / len(want)
    assert json.loads((tmp_path / "o" / "lambada_split.json").read_text())["rows"][0]["groups"] == groups
    assert ls.read_texts(str(tmp_path / "lambada.jsonl"), limit=7, seed=1) == ls.read_texts(
        str(tmp_path / "lambada.jsonl"), limit=7, seed=1) != texts[:7]
