"""Training throughput at equal quality: lorakit's trainer vs PEFT + transformers Trainer.

    python benchmarks/train_throughput.py                       # SmolLM2-135M-Instruct, 30 steps of 8
    python benchmarks/train_throughput.py --levers no-pack   # also lorakit with a lever off
    python benchmarks/train_throughput.py --model small --steps 10     # quick run, random 4-layer Llama

Both tools train r=8, lora_alpha=16, dropout 0 on the seven projections from the same initial
adapter (lorakit's init, loaded into the PEFT model), on the default G2P data built with the same
functions as ``lorakit train``, in the order of ``lorakit.app.batches.batch_stream`` (Trainer gets the
same examples as a flat list under a sequential sampler), with fused AdamW (Trainer's default optimizer
for torch >= 2.8; lorakit's too) and the same schedule (transformers' cosine with warmup),
gradient clipping at 1.0, float32, no evaluation or saving during training.

The runs are interleaved step by step in one process (each lorakit variant runs in a thread that
takes one optimizer step whenever Trainer finishes one; only one of them computes at a time), so
load drifts of a shared machine hit all alike. Trainer's step time is the wall time between
consecutive ``on_step_end`` callbacks minus the time lent to lorakit, i.e. it includes its data
loading, callbacks and bookkeeping; lorakit's is the ``tokens_per_s`` its ``train()`` logs (collate +
forward + backward + clip + AdamW). Tokens are non-padding tokens. The first step is a warm-up.
Validation loss of each is ``lorakit.app.lm_loss.mean_loss`` on the same validation examples.

Levers (``--levers``, each an extra lorakit run in the same interleave, identical otherwise):
``full-head`` computes the LM head and loss on every position (transformers' loss) instead of
only at label positions, on the padded batch; ``no-pack`` runs the padded batch instead of packed
rows (``label_loss(pack=True)``: the common prefix once, no padding); ``unfused`` adds the bypass
as ``out.add_(B(s·A x))`` (a separate B product, then an add) instead of one ``addmm_`` into the
base output; ``eager`` uses eager attention instead of SDPA; ``compile`` is the other
way round, lorakit with ``TrainConfig(compile=True)`` (``torch.compile`` of each transformer block;
its first step, excluded as the warm-up, is the compilation and is printed). Length batching is used
by both tools (same batches), so its effect is reported as the padding it saves against random
batches of the same examples.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the lorakit CLI does; read when torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorakit  # noqa: E402
import lorakit.app.lm_loss as LL  # noqa: E402
from common import SEVEN, base_model, machine  # noqa: E402
from lorakit import LoRAConfig  # noqa: E402
from lorakit.app import batches as B  # noqa: E402
from lorakit.app import data as D  # noqa: E402
from lorakit.app import g2p as G  # noqa: E402
from lorakit.app import loop as LT  # noqa: E402
from lorakit.app.options import TrainOptions  # noqa: E402
from lorakit.layers import LoRALayer  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0)


def g2p_examples(tokenizer, steps: int, batch_size: int, seed: int = 0):
    """Training and validation examples exactly as ``lorakit train`` builds them for the built-in task."""
    split = G.g2p_split(seed, TrainOptions().test_size, G.G2P_VALIDATION)
    n_words = min(len(split.train), steps * batch_size)  # cmd_train tokenises only the words the run sees
    train_ex = D.tokenize_dataset(tokenizer, G.g2p_dataset(split.train[:n_words]), G.G2P_MAX_LENGTH)
    val_ex = D.tokenize_dataset(tokenizer, G.g2p_dataset(split.validation), G.G2P_MAX_LENGTH)
    return train_ex, val_ex


def full_head_loss(model, input_ids, attention_mask, labels, **kw):
    """The lever off: LM head and cross entropy on every position, as transformers computes it."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target = labels[:, 1:]
    n = int((target != D.IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=D.IGNORE,
                           reduction="sum")
    return loss, n


_LABEL_LOSS = LL.label_loss


def _set_attn(model, impl: str) -> None:
    model.config._attn_implementation = impl
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = impl


class Variant:
    """One lorakit run in its own thread, advanced one optimizer step at a time."""

    ORIGINAL = {"label_loss": LL.label_loss, "linear_up": LoRALayer.linear_up}

    def __init__(self, name: str, model, train_ex, cfg, pad_id):
        self.name, self.model, self.recs = name, model, []
        self.go, self.done = threading.Event(), threading.Event()
        self.patch = {}
        if name == "full-head":
            self.patch["label_loss"] = full_head_loss
        if name == "no-pack":  # label_loss on the padded batch
            self.patch["label_loss"] = lambda m, i, a, lab, **kw: _LABEL_LOSS(m, i, a, lab)
        if name == "unfused":
            self.patch["linear_up"] = False  # LoRALayer._up_add's generic branch: F.linear, then add_
        if name == "eager":
            _set_attn(model, "eager")
        if name == "compile":
            cfg = dataclasses.replace(cfg, compile=True)
        self.error = None
        total = cfg.total_steps(len(train_ex))

        def on_log(rec):
            self.recs.append(rec)
            if rec["step"] < total:
                self.done.set()
                self.go.wait()
                self.go.clear()

        def run():
            self.go.wait()
            self.go.clear()
            try:
                LT.train(model, LL.lm_task(train_ex, pad_id, cfg), cfg, on_log=on_log, progress=False)
            except BaseException as e:  # surfaced by the main thread
                self.error = e
            self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def step(self) -> None:
        """Run this variant's next optimizer step (with its patches installed) and wait for it."""
        LL.label_loss = self.patch.get("label_loss", self.ORIGINAL["label_loss"])
        LoRALayer.linear_up = self.patch.get("linear_up", self.ORIGINAL["linear_up"])
        try:
            self.go.set()
            self.done.wait()
            self.done.clear()
        finally:
            LL.label_loss, LoRALayer.linear_up = self.ORIGINAL["label_loss"], self.ORIGINAL["linear_up"]
        if self.error is not None:
            raise self.error


def padding_stats(examples, batches) -> tuple[int, int]:
    """(real tokens, padded tokens B*T_max) of a batch list."""
    real = sum(len(e) for b in batches for e in b)
    padded = sum(len(b) * max(len(e) for e in b) for b in batches)
    return real, padded


def _stats(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return statistics.median(xs), q[0], q[2], (max(xs) - min(xs)) / 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=TrainOptions().batch_size)
    ap.add_argument("--levers", default="", help="comma list of extra lorakit runs: full-head, unfused, eager, no-pack, compile")
    ap.add_argument("--no-label-head", action="store_true", help="same as adding full-head to --levers")
    args = ap.parse_args(argv)
    levers = [x for x in args.levers.split(",") if x]
    if args.no_label_head and "full-head" not in levers:
        levers.append("full-head")
    bad = set(levers) - {"full-head", "unfused", "eager", "no-pack", "compile"}
    if bad:
        ap.error(f"unknown levers {sorted(bad)}")

    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()
    from lorakit.app.models import load_model

    t_load = time.perf_counter()
    lm = load_model(None)
    tok = lm.tokenizer
    base = lm.model.eval() if args.model == "smollm2" else base_model("small")
    pad_id = tok.pad_token_id
    train_ex, val_ex = g2p_examples(tok, args.steps, args.batch_size)
    defaults = TrainOptions()
    cfg = LT.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=defaults.lr, warmup=defaults.warmup,
                         seed=defaults.seed)
    stream = B.batch_stream(train_ex, cfg.batch_size, cfg.seed)
    batches = [next(stream) for _ in range(args.steps)]  # exactly what train() will draw
    if any(len(b) != args.batch_size for b in batches):
        raise SystemExit("a partial batch: Trainer's sequential sampler could not reproduce the order")
    flat = [e for b in batches for e in b]
    tokens = [sum(len(e) for e in b) for b in batches]

    # the same initial adapter for every run: lorakit's init, saved in PEFT format, loaded into PEFT
    torch.manual_seed(0)
    init = lorakit.inject(copy.deepcopy(base), LoRAConfig(target_modules=SEVEN, **LORA))
    tmp = tempfile.mkdtemp()
    lorakit.save_adapter(init, tmp)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=SEVEN, **LORA))
    res = set_peft_model_state_dict(peft_model, load_file(os.path.join(tmp, "adapter_model.safetensors")))
    assert not [k for k in res.missing_keys if "lora_" in k], res.missing_keys
    names = ["lorakit"] + levers
    models = {n: copy.deepcopy(init) for n in names}
    val_start = LL.mean_loss(init, val_ex, pad_id)[0]
    del init
    load_s = time.perf_counter() - t_load

    variants = [Variant(n, models[n], train_ex, cfg, pad_id) for n in names]
    # what Trainer's default optim ("adamw_torch_fused" for torch >= 2.8) builds; passed in to share the schedule
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, fused=True)
    sched = LT.schedule(opt, cfg.schedule, cfg.warmup, args.steps)

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def collator(examples):  # lorakit's padding: right, pad id, attention 0, label IGNORE
        ids, mask, labels = B.collate(examples, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    trainer_times, trainer_losses = [], []

    class Interleave(TrainerCallback):
        def __init__(self):
            self.prev, self.tr_loss = None, 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.prev = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            trainer_times.append(time.perf_counter() - self.prev)
            tl = float(trainer._tr_loss)
            trainer_losses.append(tl - self.tr_loss)
            self.tr_loss = tl
            for v in variants:
                v.step()
            if state.global_step % 5 == 0:
                print(f"step {state.global_step}/{args.steps}", file=sys.stderr, flush=True)
            self.prev = time.perf_counter()

    targs = TrainingArguments(
        output_dir=os.path.join(tmp, "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_grad_norm=cfg.max_grad_norm, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False, dataloader_num_workers=0, seed=0,
    )
    trainer = SequentialTrainer(model=peft_model, args=targs, train_dataset=flat, data_collator=collator,
                                optimizers=(opt, sched), callbacks=[Interleave()])
    load_avg_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    for v in variants:
        v.thread.join()
        if v.error is not None:
            raise v.error
    load_avg_after = os.getloadavg()[0]

    # same validation function for all; PEFT through its underlying transformers model
    val = {n: LL.mean_loss(models[n], val_ex, pad_id)[0] for n in names}
    val["PEFT + Trainer"] = LL.mean_loss(peft_model.base_model.model, val_ex, pad_id)[0]

    skip = 1  # warm-up step
    tps = {"PEFT + Trainer": [t / s for t, s in zip(tokens[skip:], trainer_times[skip:])]}
    secs = {"PEFT + Trainer": trainer_times[skip:]}
    for v in variants:
        tps[v.name] = [r["tokens_per_s"] for r in v.recs[skip:]]
        secs[v.name] = [t / r["tokens_per_s"] for t, r in zip(tokens[skip:], v.recs[skip:])]
    ref = "PEFT + Trainer"
    real, padded = padding_stats(flat, batches)
    rnd = list(flat)
    random.Random(0).shuffle(rnd)
    _, padded_rnd = padding_stats(rnd, [rnd[i:i + args.batch_size] for i in range(0, len(rnd), args.batch_size)])
    loss_gap = max(abs(r["loss"] - t) for r, t in zip(variants[0].recs, trainer_losses))

    print(f"# train_throughput.py --model {args.model} --steps {args.steps} --batch-size {args.batch_size}"
          f"{' --levers ' + ','.join(levers) if levers else ''}: r=8, alpha=16, dropout 0, 7 projections, "
          f"G2P (cmd_train's data), {len(flat)} examples, {real} real tokens ({real / len(flat):.1f}/example), "
          f"lr {cfg.lr:g} warmup {cfg.warmup} cosine, fp32; {machine()}; load average before/after "
          f"{load_avg_before:.2f}/{load_avg_after:.2f}; setup {load_s:.0f} s, interleaved training {wall:.0f} s")
    print(f"\nmedian over steps 2..{args.steps}; 'paired' = median over steps of (Trainer step time / this "
          f"run's time on the same batch)\n")
    print("| run | tokens/s median | p25-p75 | ± (half min-max) | total tokens/s | paired speed-up vs PEFT + Trainer "
          "| val loss | val loss vs PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [ref] + names:
        med, q1, q3, half = _stats(tps[n])
        agg = sum(tokens[skip:]) / sum(secs[n])
        paired = statistics.median([a / b for a, b in zip(secs[ref], secs[n])])
        print(f"| {n} | {med:.0f} | {q1:.0f}-{q3:.0f} | {half:.0f} | {agg:.0f} | {paired:.3f} | {val[n]:.4f} | "
              f"{100 * (val[n] / val[ref] - 1):+.2f}% |")
    med_l, med_p = statistics.median(tps["lorakit"]), statistics.median(tps[ref])
    ratio = med_l / med_p
    val_ok = abs(val["lorakit"] / val[ref] - 1) <= 0.02
    print(f"\nvalidation loss before training {val_start:.4f}; per-step training loss, lorakit vs Trainer: "
          f"max |difference| {loss_gap:.2e} (same batches, same schedule)")
    print(f"length batching (both tools): {padded} padded tokens for {real} real ({100 * (padded / real - 1):.1f}% "
          f"padding) vs {padded_rnd} ({100 * (padded_rnd / real - 1):.1f}%) for random batches of the same examples")
    print(f"ratio lorakit / PEFT + Trainer tokens/s (medians): {ratio:.3f}; target >= 1.5x with val loss within 2%: "
          f"{'MET' if ratio >= 1.5 and val_ok else 'NOT MET'} (speed {'ok' if ratio >= 1.5 else 'short'}, "
          f"val loss {'ok' if val_ok else 'off'})")
    for n in levers:
        if n == "compile":
            first = {v.name: tokens[0] / v.recs[0]["tokens_per_s"] for v in variants}  # the warm-up step, s
            print(f"lever compile on: lorakit {statistics.median(tps[n]):.0f} tokens/s "
                  f"({statistics.median(tps[n]) / med_p:.3f}x PEFT + Trainer, medians; val loss {val[n]:.4f}), "
                  f"{statistics.median([a / b for a, b in zip(secs['lorakit'], secs[n])]):.3f}x the eager steps "
                  f"(paired); first step {first[n]:.0f} s (compilation), {sum(secs[n]) + first[n]:.0f} s for all "
                  f"{args.steps} steps vs {sum(secs['lorakit']) + first['lorakit']:.0f} s eager")
            continue
        print(f"lever {n} off: lorakit {statistics.median(tps[n]):.0f} tokens/s; the lever is worth "
              f"{statistics.median([a / b for a, b in zip(secs[n], secs['lorakit'])]):.3f}x (paired)")
    _, q1l, q3l, _ = _stats(tps["lorakit"])
    _, q1p, q3p, _ = _stats(tps[ref])
    if q1l <= q3p and q1p <= q3l:
        print("note: the interquartile ranges of lorakit and PEFT + Trainer tokens/s overlap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
