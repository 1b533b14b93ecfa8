"""Per-sequence decoding state: choosing the next token (greedy, temperature, top-p) and turning
the generated ids into text deltas that never cut a stop string or a multi-byte character."""

from __future__ import annotations

import hashlib
import secrets

import torch


GREEDY_BELOW = 1e-5  # temperatures below are greedy (as vLLM): logits / 1e-310 would overflow


def choice_seed(seed: int, j: int) -> int:
    """The generator seed of choice ``j`` of a request with ``seed``: ``seed`` itself for the first (what
    ``n=1`` gives), a 63-bit hash of ``(seed, j)`` for the others. ``seed + j`` made choice 1 of seed 1 the
    answer of seed 2, so sweeping seeds with ``n > 1`` repeated samples."""
    if j == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest(), "big") >> 1


class Sampler:
    """Next-token choice for one sequence.

    ``temperature`` below ``GREEDY_BELOW`` (0 included) is greedy (argmax, as ``generate(do_sample=False)``); otherwise a draw
    from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (Holtzman et al. 2020), from the sequence's own generator,
    so a request's ``seed`` reproduces it whatever else shares the batch.
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.generator = None
        if temperature >= GREEDY_BELOW:
            self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def choose(self, logits: torch.Tensor) -> int:
        """``logits``: float (vocab,) of the last position. Returns the token id."""
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the more likely tokens
            sorted_p[before >= self.top_p] = 0.0  # the top token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """Generated ids -> text, with OpenAI's stop strings (the match and what follows are dropped).

    ``push`` returns only text that can no longer change: it holds back a trailing partial
    UTF-8 character (the tokenizer decodes it as U+FFFD) and any tail that could still grow
    into a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated id; returns the new settled text (possibly empty). After a stop
        string appears, ``stopped`` is True and the text ends before it."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - self._held(text)
        return self._take(safe)

    def flush(self) -> str:
        """The rest of the text at the end of the sequence."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        tail = text[: len(text) - held]
        for s in self.stop:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(tail)), 0, -1):
                if tail.endswith(s[:k]):
                    held = max(held, len(text) - len(tail) + k)
                    break
        return held
