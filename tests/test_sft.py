"""Supervised fine-tuning of hybrids with TRL's SFTTrainer and a PEFT LoRA adapter (tiny hybrid, CPU): the adapter
saved, reloaded on AutoModelForCausalLM and merged; TRL's packing and padding-free rows against the documents run one by
one; assistant-only loss with the shipped SmolLM2 template; completion-only loss; gradient checkpointing and bf16."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from test_batches import GRAD_TOL, LOSS_TOL, assert_same, one_by_one
from test_model import hybrid
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from hybrid_mamba3 import lora_targets
from hybrid_mamba3.lora import adapted_modules
from hybrid_mamba3.configs import load_chat_template

# SmolLM2-135M-Instruct's own chat template (its tokenizer_config.json / GGUF metadata), without generation markers
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer():
    """A word-level tokenizer of the tiny models' 97 ids, ChatML's special tokens, the marked SmolLM2 template."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|im_start|>": 4, "<|im_end|>": 5, "user": 6,
             "assistant": 7, "system": 8, **{f"w{i}": i for i in range(9, 97)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = load_chat_template("smollm2_assistant")
    return tok


def words(gen, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(9, 97, (n,), generator=gen))


def conversations(n, seed=0, turns=1):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": words(gen, 3)}]
        for _ in range(turns):
            msgs += [{"role": "user", "content": words(gen, int(torch.randint(2, 8, (1,), generator=gen)))},
                     {"role": "assistant", "content": words(gen, int(torch.randint(2, 10, (1,), generator=gen)))}]
        rows.append({"messages": msgs})
    return Dataset.from_list(rows)


def texts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"text": [words(gen, int(torch.randint(3, 15, (1,), generator=gen))) for _ in range(n)]})


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                gradient_checkpointing=False, lr_scheduler_type="constant", max_length=64, bf16=False)  # (TRL: bf16 on)
    return SFTConfig(**{**base, **kw})


