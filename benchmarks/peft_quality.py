"""The PEFT arm of quality.py (issue 17, item 1c): lorakit's default G2P run, trained with Hugging Face PEFT.

    python benchmarks/peft_quality.py --output runs/quality/PEFT --seed 0            # what quality.py runs
    python benchmarks/peft_quality.py --output /tmp/peft-smoke --steps 3 --test-size 8   # smoke check

The same base model as ``lorakit train`` (the default SmolLM2 GGUF through ``load_base``), the same adapter
config as its default run (``TrainOptions`` + the built-in task's defaults: r = 16, alpha 32, dropout 0, the
seven projections), PEFT's own initialisation (``get_peft_model`` after ``torch.manual_seed(seed)``, as
``lorakit train`` seeds before ``inject``), the same training words (the split of ``--split-seed``), the same
batches in the same order (``batch_stream`` with ``seed``), the same optimizer and schedule (fused AdamW, cosine
with warmup, clipping at 1.0), trained by transformers ``Trainer`` (``train_throughput.trainer_anchor``, whose
sequential sampler replays those batches). Then, as ``lorakit train`` does: the merged model
(``merge_and_unload``) decodes the same test words with the same decoding (``evaluate_g2p``, ``--num-beams``
beams, default the CLI's) and the same validation loss (``mean_loss``).

Writes ``eval.json`` (``after``: PER / exact match; ``train``: steps, tokens, seconds), ``metrics.jsonl`` (each
step's loss, the last row with ``val_loss``) and ``lorakit.json`` (``trainable_parameters``) into ``--output``,
the files quality.py reads from a ``lorakit train`` folder.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as TT  # noqa: E402  (sets OMP_WAIT_POLICY and offline mode before torch loads)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lorakit.app import batches as B  # noqa: E402
from lorakit.app import data as D  # noqa: E402
from lorakit.app import g2p as G  # noqa: E402
from lorakit.app import loop as LT  # noqa: E402
from lorakit.app.evaluate import evaluate_g2p  # noqa: E402
from lorakit.app.lm_loss import mean_loss  # noqa: E402
from lorakit.app.models import DEFAULT_MODEL, load_base  # noqa: E402
from lorakit.app.options import TrainOptions, task_defaults  # noqa: E402


def default_options(**over) -> TrainOptions:
    """``lorakit train``'s options for the built-in task with no flags (then ``over``)."""
    return TrainOptions(**{**task_defaults("g2p", over), **over})


def peft_model(base, o: TrainOptions, seed: int):
    """``base`` wrapped by PEFT with the adapter config of ``o``, PEFT's init drawn after ``manual_seed(seed)``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=o.r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout, target_modules=list(o.target_modules),
                     use_rslora=o.rslora)
    return get_peft_model(base, cfg)


def train(model, train_ex, cfg: LT.TrainConfig, pad_id: int, work: str) -> tuple[list[float], list[list], float]:
    """Trainer on lorakit's batches (``batch_stream``); (per-step losses, the batches, seconds)."""
    stream = B.batch_stream(train_ex, cfg.batch_size, cfg.seed)
    batches = [next(stream) for _ in range(cfg.steps)]
    if any(len(b) != cfg.batch_size for b in batches):
        raise SystemExit("a partial batch: Trainer's sequential sampler could not reproduce the order")
    flat = [e for b in batches for e in b]
    times, losses = [], []
    opt_sched = TT.optimizer_factory(cfg, cfg.steps)(model)
    trainer = TT.trainer_anchor(model, flat, pad_id, cfg, cfg.steps, work, opt_sched, [], times, losses)
    t = time.perf_counter()
    trainer.train()
    return losses, batches, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0, help="PEFT's init and the batch order (lorakit train --seed)")
    p.add_argument("--split-seed", type=int, default=0, help="the train/validation/test split (--split-seed)")
    p.add_argument("--steps", type=int, default=None, help="default: lorakit train's on the built-in task")
    p.add_argument("--test-size", type=int, default=TrainOptions().test_size)
    p.add_argument("--num-beams", type=int, default=TrainOptions().num_beams)
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    o = default_options(**({"steps": args.steps} if args.steps else {}))
    cfg = o.train_config(seed=args.seed)
    lm = load_base(DEFAULT_MODEL)
    tok, pad_id = lm.tokenizer, lm.tokenizer.pad_token_id
    split = G.g2p_split(args.split_seed, args.test_size, G.G2P_VALIDATION)
    n_words = min(len(split.train), cfg.steps * cfg.batch_size)  # as cmd_train: only the words the run sees
    train_ex = D.tokenize_dataset(tok, G.g2p_dataset(split.train[:n_words]), o.max_length)
    val_ex = D.tokenize_dataset(tok, G.g2p_dataset(split.validation), o.max_length)
    model = peft_model(lm.model, o, args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"PEFT LoRA r={o.r} alpha={o.lora_alpha:g} on {o.target_modules}: {trainable:,} trainable; "
          f"{len(train_ex)} training words, {cfg.steps} steps of {cfg.batch_size}, lr {cfg.lr:g}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        losses, batches, seconds = train(model, train_ex, cfg, pad_id, work)
    merged = model.merge_and_unload().eval()
    val = mean_loss(merged, val_ex, pad_id)[0]
    t = time.perf_counter()
    after, _ = evaluate_g2p(merged, tok, split.test, G.g2p_dataset(split.test).prompt_format, num_beams=args.num_beams)
    print(f"after: exact match {after['exact_match']:.3f}, PER {after['per']:.3f} "
          f"({time.perf_counter() - t:.0f} s, {args.num_beams} beams); val loss {val:.4f}", flush=True)
    tokens = sum(len(e) for b in batches for e in b)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    rows[-1]["val_loss"] = val
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "lorakit.json").write_text(json.dumps({"trainable_parameters": trainable, "tool": "peft",
                                                  "seed": args.seed, "split_seed": args.split_seed}))
    summary = {"steps": cfg.steps, "tokens": tokens, "train_seconds": seconds, "tokens_per_s": tokens / seconds}
    ev = {"after": after, "num_beams": args.num_beams, "train": summary, "wall_seconds": time.perf_counter() - t_start}
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
