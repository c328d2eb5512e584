"""Text generation from a trained model: `slowrun sample RUN_DIR --prompt ...`."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model: torch.nn.Module, ids: list[int], max_new_tokens: int, seq_len: int, temperature: float = 0.8,
             top_k: int = 50, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> list[int]:
    """Sample `max_new_tokens` continuations of `ids` (greedy when temperature is 0)."""
    model.eval()
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits, _ = model(x[:, -seq_len:])
        logits = logits[0, -1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    return x[0, len(ids):].tolist()
