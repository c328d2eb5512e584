"""Text generation from a trained model: `slowrun sample RUN_DIR --prompt ...`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


@torch.no_grad()
def stream(model: torch.nn.Module, ids: list[int], max_new_tokens: int, seq_len: int, temperature: float = 0.8,
           top_k: int = 50, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Iterator[int]:
    """Sample up to `max_new_tokens` continuations of `ids` (greedy when temperature is 0), one id
    at a time. Each step runs the model on the last `seq_len` tokens and scores the last position
    only (the full (T, V) logits of every position are not needed to pick one token)."""
    model.eval()
    x = torch.tensor([ids[-seq_len:]], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model.logits(model.hidden(x)[:, -1:])[0, -1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)[:, -seq_len:]  # the context only
        yield nxt


def generate(model: torch.nn.Module, ids: list[int], max_new_tokens: int, seq_len: int, temperature: float = 0.8,
             top_k: int = 50, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> list[int]:
    """The ids `stream` samples, all at once."""
    return list(stream(model, ids, max_new_tokens, seq_len, temperature, top_k, generator, device))


def text_pieces(tokens: Iterator[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """The decoded text of a token stream, piece by piece as the tokens come. A byte-level
    decoder's text is the concatenation of its tokens' bytes, so each piece decodes only the
    tokens since the last one; a multi-byte character split across tokens (its decoded tail the
    replacement character U+FFFD) is held back until it is complete, and given as it is at the end."""
    pending: list[int] = []
    for t in tokens:
        pending.append(t)
        text = decode(pending)
        if not text.endswith("\ufffd"):
            yield text
            pending = []
    if pending:
        yield decode(pending)
