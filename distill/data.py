"""Distillation data: documents -> the teacher's token ids -> packed fixed-length rows that keep documents apart.

- `build_shards` tokenizes the documents once (the teacher's tokenizer, EOS after each) and writes two memory-mapped
  shards, train and held-out (a seeded random choice of whole documents): tokens.bin (uint16 where the vocabulary
  fits, else uint32), docs.npy (each document's first offset) and meta.json (tokenizer, vocabulary, counts). A shard
  loads again without the tokenizer; `meta.json` lets the trainer check that it was made by the teacher's.
- `PackedRows` cuts a shard's stream into rows of seq_len tokens (the last partial row dropped): position_ids
  restart at 0 at each document's first token, so transformers' attention masks and the Mamba-3 layers' state
  resets keep documents apart, and labels are -100 there (no prediction across a boundary). A document that runs
  past a row's end continues in the next row (a fresh state there, as any row's start).
- Order, sharding across ranks and the position in the data are the Trainer's: its sampler shuffles rows with the
  run's seed, gives each rank its part, and a resumed run skips the rows already seen.

Sources (`iter_documents`): text files and directories (HTML reduced to its text; gzip-compressed files read as the
file they hold, as Debian ships documentation), .jsonl files (a "text" field per line), or a `datasets.Dataset` (its
"text" column). Or `--data python-docs` (`python_docs`): the documentation topics every Python install ships for
`help()` (the language reference's sections, ~110k tokens of English prose), text on any machine without a
download: the quickstart recipe's default. Or the teacher itself (`teacher_documents`, `--data teacher:<tokens>`):
documents it samples from its start token, nothing to download, and its own distribution whatever the domain.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..evals.text import html_to_text

SHARD_VERSION = 1
SPLITS = ("train", "heldout")
_TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".pod", ".html", ".htm", ""}


PYTHON_DOCS = "python-docs"


def python_docs() -> Iterator[str]:
    """The documentation topics of the running Python (`pydoc_data.topics`, what `help("topic")` prints), one
    document each, in sorted order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield topics[name]


def iter_documents(sources, text_field: str = "text") -> Iterator[str]:
    """The texts of the given sources, in a fixed order (directories walked sorted); empty texts skipped."""
    if not isinstance(sources, (list, tuple)):
        sources = [sources]
    for src in sources:
        if src == PYTHON_DOCS and not Path(src).exists():  # (a path of that name is the user's own)
            yield from python_docs()
            continue
        if not isinstance(src, (str, os.PathLike)):  # a datasets.Dataset (or any iterable of {"text": ...})
            for row in src:
                text = row[text_field] if isinstance(row, dict) else row
                if isinstance(text, str) and text.strip():
                    yield text
            continue
        path = Path(src)
        if not path.exists():
            raise ValueError(f"data path {str(path)!r} does not exist")
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            yield from _file_documents(f, text_field, explicit=not path.is_dir())


