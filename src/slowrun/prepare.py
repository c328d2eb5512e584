"""`slowrun prepare`: tokenize a source into a fixed, hashed dataset (the token budget).

A prepared dataset is a directory:

    train.bin, val.bin, test.bin      flat token arrays (uint16 if the vocabulary fits, else
                                      uint32), numpy.memmap-readable like nanoGPT's train.bin
    train.docs.npy, ...               int64 document start offsets (each document starts
                                      with the BOS token)
    token_bytes.npy                   UTF-8 bytes per token id (0 for BOS), for bits-per-byte
    tokenizer.json                    the tokenizer (absent for gpt2, which is referenced)
    manifest.json                     source, tokenizer, counts, dtype, sha256 of every file,
                                      creation parameters, package version

The document order is shuffled with a fixed seed (finite sources); val and test are taken
first, then exactly `--train-tokens` training tokens. A document never straddles two
splits (the last document of a split is cut). Preparing the same source with a larger
budget gives a training split whose prefix is the smaller one and byte-identical val and
test files, which the data-efficiency curve relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from . import SlowrunError, __version__
from .dataset import FORMAT, SPLITS, verify_dataset
from .sources import Corpus, SourceError, check_encoding, open_source
from .storage import (atomic_directory, atomic_write_text, exclusive_lock, read_json, remove_leftovers, sha256_file,
                      sha256_json)
from .tokenizer import GPT2Tokenizer, HFTokenizer, Tokenizer, parse_tokenizer_spec, token_byte_lengths, tokenizer_fingerprint

DEFAULT_DATA = "data/builtin"  # the dataset of a run whose data.path is empty


class PrepareError(SlowrunError):
    pass


@dataclass
class PrepareConfig:
    """Options of `slowrun prepare` (the command-line flags carry the same names)."""

    source: str = "builtin"  # builtin, a file/directory of .txt/.jsonl/.parquet, hf:DATASET[:CONFIG], or .pt file(s)
    tokenizer: str = "bpe:8192"  # gpt2, bpe:N (trained on the training text), or a path to a tokenizer.json
    train_tokens: int = 262_144  # the training budget, in tokens (exact)
    val_tokens: int = 131_072  # validation split size, in tokens (exact)
    test_tokens: int = 131_072  # test split size, in tokens (exact)
    out: str = "data/builtin"  # output directory
    seed: int = 0  # seed of the document shuffle
    separator: str | None = None  # split .txt files into documents at this string (default: one document per file)
    text_field: str = "text"  # field/column holding the text in .jsonl/.parquet/hf sources
    encoding: str = "utf-8"  # text encoding of .txt/.jsonl files, decoded strictly (a bad byte is an error)
    data_files: list[str] | None = None  # hf: local data files (e.g. hf:parquet with parquet files)
    force: bool = False  # replace an output directory that holds a different dataset
    progress: bool = True  # show a progress bar
    threads: int = 0  # tokenizer threads; 0 = all cores
    batch_docs: int = 512  # documents per tokenizer batch

    def __post_init__(self) -> None:
        for name in ("train_tokens", "val_tokens", "test_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise PrepareError(f"--{name.replace('_', '-')}: must be a non-negative integer, got {v!r}")
        if self.train_tokens == 0 or self.val_tokens == 0:
            raise PrepareError("--train-tokens and --val-tokens must be > 0")
        if self.batch_docs < 1:
            raise PrepareError(f"--batch-docs: must be >= 1, got {self.batch_docs}")
        try:
            check_encoding(self.encoding)
        except SourceError as e:
            raise PrepareError(str(e)) from None

    def creation_params(self) -> dict:
        d = asdict(self)
        for k in ("out", "force", "progress", "threads", "batch_docs"):
            d.pop(k)
        if d["encoding"] == "utf-8":  # the default is left out: datasets made before --encoding keep their parameters
            d.pop("encoding")
        return d


# ---------------------------------------------------------------------------------------


def _shuffled(docs: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


def _batches(docs: Iterable, size: int) -> Iterator[list]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _train_bpe(docs: list[str], cfg: PrepareConfig, vocab_size: int) -> tuple[HFTokenizer, dict]:
    """Train the BPE on training documents only: never on a document that lands in val/test.

    Which documents are held out depends on the tokenizer's own counts, so: guess the
    held-out region at 4 bytes per token, train on the documents after it, count with the
    trained tokenizer, and retrain further on if the held-out splits need more documents.
    """
    need = cfg.val_tokens + cfg.test_tokens

    def docs_for(tokens: int, start: int, bytes_per_token: float = 4.0) -> int:
        total, i = 0.0, start
        while i < len(docs) and total < tokens:
            total += len(docs[i].encode()) / bytes_per_token + 1
            i += 1
        return i

    start = docs_for(need, 0)
    for _ in range(8):
        end = min(len(docs), docs_for(cfg.train_tokens * 1.1, start))
        if end <= start:
            raise PrepareError(f"source too small: no documents left for training after val/test ({len(docs)} documents)")
        tok = HFTokenizer.train(iter(docs[start:end]), vocab_size)
        # held-out documents actually needed with this tokenizer
        total, k = 0, 0
        while k < len(docs) and total < need:
            total += 1 + len(tok.encode(docs[k]))
            k += 1
        if k <= start:
            info = {"documents": [start, end], "bytes": sum(len(d.encode()) for d in docs[start:end]),
                    "note": "trained on training-split documents of the shuffled order (never val/test)"}
            return tok, info
        start = k
    raise PrepareError("could not separate the BPE's training text from val/test (source too small?)")


def _make_tokenizer(corpus: Corpus, cfg: PrepareConfig) -> tuple[Tokenizer, dict]:
    kind, arg = parse_tokenizer_spec(cfg.tokenizer)
    if corpus.pretokenized and kind != "gpt2":
        raise PrepareError(f"--tokenizer {cfg.tokenizer}: the .pt source is already GPT-2 tokenized; use --tokenizer gpt2")
    if kind == "gpt2":
        tok: Tokenizer = GPT2Tokenizer(threads=cfg.threads)
        if corpus.pretokenized and corpus.bos_id != tok.bos_id:
            raise PrepareError(f"--source {cfg.source}: bos_id {corpus.bos_id} is not GPT-2's {tok.bos_id}")
        return tok, {}
    if kind == "file":
        return HFTokenizer.from_file(arg), {"from": str(Path(arg).resolve())}
    if not isinstance(corpus.heldout, list) or corpus.train is not None:
        raise PrepareError(f"--tokenizer {cfg.tokenizer}: training a BPE needs a finite source; "
                           "train it on a local prepare and pass its tokenizer.json")
    return _train_bpe(corpus.heldout, cfg, int(arg))


class _SplitWriter:
    """Appends documents to one split's .bin file, tracking document starts."""

    def __init__(self, path: Path, dtype: np.dtype, budget: int) -> None:
        self.f = open(path, "wb")
        self.dtype = dtype
        self.budget = budget
        self.n = 0
        self.starts: list[int] = []

    @property
    def full(self) -> bool:
        return self.n >= self.budget

    def add(self, ids: np.ndarray) -> int:
        """Write a document (BOS included) cut to the remaining budget; return tokens written."""
        take = min(len(ids), self.budget - self.n)
        if take <= 0:
            return 0
        self.starts.append(self.n)
        self.f.write(ids[:take].astype(self.dtype).tobytes())
        self.n += take
        return take

    def close(self) -> None:
        self.f.close()


