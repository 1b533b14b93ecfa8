"""Training throughput at equal quality: lorakit's trainer vs PEFT + transformers Trainer and PEFT + TRL's SFTTrainer.

    python benchmarks/train_throughput.py                       # SmolLM2-135M-Instruct, 30 steps of 8
    python benchmarks/train_throughput.py --anchors peft --target 1.5   # without TRL, as runs 1-9 of RESULTS.md
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
Validation loss of each is ``lorakit.app.lm_loss.mean_loss`` (mean NLL per completion token) on the
same validation examples.

TRL anchor (``--anchors trl``, the default; needs the ``bench`` extra, see ``trl_anchor.py``): two more
runs in the same interleave, from the same initial adapter with the same optimizer, schedule, steps
and fp32: PEFT + TRL ``SFTTrainer`` configured as a user would (the same examples as prompt/completion
text, ``packing=True``, ``padding_free=True``, ``completion_only_loss=True``, one packed row of about
one lorakit batch's tokens per step), and ``SFTTrainer`` padding-free on exactly lorakit's batches,
whose per-step and validation losses must equal lorakit's. Their step time is measured like
Trainer's (step start to ``on_step_end``), their tokens are TRL's own count (no padding).

Levers (``--levers``, each an extra lorakit run in the same interleave, identical otherwise):
``full-head`` computes the LM head and loss on every position (transformers' loss) instead of
only at label positions, on the padded batch; ``no-pack`` runs the padded batch instead of packed
rows (``label_loss(pack=True)``: the common prefix once, no padding); ``unfused`` adds the bypass
as ``out.add_(B(s·A x))`` (a separate B product, then an add) instead of one ``addmm_`` into the
base output (and without ``no-node``'s single node); ``no-node`` runs the bypass through the layer's
general forward (``base(x)``, ``F.linear(x, A)``, ``addmm_`` into the output: autograd's nodes) instead
of ``lorakit.fused``'s one autograd node per layer; ``eager`` uses eager attention instead of SDPA; ``compile`` is the other
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
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorakit  # noqa: E402
import lorakit.app.lm_loss as LL  # noqa: E402
from common import SEVEN, base_model  # noqa: E402
from lorakit import LoRAConfig  # noqa: E402
from lorakit.app import batches as B  # noqa: E402
from lorakit.app import data as D  # noqa: E402
from lorakit.app import g2p as G  # noqa: E402
from lorakit.app import loop as LT  # noqa: E402
from lorakit.app.options import TrainOptions  # noqa: E402
from lorakit.layers import LoRALayer, LoRALinear  # noqa: E402
from throughput_report import REF, report  # noqa: E402

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

    ORIGINAL = {"label_loss": LL.label_loss, "linear_up": LoRALayer.linear_up, "fused": LoRALinear.fused}

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
            self.patch["fused"] = False
        if name == "no-node":
            self.patch["fused"] = False  # the general forward: base(x), F.linear(x, A), addmm_ (autograd's nodes)
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
        LoRALinear.fused = self.patch.get("fused", self.ORIGINAL["fused"])
        try:
            self.go.set()
            self.done.wait()
            self.done.clear()
        finally:
            LL.label_loss, LoRALayer.linear_up = self.ORIGINAL["label_loss"], self.ORIGINAL["linear_up"]
            LoRALinear.fused = self.ORIGINAL["fused"]
        if self.error is not None:
            raise self.error


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=TrainOptions().batch_size)
    ap.add_argument("--levers", default="", help="comma list of extra lorakit runs: full-head, unfused, no-node, eager, no-pack, compile")
    ap.add_argument("--no-label-head", action="store_true", help="same as adding full-head to --levers")
    ap.add_argument("--anchors", default="peft,trl",
                    help="comma list: peft (PEFT + Trainer, always run), trl (PEFT + TRL SFTTrainer: packing, and "
                         "padding-free on lorakit's batches), trl-packing, trl-batches; 'peft' alone reproduces runs 1-9")
    ap.add_argument("--target", type=float, default=2.0, help="speed target, lorakit / anchor tokens/s (medians)")
    args = ap.parse_args(argv)
    args.levers = [x for x in args.levers.split(",") if x]
    if args.no_label_head and "full-head" not in args.levers:
        args.levers.append("full-head")
    bad = set(args.levers) - {"full-head", "unfused", "no-node", "eager", "no-pack", "compile"}
    if bad:
        ap.error(f"unknown levers {sorted(bad)}")
    anchors = {x for x in args.anchors.split(",") if x}
    if anchors - {"peft", "trl", "trl-packing", "trl-batches"}:
        ap.error(f"unknown anchors {sorted(anchors - {'peft', 'trl', 'trl-packing', 'trl-batches'})}")
    args.trl = [k for k in ("packing", "batches") if "trl" in anchors or f"trl-{k}" in anchors]
    if args.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            ap.error("--anchors trl needs TRL: pip install -c constraints.txt 'trl==1.16.0' (or --anchors peft)")
    return args


def setup(args):
    """Model, data, lorakit's batches and the shared initial adapter (saved in PEFT format)."""
    from lorakit.app.models import load_model

    lm = load_model(None)
    tok = lm.tokenizer
    base = lm.model.eval() if args.model == "smollm2" else base_model("small")
    train_ex, val_ex = g2p_examples(tok, args.steps, args.batch_size)
    defaults = TrainOptions()
    cfg = LT.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=defaults.lr, warmup=defaults.warmup,
                         seed=defaults.seed)
    stream = B.batch_stream(train_ex, cfg.batch_size, cfg.seed)
    batches = [next(stream) for _ in range(args.steps)]  # exactly what train() will draw
    if any(len(b) != args.batch_size for b in batches):
        raise SystemExit("a partial batch: Trainer's sequential sampler could not reproduce the order")
    # the same initial adapter for every run: lorakit's init, saved in PEFT format, loaded into PEFT
    torch.manual_seed(0)
    init = lorakit.inject(copy.deepcopy(base), LoRAConfig(target_modules=SEVEN, **LORA))
    tmp = tempfile.mkdtemp()
    lorakit.save_adapter(init, tmp)
    return dict(tok=tok, base=base, train_ex=train_ex, val_ex=val_ex, cfg=cfg, batches=batches, init=init, tmp=tmp)


