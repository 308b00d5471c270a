"""Per-token log-probabilities, from the distribution the token was actually sampled from.

That distribution is the model's logits after the repetition/frequency/presence penalties, the grammar's
token mask (constrained output: disallowed tokens have probability 0) and the temperature (1 for greedy
rows, whose "distribution" would otherwise be a point mass). Top-k / top-p / min-p truncation is not
applied: it is a sampling heuristic over this distribution, and applying it would report -inf for
every alternative a client asked to see. docs/engine.md documents this.

`step_logprobs` runs on the device inside the batched step and packs, per row, the chosen token's
logprob and the top-N (id, logprob) pairs into one float tensor, so the step's host copy brings
them back with the tokens; `unpack` turns a row back into a `TokenLogprob` on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MAX_TOP_LOGPROBS = 20
FLOOR = -9999.0  # a token the distribution excludes (masked): JSON has no -inf


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text and logprob, and the `top` likeliest alternatives (id, text, logprob)."""

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()

    def openai(self) -> dict[str, Any]:
        """Chat Completions' shape: {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}."""
        return {
            **_entry(self.text, self.logprob),
            "top_logprobs": [_entry(text, logprob) for _, text, logprob in self.top],
        }


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: Sequence[float], top: int) -> torch.Tensor:
    """[R, 1 + 2·top] float32 on the device: the chosen token's logprob, then `top` logprobs, then their ids.

    `logits` [R, vocab]: penalised and masked, before temperature; `tokens` [R]: the sampled ids;
    `temperatures`: per row, 0 (greedy) read as 1. Ids are exact in float32 below 2**24.
    """
    scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32, device=logits.device)
    logprobs = torch.log_softmax(logits.float() / scale[:, None], dim=-1).clamp_(min=FLOOR)
    chosen = logprobs.gather(1, tokens.view(-1, 1).long())
    if top <= 0:
        return chosen
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    return torch.cat([chosen, values, ids.float()], dim=1)


def unpack(token_id: int, row: Sequence[float], top: int, decode: Callable[[list[int]], list[str]]) -> TokenLogprob:
    """A host row of `step_logprobs` for a request that asked for `top` alternatives; `decode` names tokens."""
    width = (len(row) - 1) // 2
    count = min(top, width)
    ids = [int(row[1 + width + i]) for i in range(count)]
    texts = decode([token_id, *ids])
    pairs = tuple((ids[i], texts[1 + i], float(row[1 + i])) for i in range(count))
    return TokenLogprob(token_id, texts[0], float(row[0]), pairs)


def completions_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy Completions shape: parallel lists of tokens, logprobs, top alternatives and text offsets."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: logprob for _, text, logprob in e.top} for e in entries],
        "text_offset": offsets,
    }
