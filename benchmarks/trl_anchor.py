"""The TRL anchor of ``train_throughput.py``: PEFT + TRL's ``SFTTrainer``, two ways.

``packing``: as a user switching tools would configure it: the same examples as prompt/completion
text (lorakit's rendering of the G2P records), ``packing=True`` (TRL's best-fit-decreasing packing,
which turns on ``padding_free``), ``padding_free=True``, ``completion_only_loss=True``, one packed row
per step. ``max_length`` is the smallest for which the packing makes exactly ``steps`` rows (one
epoch, about as many tokens per step as lorakit's batches), so steps and schedule match.

``batches``: ``SFTTrainer`` fed exactly lorakit's batches (same rows per step, same order, already
tokenised, ``skip_prepare_dataset``) with ``padding_free=True``: its per-step losses and validation
loss must match lorakit's.

Both: fp32 (TRL defaults to bf16), no gradient checkpointing (TRL's default turns it on; the
Trainer anchor and lorakit run without it), fused AdamW and the schedule passed in, no logging,
evaluation or saving. TRL's own per-step work stays: its fused LM head (on CPU it scores every
position: the compact label-only path is for Triton devices) with entropy and top-1 accuracy.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

PACKING = "PEFT + TRL packing"
BATCHES = "PEFT + TRL padding-free, lorakit's batches"


class TrainerStepper:
    """A transformers ``Trainer`` run in its own thread, advanced one optimizer step at a time.

    ``make_trainer(callbacks)`` builds the trainer (``total`` optimizer steps); ``step()`` runs its
    next step and waits for it, so only one run of the interleave computes at a time.
    ``recs``: one dict per step: ``loss`` (mean over label tokens, as the trainer computed it),
    ``tokens`` (the step's non-padding tokens, TRL's own count), ``seconds`` (wall time from the
    step's start to its ``on_step_end``, data loading and callbacks included, time lent to the
    other runs excluded) and ``tokens_per_s``.
    """

    def __init__(self, name: str, make_trainer, total: int):
        from transformers import PrinterCallback, TrainerCallback

        self.name, self.recs, self.error, self.trainer = name, [], None, None
        self.go, self.done = threading.Event(), threading.Event()
        stepper = self

        class Pause(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                if stepper.t0 is None:  # the first step starts here (dataloader set up)
                    stepper.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                stepper.record(time.perf_counter())
                if state.global_step < total:
                    stepper.done.set()
                    stepper.go.wait()
                    stepper.go.clear()
                    stepper.t0 = time.perf_counter()

        self.t0, self.prev_loss, self.prev_tokens = None, 0.0, 0
        self.trainer = make_trainer([Pause()])
        self.trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land among the table

        def run():
            self.go.wait()
            self.go.clear()
            try:
                self.trainer.train()
            except BaseException as e:  # surfaced by the main thread
                self.error = e
            self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def record(self, now: float) -> None:
        tl = float(self.trainer._tr_loss)  # the running sum of step losses (nothing is logged)
        tokens = self.trainer._total_train_tokens
        dt = now - self.t0
        self.recs.append({"loss": tl - self.prev_loss, "tokens": tokens - self.prev_tokens, "seconds": dt,
                          "tokens_per_s": (tokens - self.prev_tokens) / dt})
        self.prev_loss, self.prev_tokens = tl, tokens

    def step(self) -> None:
        self.go.set()
        self.done.wait()
        self.done.clear()
        if self.error is not None:
            raise self.error


def sft_config(out_dir: str, steps: int, batch_size: int, max_grad_norm: float, **kw):
    """``SFTConfig`` shared by both rows: fp32, no gradient checkpointing, nothing logged or saved."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_grad_norm=max_grad_norm, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, dataloader_num_workers=0, seed=0, **kw)


