"""Training batches as transformers' and TRL's collators make them, on a hybrid with both layer kinds: right padding,
sequences packed along rows (marked by position_ids alone, by seq_idx, or by flash-attention's cu_seq_lens), and no
cache or final state where nothing continues from them. Each is checked against the sequences run one by one, the
model in fp64: logits within 1e-10 (the same arithmetic up to summation order); the loss within 1e-6 and gradients
within 1e-5 (transformers' loss takes the logits to fp32, whose rounding differs with the batch's layout; a state or
attention leaking across documents moves them by 1e-2 and more)."""

import pytest
import torch
from test_model import hybrid
from transformers import (DataCollatorForLanguageModeling, DataCollatorWithFlattening, PreTrainedTokenizerFast,
                          Trainer, TrainingArguments)

from hybrid_mamba3 import mamba3
from hybrid_mamba3.cache import CACHE_FIELD

TOL = 1e-10
LOSS_TOL, GRAD_TOL = 1e-6, 1e-5
DOCS = [[5, 17, 9, 33, 61], [8, 44, 12, 90, 3, 27, 71, 15, 64], [40, 22, 7, 81, 56, 19, 38]]  # odd lengths


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_by_one(model, docs):
    """Loss (mean over all predicted tokens) and gradients of the documents run separately, and their logits."""
    model.zero_grad()
    count = sum(len(d) - 1 for d in docs)
    total, logits = 0.0, []
    for d in docs:
        ids = torch.tensor([d])
        out = model(ids, labels=ids)
        (out.loss * (len(d) - 1) / count).backward()
        total += out.loss.item() * (len(d) - 1) / count
        logits.append(out.logits[0])
    return total, _grads(model), logits


def assert_same(loss, grads, ref_loss, ref_grads):
    assert abs(loss - ref_loss) < LOSS_TOL * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert (grads[n] - g).abs().max() <= GRAD_TOL * g.abs().max(), n


@pytest.fixture
def model():
    return hybrid((1, 3)).double()  # layers: attention, Mamba-3, attention, Mamba-3


def test_right_padded_batch_equals_sequences_one_by_one(model):
    """Right padding with an attention mask and -100 labels (DataCollatorForLanguageModeling's batch): logits at real
    tokens, the loss (sum over real tokens / their count) and every gradient as the sequences alone give them."""
    ref_loss, ref_grads, ref_logits = one_by_one(model, DOCS)
    L = max(map(len, DOCS))
    ids = torch.tensor([d + [0] * (L - len(d)) for d in DOCS])
    mask = torch.tensor([[1] * len(d) + [0] * (L - len(d)) for d in DOCS])
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_same(out.loss.item(), _grads(model), ref_loss, ref_grads)
    for i, d in enumerate(DOCS):
        assert (out.logits[i, :len(d)] - ref_logits[i]).abs().max() < TOL * ref_logits[i].abs().max()


@pytest.mark.parametrize("rows,marks", [(1, "position_ids"), (2, "position_ids"), (1, "seq_idx"), (2, "seq_idx"),
                                        (1, "flash_kwargs")])