def _file_documents(f: Path, text_field: str, explicit: bool) -> Iterator[str]:
    # Debian compresses its documentation (README.txt.gz, *.rst.gz): the suffix under .gz says what the text is
    packed = f.suffix.lower() == ".gz"
    suffix = Path(f.stem).suffix.lower() if packed else f.suffix.lower()
    opener = functools.partial(gzip.open, mode="rt") if packed else open
    if suffix == ".jsonl":
        with opener(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if text_field not in row:
                    raise ValueError(f"{f}:{n} has no {text_field!r} field (fields: {sorted(row)}); pass text_field")
                if row[text_field].strip():
                    yield row[text_field]
        return
    if suffix not in _TEXT_SUFFIXES and not explicit:  # images, archives, ... in a documentation tree
        return
    with opener(f, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    if suffix in (".html", ".htm"):
        text = html_to_text(text)
    if text.strip():
        yield text


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary: shards and models made with different tokenizers differ in it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


TEACHER_DATA = "teacher:"


def teacher_tokens(data: list) -> int | None:
    """N for `--data teacher:N` (documents sampled from the teacher, N tokens in all), else None."""
    if len(data) != 1 or not str(data[0]).startswith(TEACHER_DATA):
        return None
    n = str(data[0])[len(TEACHER_DATA):].replace("_", "")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--data {data[0]!r}: teacher-sampled data takes a token count, e.g. teacher:2000000")
    return int(n)


@torch.no_grad()
def teacher_documents(teacher, tokenizer, tokens: int, length: int = 512, batch_size: int = 16, seed: int = 0,
                      temperature: float = 1.0, progress: bool = True) -> Iterator[str]:
    """Documents sampled from `teacher` (plain sampling at `temperature` from its BOS token, or EOS where it has
    none), each up to `length` new tokens or its EOS, decoded without special tokens, until `tokens` are sampled.
    Seeded: the same seed gives the same documents on the same device and dtype."""
    from tqdm.auto import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither BOS nor EOS to start sampling from")
    device = next(teacher.parameters()).device
    eos = tokenizer.eos_token_id
    bar = tqdm(total=tokens, desc="sampling from the teacher", unit="tok", unit_scale=True, disable=not progress)
    done, batch = 0, 0
    while done < tokens:
        torch.manual_seed(seed * 1_000_003 + batch)  # (generate() samples from the global generator)
        ids = torch.full((batch_size, 1), start, dtype=torch.long, device=device)
        out = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                               top_k=0, top_p=1.0, max_new_tokens=length, pad_token_id=eos, eos_token_id=eos)
        for row in out[:, 1:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            done += len(row) + 1  # (with the EOS the shards put after each document: an empty row counts too)
            bar.update(len(row) + 1)
            if text:
                yield text
            if done >= tokens:
                break
        batch += 1
    bar.close()


def build_shards(documents: Iterable[str], tokenizer, out_dir, heldout: float = 0.01, seed: int = 0,
                 max_tokens: int | None = None, progress: bool = True) -> dict:
    """Tokenize `documents` and write `out_dir`/{train,heldout}/ atomically (a temporary folder, then renamed).
    heldout: the fraction of documents held out (at least one when there are two or more). max_tokens stops once that
    many tokens are read. Returns the meta of both splits."""
    from tqdm.auto import tqdm

    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be a fraction in [0, 1), got {heldout}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents with")
    docs, total = [], 0
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        docs.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        bar.update(len(ids))
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    if not docs:
        raise ValueError("no documents: the data sources hold no text")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = 0 if heldout == 0 or len(docs) < 2 else max(1, round(heldout * len(docs)))
    held = set(order[:n_held])
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = len(tokenizer)
    common = dict(version=SHARD_VERSION, vocab_size=vocab, tokenizer=getattr(tokenizer, "name_or_path", None),
                  tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), eos_token_id=eos, seed=seed)
    metas = {}
    for split in SPLITS:
        keep = [d for i, d in enumerate(docs) if (i in held) == (split == "heldout")]
        metas[split] = _write_split(tmp / split, keep, vocab, dict(common, split=split))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return metas


def _write_split(folder: Path, docs: list[np.ndarray], vocab: int, meta: dict) -> dict:
    folder.mkdir()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    stream = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype=dtype)
    stream.tofile(folder / "tokens.bin")
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).astype(np.int64) if docs else np.zeros(0, np.int64)
    np.save(folder / "docs.npy", starts)
    meta = dict(meta, dtype=np.dtype(dtype).name, tokens=int(stream.size), documents=len(docs))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_meta(shard_dir) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.exists():
        raise ValueError(f"{str(shard_dir)!r} is not a token shard (no meta.json): build it with build_shards "
                         "(hybrid-mamba3 distill does so from --data)")
    meta = json.loads(path.read_text())
    if meta.get("version") != SHARD_VERSION:
        raise ValueError(f"{str(shard_dir)!r} was written by shard version {meta.get('version')}, this is "
                         f"{SHARD_VERSION}: rebuild it")
    return meta


class PackedRows(torch.utils.data.Dataset):
    """Rows of `seq_len` tokens of a shard (one split folder), as the model takes them: input_ids, position_ids
    (restarting at each document) and labels (-100 at each document's first token)."""

    def __init__(self, shard_dir, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.dir, self.seq_len = Path(shard_dir), seq_len
        self.meta = load_meta(shard_dir)
        self.tokens = np.memmap(self.dir / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                                shape=(self.meta["tokens"],)) if self.meta["tokens"] else np.zeros(0, np.uint16)
        self.starts = np.load(self.dir / "docs.npy")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        a, b = i * self.seq_len, (i + 1) * self.seq_len
        ids = torch.from_numpy(self.tokens[a:b].astype(np.int64))
        # the first document start at or before each position: position = offset from it
        doc = np.searchsorted(self.starts, np.arange(a, b), side="right") - 1
        pos = torch.from_numpy(np.arange(a, b) - self.starts[doc])
        labels = ids.masked_fill(pos == 0, -100)
        return dict(input_ids=ids, position_ids=pos, labels=labels)