def packed_rows(lengths: list[int], max_length: int) -> int:
    """How many rows TRL's BFD packing makes of sequences of these lengths."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_dict({"input_ids": [[0] * n for n in lengths], "labels": [[0] * n for n in lengths]})
    return len(pack_dataset(ds, max_length, "bfd", {}))


def packing_length(lengths: list[int], steps: int) -> int:
    """The smallest ``max_length`` (>= the longest sequence, so nothing is cut) with at most ``steps`` rows."""
    lo, hi = max(lengths), max(max(lengths), sum(lengths))
    while lo < hi:
        mid = (lo + hi) // 2
        if packed_rows(lengths, mid) <= steps:
            hi = mid
        else:
            lo = mid + 1
    return lo


def prompt_completion(tokenizer, records, prompt_format) -> list[dict]:
    """The records as TRL's prompt/completion text: lorakit's rendered prompt; the completion with its EOS."""
    from lorakit.app import data as D

    out = []
    for rec in records:
        (prompt, _), (completion, _) = D.segments(tokenizer, rec, "g2p", prompt_format)
        out.append({"prompt": prompt, "completion": completion})
    return out


def _trainer_class(sequential: bool):
    from torch.utils.data import SequentialSampler
    from trl import SFTTrainer

    if not sequential:
        return SFTTrainer

    class SequentialSFTTrainer(SFTTrainer):  # lorakit's batches in lorakit's order
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return SequentialSFTTrainer


def make_packing(peft_model, tokenizer, texts: list[dict], lengths: list[int], steps: int, opt_sched, out_dir,
                 max_grad_norm: float):
    """A factory (callbacks -> ``SFTTrainer``) for the ``packing`` row, and its ``max_length``."""
    from datasets import Dataset

    max_length = packing_length(lengths, steps)
    args = sft_config(out_dir, steps, 1, max_grad_norm, packing=True, padding_free=True, completion_only_loss=True,
                      max_length=max_length)

    def make(callbacks):
        return _trainer_class(False)(model=peft_model, args=args, train_dataset=Dataset.from_list(texts),
                                     processing_class=tokenizer, optimizers=opt_sched, callbacks=callbacks)

    return make, max_length


def make_batches(peft_model, tokenizer, flat, batch_size: int, steps: int, opt_sched, out_dir,
                 max_grad_norm: float):
    """A factory (callbacks -> ``SFTTrainer``) for the ``batches`` row: ``flat`` is lorakit's batches, concatenated."""
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in flat], "labels": [e.labels for e in flat]})
    args = sft_config(out_dir, steps, batch_size, max_grad_norm, padding_free=True, max_length=None,
                      dataset_kwargs={"skip_prepare_dataset": True})

    def make(callbacks):
        return _trainer_class(True)(model=peft_model, args=args, train_dataset=ds, processing_class=tokenizer,
                                    optimizers=opt_sched, callbacks=callbacks)

    return make


def trl_steppers(kinds, peft_copy, tokenizer, texts, flat, batch_size, steps, make_opt, out_dir, max_grad_norm):
    """``TrainerStepper``s for ``kinds`` (``"packing"``, ``"batches"``), each on its own copy of the PEFT model.

    Returns ``(steppers, models, info)``: ``models`` maps row name to the PEFT model it trains;
    ``info`` holds the packing's ``max_length`` and its total tokens.
    """
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing rename
    steppers, models, info = [], {}, {}
    for kind in kinds:
        model = peft_copy()
        sub = os.path.join(out_dir, f"trl-{kind}")
        if kind == "packing":
            lengths = [len(e) for e in flat]
            make, info["max_length"] = make_packing(model, tokenizer, texts, lengths, steps, make_opt(model), sub,
                                                    max_grad_norm)
            name = PACKING
        else:
            make = make_batches(model, tokenizer, flat, batch_size, steps, make_opt(model), sub, max_grad_norm)
            name = BATCHES
        st = TrainerStepper(name, make, steps)
        if kind == "packing":
            rows = st.trainer.train_dataset
            info["rows"], info["tokens"] = len(rows), sum(len(x) for x in rows["input_ids"])
        steppers.append(st)
        models[name] = model
    return steppers, models, info
