"""Evaluation: greedy decoding, exact match and phoneme error rate for the built-in G2P task,
loss / perplexity on a user's data."""

from __future__ import annotations

import math

import torch

from .data import render_prompt
from .devices import to_model


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def phoneme_errors(hyp: list[str], refs: list[list[str]]) -> tuple[int, int]:
    """``(edits, reference_length)`` against the closest reference pronunciation.

    The closest reference is the one with the fewest edits (ties: the lower edits/length).
    """
    return min(((edit_distance(hyp, r), len(r)) for r in refs), key=lambda e: (e[0], e[0] / max(1, e[1])))


def g2p_scores(predictions: list[str], references: list[list[list[str]]]) -> dict:
    """Exact match and phoneme error rate of predicted pronunciations.

    Args:
        predictions: decoded completions, phonemes separated by whitespace (``"HH AH0 L OW1"``).
        references: per word, its listed pronunciations (lists of phonemes); any one counts.

    Returns:
        ``{"exact_match", "per", "words"}``: exact match is the fraction of words whose
        prediction equals a listed pronunciation; PER is the summed edit distance to each
        word's closest pronunciation divided by the summed length of those pronunciations
        (corpus-level, as in the G2P literature; it can exceed 1 for long garbage).
    """
    exact, edits, length = 0, 0, 0
    for pred, refs in zip(predictions, references, strict=True):
        hyp = pred.split()
        exact += any(hyp == r for r in refs)
        e, n = phoneme_errors(hyp, refs)
        edits, length = edits + e, length + n
    n_words = len(predictions)
    return {
        "exact_match": exact / n_words if n_words else float("nan"),
        "per": edits / length if length else float("nan"),
        "words": n_words,
    }


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: the text without special tokens, after the BOS token when
    the tokenizer adds one (as ``data.tokenize_example`` encodes training prompts)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a").input_ids[:1] == [bos]:
        ids = [bos] + ids
    return ids


@torch.no_grad()
def generated_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 64,
                     num_beams: int = 1) -> list[torch.Tensor]:
    """The new token ids (int64, at most ``max_new_tokens``, padded after EOS) generated for each of
    ``prompts`` (already rendered texts), in the input order: greedy, or beam search with ``num_beams``
    > 1 (length penalty 1, done when every beam has ended).

    Prompts are sorted by length and batched with left padding; decoding runs on the model's device
    (``devices.model_device``), uses the KV cache and stops at the tokenizer's EOS; the ids come back on the CPU.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(prompts)
    enc_all = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(enc_all[i]))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = tokenizer.pad({"input_ids": [enc_all[i] for i in idx]}, return_tensors="pt")
            input_ids, attention_mask = to_model(model, batch["input_ids"], batch["attention_mask"])
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
                **({"num_beams": num_beams, "early_stopping": True} if num_beams > 1 else {}),
            )
            for i, row in zip(idx, gen[:, input_ids.shape[1]:].cpu()):
                out[i] = row
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 64,
                    num_beams: int = 1) -> list[str]:
    """Greedy completions (beam search with ``num_beams`` > 1) of already rendered prompt texts
    (``generated_tokens``), special tokens dropped, surrounding whitespace stripped.

    Returns:
        one completion string per prompt, in the input order.
    """
    rows = generated_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, num_beams)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def evaluate_g2p(model, tokenizer, items, prompt_format: dict, batch_size: int = 64, max_new_tokens: int | None = None,
                 num_beams: int = 1):
    """Greedy-decode (or beam-search, ``num_beams`` > 1) each word's pronunciation and score it.

    Args:
        items: ``(word, [pronunciation, ...])`` pairs (see ``g2p.G2PSplit``).
        max_new_tokens: default: the longest reference in tokens + 2.

    Returns:
        ``(scores, predictions)``: ``g2p_scores`` dict and the decoded strings.
    """
    if max_new_tokens is None:  # room for the longest reference + EOS: bounds a babbling base model
        max_new_tokens = 2 + max(len(tokenizer(" ".join(p), add_special_tokens=False).input_ids) for _, refs in items for p in refs)
    prompts = [render_prompt(tokenizer, w, prompt_format) for w, _ in items]
    preds = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            num_beams=num_beams)
    return g2p_scores(preds, [refs for _, refs in items]), preds


def perplexity(mean_nats: float) -> float:
    """``exp(mean loss)``; inf on overflow."""
    try:
        return math.exp(mean_nats)
    except OverflowError:
        return float("inf")
