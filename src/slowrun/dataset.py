"""Reading a prepared dataset: the manifest, hash verification and memory-mapped splits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import SlowrunError
from .prepare import FORMAT, SPLITS
from .storage import sha256_file
from .tokenizer import Tokenizer, load_tokenizer


class DatasetError(SlowrunError):
    pass


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset directory not found: {path}")
    mf = path / "manifest.json"
    if not mf.is_file():
        raise DatasetError(f"{path} is not a prepared dataset (no manifest.json; run `slowrun prepare --out {path}`)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mf}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{mf}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


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
        return np.load(self.path / f"{split}.docs.npy", allow_pickle=False)

    @cached_property
    def token_bytes(self) -> np.ndarray:
        return np.load(self.path / "token_bytes.npy", allow_pickle=False)

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
