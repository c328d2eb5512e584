"""Reading a prepared dataset: the manifest, hash verification and memory-mapped splits.

The manifest's own fields are checked too, not only the files it lists: it carries a
sha256 of its content, and its vocabulary size, dtype and token counts must agree with
the files (token_bytes.npy has one entry per token id; a split's .bin holds exactly its
token count at its dtype). An edited manifest is refused in one line instead of training a
different model under the same dataset fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import SlowrunError
from .storage import read_json, sha256_file, sha256_json
from .tokenizer import Tokenizer, load_tokenizer

SPLITS = ("val", "test", "train")  # the order in which `slowrun prepare` assigns documents
FORMAT = "slowrun-dataset/1"


class DatasetError(SlowrunError):
    pass


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset directory not found: {path}")
    mf = path / "manifest.json"
    if not mf.is_file():
        raise DatasetError(f"{path} is not a prepared dataset (no manifest.json; run `slowrun prepare --out {path}`)")
    manifest = read_json(mf, DatasetError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise DatasetError(f"{mf}: unknown format {fmt!r} (expected {FORMAT})")
    try:
        _check_manifest(path, manifest)
    except DatasetError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{mf}: malformed manifest ({type(e).__name__}: {e})") from None
    return manifest


ALLOWED_DTYPES = ("uint16", "uint32")


def _check_manifest(path: Path, manifest: dict) -> None:
    """The manifest's semantic fields agree with its own hash and with the files (cheap: no file is read whole)."""
    mf = path / "manifest.json"
    if "sha256" in manifest:  # datasets prepared before the hash existed are checked against the files only
        if manifest["sha256"] != sha256_json({k: v for k, v in manifest.items() if k != "sha256"}):
            raise DatasetError(f"{mf}: edited or corrupt (its sha256 does not match its content)")
    dtype = manifest["dtype"]
    if dtype not in ALLOWED_DTYPES:
        raise DatasetError(f"{mf}: dtype {dtype!r} is not one of {', '.join(ALLOWED_DTYPES)}")
    itemsize = np.dtype(dtype).itemsize
    for split in SPLITS:
        f = path / f"{split}.bin"
        tokens = int(manifest["splits"][split]["tokens"])
        if f.is_file() and f.stat().st_size != tokens * itemsize:
            raise DatasetError(f"{mf}: the {split} split is listed as {tokens:,} tokens of {dtype}, but {f.name} "
                               f"holds {f.stat().st_size:,} bytes")
    vocab = int(manifest["tokenizer"]["vocab_size"])
    tb = path / "token_bytes.npy"
    if tb.is_file():
        n = len(np.load(tb, mmap_mode="r", allow_pickle=False))
        if n != vocab:
            raise DatasetError(f"{mf}: vocab_size {vocab:,} does not match the {n:,} tokens of token_bytes.npy")


def verify_dataset(path: str | Path, manifest: dict | None = None) -> dict:
    """Check every file's sha256 against the manifest; raise naming the first mismatch."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise DatasetError(f"{f}: missing (listed in the manifest)")
        if sha256_file(f) != digest:
            raise DatasetError(f"{f}: sha256 does not match the manifest (the file was modified or corrupted)")
    # every token id inside the vocabulary: catches a manifest whose dtype or vocab_size was edited
    # (one without its own hash, from before the hash existed, is not caught above)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    for split in SPLITS:
        f = path / f"{split}.bin"
        if f.is_file() and f.stat().st_size:
            top = int(np.memmap(f, dtype=manifest["dtype"], mode="r").max())
            if top >= vocab:
                raise DatasetError(f"{f}: holds token id {top:,}, outside the manifest's vocabulary of {vocab:,} "
                                   "(the manifest's dtype or vocab_size was edited?)")
    return manifest


@dataclass
class Dataset:
    """A prepared dataset directory, opened read-only. Splits are memory-mapped on demand."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Dataset":
        path = Path(path)
        manifest = verify_dataset(path) if verify else read_manifest(path)
        return cls(path, manifest)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def bos_id(self) -> int:
        return int(self.manifest["tokenizer"]["bos_id"])

    @property
    def fingerprint(self) -> dict:
        """What two runs must share to be compared: tokenizer and val/test contents."""
        files = self.manifest["files"]
        return {"tokenizer": self.manifest["tokenizer"]["fingerprint"],
                "val": files.get("val.bin"), "test": files.get("test.bin")}

    def num_tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only memmap (nothing is loaded until sliced)."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
        if self.num_tokens(split) == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    def doc_starts(self, split: str) -> np.ndarray:
        return load_array(self.path / f"{split}.docs.npy")

    @cached_property
    def token_bytes(self) -> np.ndarray:
        return load_array(self.path / "token_bytes.npy")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.manifest["tokenizer"]["id"], self.path)

    def describe(self) -> str:
        m = self.manifest
        lines = [f"dataset   {self.path}", f"format    {m['format']} (slowrun {m['slowrun_version']})",
                 f"source    {json.dumps(m['source'])}",
                 f"tokenizer {m['tokenizer']['id']} (vocab {m['tokenizer']['vocab_size']:,}, bos {m['tokenizer']['bos_id']})",
                 f"dtype     {m['dtype']}"]
        for s in SPLITS:
            sp = m["splits"][s]
            lines.append(f"{s:<9} {sp['tokens']:>13,} tokens {sp['documents']:>9,} documents {sp['bytes']:>14,} bytes")
        lines.append(f"params    {json.dumps(m['params'])}")
        lines.append("files")
        for name, digest in m["files"].items():
            lines.append(f"  {name:<18} {digest}")
        return "\n".join(lines)


def training_fingerprint(ds: Dataset) -> dict:
    """The fingerprint plus the training split's sha256: what tells which training tokens a run saw."""
    return {**ds.fingerprint, "train": ds.manifest["files"].get("train.bin")}


COMPARABLE = ("tokenizer", "val", "test")


def require_comparable(a: dict, b: dict, what: str, keys: tuple[str, ...] = COMPARABLE) -> None:
    """Refuse two dataset fingerprints that differ in any of `keys`.

    A fingerprint is `Dataset.fingerprint`, a result.json's `dataset` (which also carries
    `train`, the training split's sha256), a curve's `dataset` or a weights file's; callers
    may add `seq_len`. Losses compare only on the same tokenizer and val/test; a fitness
    slice carved from the training split needs the same `train` too. A key that one side
    does not record (an older result, an external curve) is not compared, except that a
    side with no tokenizer at all cannot be checked and is refused.
    """
    for key in keys:
        x, y = a.get(key), b.get(key)
        if key == "tokenizer" and (x is None) != (y is None):
            raise DatasetError(f"{what}: one side records no tokenizer; cannot tell whether they are comparable")
        if x is not None and y is not None and x != y:
            raise DatasetError(f"{what}: different {key} ({_short(x)} vs {_short(y)}); not comparable")


def _short(value) -> str:
    s = str(value)
    return s[:19] + "..." if len(s) > 22 else s


def load_array(path: Path) -> np.ndarray:
    """A numeric .npy file, never unpickled: an object array (a pickle inside) is refused in one line."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # numpy's "Object arrays cannot be loaded when allow_pickle=False", or a bad header
        raise DatasetError(f"{path}: not a plain numeric array ({str(e).splitlines()[0]})") from None