def peft_factory(base, adapter_dir: str):
    """A function making a fresh PEFT model of ``base`` holding the saved initial adapter."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    def make():
        model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=SEVEN, **LORA))
        res = set_peft_model_state_dict(model, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
        assert not [k for k in res.missing_keys if "lora_" in k], res.missing_keys
        return model

    return make


def optimizer_factory(cfg, steps: int):
    """What Trainer's default optim ("adamw_torch_fused" for torch >= 2.8) builds, and lorakit's schedule."""
    def make(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay, fused=True)
        return opt, LT.schedule(opt, cfg.schedule, cfg.warmup, steps)

    return make


def trainer_anchor(peft_model, flat, pad_id, cfg, steps: int, out_dir: str, opt_sched, others, times, losses):
    """PEFT + transformers Trainer on ``flat`` in order; after each of its steps, every run of ``others`` takes one."""
    from torch.utils.data import SequentialSampler
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def collator(examples):  # lorakit's padding: right, pad id, attention 0, label IGNORE
        ids, mask, labels = B.collate(examples, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class Interleave(TrainerCallback):
        def __init__(self):
            self.prev, self.tr_loss = None, 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.prev = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.prev)
            tl = float(trainer._tr_loss)
            losses.append(tl - self.tr_loss)
            self.tr_loss = tl
            for v in others:
                v.step()
            if state.global_step % 5 == 0:
                print(f"step {state.global_step}/{steps}", file=sys.stderr, flush=True)
            self.prev = time.perf_counter()

    targs = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, max_grad_norm=cfg.max_grad_norm, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False, dataloader_num_workers=0, seed=0,
    )
    trainer = SequentialTrainer(model=peft_model, args=targs, train_dataset=flat, data_collator=collator,
                                optimizers=opt_sched, callbacks=[Interleave()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land among the table
    return trainer


def trl_texts(tok, train_ex, flat, steps: int, batch_size: int) -> list[dict]:
    """The examples of ``flat`` as prompt/completion text (TRL tokenises them itself)."""
    import trl_anchor

    split = G.g2p_split(0, TrainOptions().test_size, G.G2P_VALIDATION)
    ds = G.g2p_dataset(split.train[:min(len(split.train), steps * batch_size)])
    assert len(ds.records) == len(train_ex), "an example was dropped: records and examples no longer align"
    texts = trl_anchor.prompt_completion(tok, ds.records, ds.prompt_format)
    index = {id(e): i for i, e in enumerate(train_ex)}
    return [texts[index[id(e)]] for e in flat]


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    t_load = time.perf_counter()
    s = setup(args)
    tok, cfg, batches, val_ex = s["tok"], s["cfg"], s["batches"], s["val_ex"]
    pad_id = tok.pad_token_id
    flat = [e for b in batches for e in b]
    tokens = [sum(len(e) for e in b) for b in batches]
    names = ["lorakit"] + args.levers
    models = {n: copy.deepcopy(s["init"]) for n in names}
    val_start = LL.mean_loss(s["init"], val_ex, pad_id)[0]
    del s["init"]
    peft_copy, make_opt = peft_factory(s["base"], s["tmp"]), optimizer_factory(cfg, args.steps)
    peft_model = peft_copy()
    variants = [Variant(n, models[n], s["train_ex"], cfg, pad_id) for n in names]
    steppers, trl_info = [], {}
    if args.trl:
        import trl_anchor

        texts = trl_texts(tok, s["train_ex"], flat, args.steps, args.batch_size)
        steppers, trl_models, trl_info = trl_anchor.trl_steppers(
            args.trl, peft_copy, tok, texts, flat, args.batch_size, args.steps, make_opt, s["tmp"], cfg.max_grad_norm)
        models.update({n: m.base_model.model for n, m in trl_models.items()})
    load_s = time.perf_counter() - t_load

    trainer_times, trainer_losses = [], []
    trainer = trainer_anchor(peft_model, flat, pad_id, cfg, args.steps, os.path.join(s["tmp"], "trainer"),
                             make_opt(peft_model), variants + steppers, trainer_times, trainer_losses)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    for v in variants + steppers:
        v.thread.join()
        if v.error is not None:
            raise v.error
    load_after = os.getloadavg()[0]

    # same validation function for all; PEFT through its underlying transformers model
    models[REF] = peft_model.base_model.model
    val = {n: LL.mean_loss(m, val_ex, pad_id)[0] for n, m in models.items()}
    run = dict(args=args, cfg=cfg, batches=batches, flat=flat, tokens=tokens, names=names, variants=variants,
               steppers=steppers, trl_info=trl_info, trainer_times=trainer_times, trainer_losses=trainer_losses,
               val=val, val_start=val_start, load_s=load_s, wall=wall, load=(load_before, load_after))
    report(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