def test_packed_rows_equal_sequences_one_by_one(model, rows, marks):
    """DataCollatorWithFlattening's batches (one row; two rows concatenated as a distillation loader packs them):
    documents marked by position_ids alone (TRL's padding-free collators), by seq_idx, or by flash-attention's
    cu_seq_lens (one row only: they index the flattened batch) give each document's logits, the loss and every
    gradient of the documents run one by one."""
    docs = DOCS + [[11, 23, 35, 47, 59, 71, 83, 95, 4, 6, 10], [13, 26, 39, 52]]
    parts = [docs] if rows == 1 else [docs[:3], docs[3:]]
    collate = DataCollatorWithFlattening(return_seq_idx=marks == "seq_idx",
                                         return_flash_attn_kwargs=marks == "flash_kwargs", return_tensors="pt")
    batches = [collate([{"input_ids": d} for d in part]) for part in parts]
    width = max(b["input_ids"].shape[1] for b in batches)
    if rows == 2:  # equal rows: the shorter one ends with a padding document that no label counts
        for b in batches:
            extra = width - b["input_ids"].shape[1]
            for key, fill in (("input_ids", 0), ("labels", -100), ("position_ids", 0), ("seq_idx", 99)):
                if key in b:
                    b[key] = torch.cat((b[key], torch.full((1, extra), fill, dtype=b[key].dtype)), 1)
                    if key == "position_ids" and extra:
                        b[key][0, -extra:] = torch.arange(extra)
    batch = {k: torch.cat([b[k] for b in batches]) if torch.is_tensor(batches[0][k]) else batches[0][k]
             for k in batches[0]}
    if marks == "position_ids":
        assert set(batch) == {"input_ids", "labels", "position_ids"}
    ref_loss, ref_grads, ref_logits = one_by_one(model, docs)
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    assert_same(out.loss.item(), _grads(model), ref_loss, ref_grads)
    i = 0
    for row, part in enumerate(parts):
        at = 0
        for d in part:
            got, ref = out.logits[row, at:at + len(d)], ref_logits[i]
            assert (got - ref).abs().max() < TOL * ref.abs().max(), i
            at, i = at + len(d), i + 1


def test_packed_rows_run_in_place_without_state(model, monkeypatch):
    """Packed rows reach the Mamba-3 op as they are, marked by seq_idx: no padded batch of documents (which would
    cost the longest document's length for every one), and no final state."""
    calls = []
    op = mamba3.mamba3_chunked

    def spy(q, *args, **kwargs):
        calls.append((tuple(q.shape[:2]), kwargs.get("seq_idx") is not None, kwargs.get("return_final_state")))
        return op(q, *args, **kwargs)

    monkeypatch.setattr(mamba3, "mamba3_chunked", spy)
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in DOCS])
    model(**batch)
    assert calls == [((1, sum(map(len, DOCS))), True, False)] * 2


def test_training_and_labels_build_no_cache_nor_final_states(model, monkeypatch):
    """use_cache falls back to the config's True, yet a forward in training mode or with labels builds no cache, and
    its Mamba-3 layers compute no final state; an explicit use_cache=True still builds one."""
    calls = []
    op = mamba3.mamba3_chunked
    monkeypatch.setattr(mamba3, "mamba3_chunked",
                        lambda *a, **kw: calls.append(kw["return_final_state"]) or op(*a, **kw))
    ids = torch.tensor([DOCS[1]])
    assert model.config.use_cache
    assert getattr(model(ids, labels=ids), CACHE_FIELD) is None
    model.train()
    assert getattr(model(ids), CACHE_FIELD) is None
    assert calls == [False] * 4
    model.eval()
    assert getattr(model(ids), CACHE_FIELD) is not None
    assert getattr(model(ids, labels=ids, use_cache=True), CACHE_FIELD) is not None
    assert calls[4:] == [True] * 4


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out.padding_side = "right"  # as SmolLM2's and most Llama tokenizers
    return out


def test_trainer_with_language_modeling_collator_runs_train_and_eval(tmp_path):
    """transformers' Trainer with DataCollatorForLanguageModeling (right padding, attention mask, -100 labels) trains
    and evaluates a tiny hybrid: the steps run, the losses are finite, and the batches were right padded."""
    model = hybrid((1, 3))
    tok = _tokenizer()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 97, (int(n),), generator=gen).tolist()}
            for n in torch.randint(4, 20, (24,), generator=gen)]
    padded = []
    collate = DataCollatorForLanguageModeling(tok, mlm=False)

    def recording(features):
        batch = collate(features)
        padded.append(bool((batch["attention_mask"][:, -1] == 0).any()))
        return batch

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                             max_steps=3, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data[:16], eval_dataset=data[16:],
                      data_collator=recording)
    before = model.model.layers[1].mamba.in_proj.weight.detach().clone()
    result = trainer.train()
    metrics = trainer.evaluate()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert any(padded)
    assert not torch.equal(before, model.model.layers[1].mamba.in_proj.weight)
