"""The curriculum's difficulty score of every training document (`data.curriculum_score`).

`length` scores a document by its token count; a run directory or weights file names a model
that scores it by its mean loss on the document's first seq_len+1 tokens. The loader receives
the scores (`loader.TrainLoader(doc_scores=...)`) and orders each epoch by them; it never
loads a model. Model scores are cached beside the weights, keyed by the weights' and the
training split's sha256, so the ranks of a run and its resumes score once.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .checkpoint import load_model, weights_path
from .dataset import Dataset, load_array, require_comparable
from .loader import doc_bounds
from .storage import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, sha256_file


def document_scores(dataset: Dataset, score: str, seq_len: int, fitness_tokens: int = 0, device: str = "cpu") -> np.ndarray:
    """A difficulty per training document, from the training split only: `length` (tokens), or
    the path of a run (or weights file) whose model scores each document by its mean loss on
    the document's first seq_len+1 tokens. Model scores are cached beside the weights, keyed
    by the weights' and the training split's sha256."""
    starts, lens = doc_bounds(dataset, fitness_tokens)
    if score == "length":
        return lens.astype(np.float64)
    weights = weights_path(score)
    key = {"weights": sha256_file(weights), "train": dataset.manifest["files"].get("train.bin"), "docs": len(starts),
           "seq_len": seq_len}
    cache = weights.with_name(f"doc_scores-{key['weights'][:12]}-{str(key['train'])[:12]}-{len(starts)}-{seq_len}")
    npy, meta = cache.with_suffix(".npy"), cache.with_suffix(".json")
    try:  # the cache is used only when its key matches and the scores are the file it hashed
        stored = read_json(meta) if meta.is_file() else None
        if isinstance(stored, dict) and {k: stored.get(k) for k in key} == key and npy.is_file() \
                and stored.get("scores") == sha256_file(npy):
            return load_array(npy)
    except (ValueError, OSError):  # a SlowrunError is a ValueError
        pass  # an unreadable cache is computed again
    model, cfg, extra = load_model(weights, device)
    if extra.get("dataset"):
        require_comparable(extra["dataset"], dataset.fingerprint, f"the scoring model {score} and {dataset.path}")
    tokens, T = dataset.tokens("train"), min(seq_len, cfg.model.seq_len)
    out = np.full(len(starts), np.nan)
    with torch.no_grad():
        for i, (a, n) in enumerate(zip(starts, lens)):
            if n < 2:
                continue
            doc = torch.from_numpy(np.asarray(tokens[a:a + min(int(n), T + 1)], dtype=np.int64)).to(device)[None]
            logits, _ = model(doc[:, :-1])
            out[i] = torch.nn.functional.cross_entropy(logits[0].float(), doc[0, 1:]).item()
    out[np.isnan(out)] = np.nanmedian(out) if np.isfinite(out).any() else 0.0  # one-token documents: middling
    buf = io.BytesIO()
    np.save(buf, out)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_json(meta, {**key, "scores": sha256_bytes(buf.getvalue())})
    return out
