"""Multi-epoch training batches from the training split (and only from it).

Each epoch: shuffle the document order (seeded by the run seed and the epoch), concatenate,
cut the stream into sequences of seq_len+1 tokens at a stride of seq_len (the boundaries
move every epoch, since the documents move), shuffle the sequences. With `chunking =
"disjoint"` (the reference's loader) the sequences are back-to-back chunks of seq_len+1
tokens, shuffled, and an epoch keeps a multiple of `epoch_multiple` of them (the rest of the
shuffled chunks dropped), so that epochs end on the reference's steps. Epochs follow each
other as one stream, so every training token is used once per epoch; a batch may straddle
an epoch boundary. The position (epoch, index) is all the state there is: the order of an
epoch is a pure function of (seed, epoch), so a resumed run reads exactly what the
uninterrupted one would have. Tokens stay memory-mapped: memory does not grow with the
dataset, only with the document count (one int64 per document).

A curriculum (`curriculum` != "off", with a difficulty score per training document, given by
the caller: `curriculum.document_scores`) sorts that epoch's shuffled document order by the score (a stable sort,
so equal scores keep the epoch's random order): easy_to_hard ascending, hard_to_easy
descending, mixed alternating (easy to hard on even epochs, hard to easy on odd ones, so
every epoch boundary joins documents of like difficulty). Sequences are then served in
stream order (a sequence shuffle would undo the order), or, with `curriculum_blocks` = N > 0,
shuffled within each of N consecutive blocks of the epoch (a bucketed curriculum: the order by
difficulty holds from block to block, and a batch is a random draw from its block rather than
a run of adjacent sequences). Off, nothing changes: the same random draws, the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dataset import Dataset
from .steps import epoch_seqs, trained_tokens

CURRICULA = ("off", "easy_to_hard", "hard_to_easy", "mixed")


def fitness_slice(dataset: Dataset, tokens: int) -> np.ndarray:
    """The last `tokens` training tokens: held out from training for ensemble member selection."""
    train = dataset.tokens("train")
    return train[trained_tokens(len(train), tokens):]


def doc_bounds(dataset: Dataset, fitness_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every training document the loader serves (the fitness slice cut off)."""
    n = trained_tokens(len(dataset.tokens("train")), fitness_tokens)
    starts = dataset.doc_starts("train")
    starts = starts[starts < n].astype(np.int64)
    return starts, np.diff(np.append(starts, n))


@dataclass
class _EpochPlan:
    epoch: int
    offsets: np.ndarray  # (n_docs + 1,) start of each shuffled document in the epoch's stream
    doc_start: np.ndarray  # (n_docs,) where each shuffled document lives in the memmap
    seq_order: np.ndarray  # (seqs_per_epoch,) sequence indices in the order they are served