def _existing_manifest(out: Path) -> dict | None:
    try:
        return read_json(out / "manifest.json", PrepareError)
    except (OSError, PrepareError):
        return None


def default_dataset(path: str = DEFAULT_DATA, progress: bool = True) -> Path:
    """The builtin default dataset (CPU-track 1x: bpe:8192, 262,144 train tokens), prepared if absent."""
    if not (Path(path) / "manifest.json").is_file():
        print(f"preparing the builtin dataset in {path} (once)", flush=True)
        prepare(PrepareConfig(out=path, progress=progress))
    return Path(path)


def prepare(cfg: PrepareConfig) -> Path:
    """Prepare a dataset; returns its directory. Idempotent for the same parameters.

    A lock beside `--out` is held from the check of what is there to the final rename, so
    a second `prepare` into the same directory is refused instead of replacing the first.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    with exclusive_lock(out.parent / f".{out.name}.lock", f"--out {out}"), _thread_limit(cfg.threads):
        remove_leftovers(out)  # a killed prepare's build directory: no live one writes it while we hold the lock
        return _prepare_locked(cfg, out)


@contextlib.contextmanager
def _thread_limit(threads: int):
    """`--threads N` for the HF tokenizers' pool (BPE training and encoding) as for tiktoken's:
    one thread runs them without a pool; more size the pool, which its first use creates."""
    if threads <= 0:
        yield
        return
    limit = {"TOKENIZERS_PARALLELISM": "false"} if threads == 1 else {"RAYON_NUM_THREADS": str(threads)}
    before = {k: os.environ.get(k) for k in limit}
    os.environ.update(limit)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _prepare_locked(cfg: PrepareConfig, out: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise PrepareError(f"--out {out}: exists and is not a directory")
        old = _existing_manifest(out)
        if old is not None and old.get("params") == cfg.creation_params() and not cfg.force:
            verify_dataset(out)  # same parameters: the dataset is already there, if intact
            return out
        if any(out.iterdir()) and not cfg.force:
            what = "a different dataset" if old is not None else "other files"
            raise PrepareError(f"--out {out}: already holds {what}; use --force to replace it")

    try:
        corpus = open_source(cfg.source, cfg.separator, cfg.text_field, cfg.data_files, cfg.encoding)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    heldout = corpus.heldout
    if corpus.shuffle and isinstance(heldout, list):
        heldout = _shuffled(heldout, cfg.seed)
        corpus.heldout = heldout
    if isinstance(heldout, list) and not heldout:
        raise PrepareError(f"--source {cfg.source}: the corpus is empty (no documents with text)")

    tok, trained = _make_tokenizer(corpus, cfg)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    budgets = {"val": cfg.val_tokens, "test": cfg.test_tokens, "train": cfg.train_tokens}
    total = sum(budgets.values())

    with atomic_directory(out, force=True) as tmp:
        writers = {s: _SplitWriter(tmp / f"{s}.bin", dtype, budgets[s]) for s in SPLITS}
        docs_read = tokens_read = 0
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="prepare", disable=not cfg.progress, dynamic_ncols=True)
        order = [s for s in SPLITS if budgets[s] > 0]

        def fill(stream: Iterable, splits: list[str]) -> None:
            nonlocal docs_read, tokens_read
            queue = list(splits)
            for batch in _batches(stream, cfg.batch_docs):
                encoded = batch if corpus.pretokenized else tok.encode_batch(batch)
                for ids in encoded:
                    if not queue:
                        return
                    doc = np.empty(len(ids) + 1, dtype=np.int64)
                    doc[0] = tok.bos_id
                    doc[1:] = ids
                    docs_read += 1
                    tokens_read += len(doc)
                    bar.update(writers[queue[0]].add(doc))
                    if writers[queue[0]].full:
                        queue.pop(0)
                if not queue:
                    return

        try:
            if corpus.train is None:
                fill(heldout, order)
            else:
                fill(heldout, [s for s in order if s != "train"])
                fill(corpus.train, ["train"])
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        for s in order:
            w = writers[s]
            if not w.full:
                held = sum(writers[x].n for x in order if x != "train")
                have = tokens_read if corpus.train is None else None
                detail = (f"the source holds {have:,} tokens in {docs_read:,} documents; val+test take {held:,}"
                          if have is not None else f"its training file gave only {w.n:,} tokens")
                raise PrepareError(f"--{s}-tokens {budgets[s]:,} is more than the source can give: {detail}")

        token_bytes = np.asarray(token_byte_lengths(tok), dtype=np.int32)
        np.save(tmp / "token_bytes.npy", token_bytes)
        splits = {}
        for s in SPLITS:
            w = writers[s]
            np.save(tmp / f"{s}.docs.npy", np.asarray(w.starts, dtype=np.int64))
            ids = np.memmap(tmp / f"{s}.bin", dtype=dtype, mode="r") if w.n else np.zeros(0, dtype)
            nbytes = int(sum(int(token_bytes[c].sum()) for c in _chunks(ids)))
            splits[s] = {"tokens": w.n, "documents": len(w.starts), "bytes": nbytes}
            del ids
        tok_ref = tok.save(tmp)
        manifest = {
            "format": FORMAT,
            "slowrun_version": __version__,
            "source": corpus.description,
            "tokenizer": {"id": tok_ref, "fingerprint": tokenizer_fingerprint(tok_ref, tmp),
                          "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, **({"trained_on": trained} if trained else {})},
            "dtype": dtype.name,
            "splits": splits,
            "params": cfg.creation_params(),
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        manifest["sha256"] = sha256_json(manifest)  # vocab_size, dtype and counts are covered, not only the files
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return out


def _chunks(ids: np.ndarray, size: int = 1 << 22) -> Iterator[np.ndarray]:
    for i in range(0, len(ids), size):
        yield np.asarray(ids[i:i + size], dtype=np.int64)