def lora(targets, **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "hybrid"
    hybrid((1, 3)).save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


def test_trained_adapter_reloads_and_merges_to_the_same_logits(hybrid_dir, tmp_path):
    """SFTTrainer from the directory with LoRA on every part; the saved adapter on a fresh AutoModelForCausalLM gives
    the trained model's logits, and merged the same within 1e-5 (fp32: the merged matmul sums in another order,
    ~1e-7 measured), while the training moved them from the base model's by far more."""
    targets = lora_targets(str(hybrid_dir), "all")
    trainer = SFTTrainer(model=str(hybrid_dir), args=config(tmp_path), train_dataset=conversations(12),
                         processing_class=chat_tokenizer(), peft_config=lora(targets))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.randint(9, 97, (2, 13))
    trained = trainer.model.eval()(ids.to(trainer.model.device)).logits.cpu()
    base = AutoModelForCausalLM.from_pretrained(hybrid_dir).eval()
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    # (PEFT stores a long target list as the fewest name tails that pick the same modules)
    assert adapted_modules(adapted) == targets
    logits = adapted(ids).logits
    merged = adapted.merge_and_unload()(ids).logits
    scale = base_logits.abs().max()
    assert (logits - trained).abs().max() < 1e-6 * scale
    assert (logits - base_logits).abs().max() > 1e-3 * scale
    assert (merged - logits).abs().max() < 1e-5 * scale


def _documents_of(batch, key="input_ids"):
    """`key` per document of a padding-free batch (one row, a new document where the position restarts at 0), or of a
    right-padded one (the real tokens of each row)."""
    if "position_ids" in batch and "attention_mask" not in batch:
        values, pos = batch[key][0].tolist(), batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        return [values[a:b] for a, b in zip(starts, starts[1:])]
    return [row[mask.bool()].tolist() for row, mask in zip(batch[key], batch["attention_mask"])]


def _labelled_per_document(trainer):
    """{document's token ids: its labelled tokens}, over the whole training set collated in one batch."""
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    return {tuple(d): [t for t in labels if t != -100]
            for d, labels in zip(_documents_of(batch), _documents_of(batch, "labels"))}


@pytest.mark.parametrize("layout", ["packing", "padding_free", "padded"])
def test_packed_and_padding_free_batches_equal_documents_one_by_one(layout, tmp_path):
    """The batches TRL's SFTTrainer makes with packing=True (best-fit, padding-free rows), padding_free=True, or right
    padding: the trainer's loss and every LoRA gradient equal those of the batch's documents run one by one (fp64; the
    tolerances of test_batches). Each document must be one of the dataset's, whole."""
    loss, grads, ref_loss, ref_grads = _packed_and_one_by_one(layout, tmp_path, torch.float64, "cpu")
    assert_same(loss, grads, ref_loss, ref_grads)
    assert LOSS_TOL <= 1e-6 and GRAD_TOL <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packing", "padding_free"])
def test_packed_batches_equal_documents_one_by_one_on_the_triton_path(layout, tmp_path):
    """As above on CUDA, where the Mamba-3 layers run the Triton scan (documents reset by seq_idx inside the kernels),
    fp32 with TF32 off: loss within 1e-5 and gradients within 1e-4 of their largest (the kernels' fp32 summation order
    differs between a packed row and a lone document; a state leaking across documents moves them by 1e-2)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    loss, grads, ref_loss, ref_grads = _packed_and_one_by_one(layout, tmp_path, torch.float32, "cuda")
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert (grads[n] - g).abs().max() <= 1e-4 * g.abs().max(), n


def _one_by_one_on(model, docs):
    """test_batches.one_by_one on the model's device."""
    model.zero_grad()
    count, total = sum(len(d) - 1 for d in docs), 0.0
    for d in docs:
        ids = torch.tensor([d], device=model.device)
        loss = model(ids, labels=ids).loss * (len(d) - 1) / count
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, None


def _packed_and_one_by_one(layout, tmp_path, dtype, device):
    """(loss, LoRA gradients) of the first batch SFTTrainer makes in `layout`, and of its documents one by one."""
    model = hybrid((1, 3)).to(dtype=dtype, device=device)
    kw = dict(packing=True) if layout == "packing" else dict(padding_free=True, max_length=None) \
        if layout == "padding_free" else {}
    if device != "cpu":
        kw["use_cpu"] = False
    data = texts(16)
    trainer = SFTTrainer(model=model, args=config(tmp_path, **kw), train_dataset=data,
                         processing_class=chat_tokenizer(), peft_config=lora(lora_targets(model, "all"),
                                                                             init_lora_weights=False))
    tok = chat_tokenizer()
    known = {tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in data["text"]}
    batch = next(iter(trainer.get_train_dataloader()))
    docs = _documents_of({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()})
    assert len(docs) >= 4 and all(tuple(d) in known for d in docs)
    if layout != "padded":
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    peft_model = trainer.model
    peft_model.train()
    ref_loss, ref_grads, _ = one_by_one(peft_model, docs) if device == "cpu" else _one_by_one_on(peft_model, docs)
    peft_model.zero_grad()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = trainer.compute_loss(peft_model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * len(lora_targets(model, "all"))
    if device != "cpu":
        assert peft_model.get_base_model().model.layers[1].mamba.last_backend == "triton"
    return loss.item(), grads, ref_loss, ref_grads


def test_smollm2_assistant_template_renders_smollm2_text():
    """The shipped template is SmolLM2's with generation markers: the same text for conversations with and without a
    system message, several turns, and the generation prompt."""
    tok = chat_tokenizer()
    convs = [[{"role": "user", "content": "w9 w10"}, {"role": "assistant", "content": "w11"}],
             list(conversations(1, turns=3)[0]["messages"])]
    for msgs in convs:
        for prompt in (False, True):
            ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
            theirs = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt,
                                             chat_template=SMOLLM2_TEMPLATE)
            assert ours == theirs


@pytest.mark.parametrize("packing", [False, True])
def test_assistant_only_loss_trains_on_replies_and_their_end(packing, tmp_path):
    """assistant_only_loss with the shipped template: the labels of every conversation keep exactly each assistant
    reply's tokens and the <|im_end|> that closes it (so the model learns to stop), in every turn; with packing
    too."""
    model = hybrid((1, 3))
    data = conversations(8, turns=2)
    tok = chat_tokenizer()
    trainer = SFTTrainer(model=model, args=config(tmp_path, assistant_only_loss=True, packing=packing),
                         train_dataset=data, processing_class=tok, peft_config=lora(lora_targets(model, "mamba")))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = {tuple(tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]):
                [t for m in row["messages"] if m["role"] == "assistant" for t in tok(m["content"])["input_ids"] + [end]]
                for row in data}
    assert _labelled_per_document(trainer) == expected
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_completion_only_loss_trains_on_the_completion(tmp_path):
    model = hybrid((1, 3))
    gen = torch.Generator().manual_seed(0)
    # (TRL joins prompt and completion as they are: the space that separates them is the completion's)
    rows = [{"prompt": words(gen, 4), "completion": " " + words(gen, 3)} for _ in range(8)]
    tok = chat_tokenizer()
    trainer = SFTTrainer(model=model, args=config(tmp_path), train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora(lora_targets(model, "all")))
    expected = {tuple(tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]):
                tok(r["completion"])["input_ids"] + [tok.eos_token_id] for r in rows}
    assert _labelled_per_document(trainer) == expected


def _trajectory(tmp_path, name, **kw):
    torch.manual_seed(0)
    model = hybrid((1, 3))
    trainer = SFTTrainer(model=model, args=config(tmp_path / name, **kw), train_dataset=conversations(12),
                         processing_class=chat_tokenizer(), peft_config=lora(lora_targets(model, "all")))
    trainer.train()
    fp32 = [p.dtype for n, p in trainer.model.named_parameters() if n.endswith(("dt_bias", "D", "B_norm.weight"))]
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], fp32


def test_gradient_checkpointing_and_bf16_with_lora(tmp_path):
    """Three steps each: with gradient checkpointing the losses are the plain run's within 1e-6 (the same arithmetic,
    recomputed; equal measured); bf16 autocast within 2e-3 (its matmuls round to bf16: 1e-4 measured) but not equal,
    the Mamba-3 fp32 parameters still fp32."""
    plain, _ = _trajectory(tmp_path, "plain")
    checkpointed, _ = _trajectory(tmp_path, "gc", gradient_checkpointing=True)
    bf16, fp32 = _trajectory(tmp_path, "bf16", bf16=True)
    assert len(plain) == 3 and plain[-1] < plain[0]
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(checkpointed, plain))
    assert all(abs(a - b) <= 2e-3 * b for a, b in zip(bf16, plain)) and bf16 != plain
    assert fp32 and all(d == torch.float32 for d in fp32)
