"""``lorakit train --full``: full fine-tuning in the same loop, on the same data and steps, as the
LoRA baseline the LoRA paper compares with (Hu et al. 2021, Table 2, "FT"). Every parameter is
trained (AdamW state for all of them: about 4x the model's size in memory), no adapter is injected,
and the trained model is written as a plain transformers checkpoint in ``OUTPUT/model``, which
``lorakit generate --model OUTPUT/model`` and ``eval`` load like any base model."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import UsageError

from .files import write_folder
from .models import make_plain, write_metadata

MODEL_DIR = "model"
# options that need an adapter (checkpoints hold adapter files) or a LoRA config
REFUSED = {"save_every": 0, "resume": None, "nproc": 1, "fsdp": False, "dora": False, "rslora": False,
           "quantize": None}  # -> neutral


def check(o, given: frozenset[str]) -> None:
    """Refuse ``--full`` with options that only make sense with an adapter.

    Raises:
        UsageError: the first such option given, named.
    """
    for name, neutral in REFUSED.items():
        if name in given and getattr(o, name) != neutral:
            raise UsageError(f"--full trains the whole model without an adapter; it does not combine with "
                           f"--{name.replace('_', '-')}")


def prepare(model) -> int:
    """Make every parameter trainable; returns their count."""
    for p in model.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())


def save(model, tokenizer, out: Path, meta: dict) -> Path:
    """Write the fine-tuned model, its tokenizer and ``lorakit.json`` to ``out/model`` atomically."""
    dest = out / MODEL_DIR
    make_plain(model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_metadata(tmp, meta | {"full_fine_tuning": True})

    write_folder(dest, fill, replace=True)
    return dest