class TrainLoader:
    """Yields this rank's share of each global batch as (inputs, targets), each (B, T) int64."""

    def __init__(self, dataset: Dataset, seq_len: int, batch_seqs: int, seed: int = 0, doc_shuffle: bool = True,
                 seq_shuffle: bool = True, rank: int = 0, world_size: int = 1, fitness_tokens: int = 0,
                 curriculum: str = "off", doc_scores: np.ndarray | None = None, curriculum_blocks: int = 0,
                 chunking: str = "stride", epoch_multiple: int = 1) -> None:
        if batch_seqs % world_size:
            raise ValueError(f"global batch of {batch_seqs} sequences does not split over {world_size} ranks")
        self.tokens = dataset.tokens("train")
        self.doc_starts, self.doc_lens = doc_bounds(dataset, fitness_tokens)
        n = trained_tokens(len(self.tokens), fitness_tokens)
        self.num_tokens = n
        if curriculum not in CURRICULA:
            raise ValueError(f"curriculum {curriculum!r}: must be one of {', '.join(CURRICULA)}")
        if curriculum != "off" and (doc_scores is None or len(doc_scores) != len(self.doc_starts)):
            raise ValueError(f"curriculum {curriculum} needs one score per training document ({len(self.doc_starts)})")
        if curriculum_blocks < 0 or (curriculum_blocks and curriculum == "off"):
            raise ValueError(f"curriculum_blocks {curriculum_blocks}: must be >= 0, and 0 without a curriculum")
        self.curriculum, self.doc_scores, self.curriculum_blocks = curriculum, doc_scores, curriculum_blocks
        self.seq_len = seq_len
        self.seqs_per_epoch = epoch_seqs(n, seq_len, chunking, epoch_multiple)
        self.stride = seq_len if chunking == "stride" else seq_len + 1  # tokens between sequence starts
        self.num_chunks = n // (seq_len + 1) if chunking == "disjoint" else self.seqs_per_epoch  # before the drop
        if self.seqs_per_epoch < batch_seqs:
            raise ValueError(f"the training split ({n:,} tokens) holds {self.seqs_per_epoch} sequences of {seq_len}, "
                             f"fewer than one batch ({batch_seqs})")
        self.batch_seqs = batch_seqs
        self.seed, self.doc_shuffle, self.seq_shuffle = seed, doc_shuffle, seq_shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._plan: _EpochPlan | None = None

    # position -------------------------------------------------------------------------

    @property
    def epochs_done(self) -> float:
        """Epochs consumed so far, fractional."""
        return self.epoch + self.pos / self.seqs_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._plan = None

    # the epoch's order ----------------------------------------------------------------

    def plan(self, epoch: int) -> _EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n_docs = len(self.doc_starts)
            order = rng.permutation(n_docs) if self.doc_shuffle else np.arange(n_docs)
            if self.curriculum != "off":
                up = self.curriculum == "easy_to_hard" or (self.curriculum == "mixed" and epoch % 2 == 0)
                key = self.doc_scores[order]
                order = order[np.argsort(key if up else -key, kind="stable")]
            offsets = np.zeros(n_docs + 1, dtype=np.int64)
            np.cumsum(self.doc_lens[order], out=offsets[1:])
            shuffle = self.seq_shuffle and self.curriculum == "off"
            # disjoint chunks: the epoch's first seqs_per_epoch of the shuffled chunks (the reference drops the rest)
            seqs = (rng.permutation(self.num_chunks)[: self.seqs_per_epoch] if shuffle else np.arange(self.seqs_per_epoch))
            if self.curriculum_blocks:  # shuffled within each block: the blocks keep their order
                for block in np.array_split(seqs, min(self.curriculum_blocks, self.seqs_per_epoch)):
                    rng.shuffle(block)  # a view into seqs
            self._plan = _EpochPlan(epoch, offsets, self.doc_starts[order], seqs)
        return self._plan

    def sequence(self, epoch: int, index: int) -> np.ndarray:
        """Sequence `index` (in serving order) of `epoch`: seq_len+1 tokens of the shuffled stream."""
        p = self.plan(epoch)
        a = int(p.seq_order[index]) * self.stride
        b = a + self.seq_len + 1
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        d = int(np.searchsorted(p.offsets, a, side="right")) - 1
        filled = 0
        while filled < len(out):
            lo = a + filled - p.offsets[d]
            take = min(int(p.offsets[d + 1] - p.offsets[d] - lo), b - a - filled)
            src = p.doc_start[d] + lo
            out[filled:filled + take] = self.tokens[src:src + take]
            filled += take
            d += 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch; advances the position for all ranks."""
        per_rank = self.batch_seqs // self.world_size
        first = self.rank * per_rank
        rows = []
        for i in range(self.batch_seqs):
            if first <= i < first + per_rank:
                rows.append(self.sequence(self.epoch, self.pos))
            self.pos += 1
            if self.pos == self.seqs_per_epoch:
                self.epoch, self.pos = self.epoch + 1, 0
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]
