"""Where a packed lorakit training step spends its time: a torch.profiler table, grouped.

    python benchmarks/step_profile.py                 # SmolLM2-135M-Instruct, default G2P batches
    python benchmarks/step_profile.py --model small   # random 4-layer Llama
    python benchmarks/step_profile.py --compile       # the blocks compiled (``lorakit train --compile``)

Trains r=8, lora_alpha=16 on the seven projections with ``lorakit.app.loop.train`` (the default
trainer: packed rows, label-position head, fused AdamW) and profiles optimizer steps 3 to 2 +
``--steps`` (the first two warm up). Every op's self CPU time goes to one group: base matmuls
(``mm`` / ``addmm`` / ``bmm`` / ``linear`` products with no dimension equal to r, except the LM
head), LoRA's matmuls (a dimension equal to r), the LM head (a dimension equal to the vocabulary),
attention (``scaled_dot_product*``), the optimizer (``_fused_adamw`` and ``_foreach*``), and the rest
(elementwise, copies, autograd bookkeeping; with ``--compile`` also inductor's fused kernels, which run
inside the compiled graph's own record). Issue 18's target: base matmuls >= 70% of the step.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, schedule  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorakit  # noqa: E402
import lorakit.app.lm_loss as LL  # noqa: E402
from common import SEVEN, base_model, machine  # noqa: E402
from lorakit import LoRAConfig  # noqa: E402
from lorakit.app import loop as LT  # noqa: E402
from lorakit.app.models import load_model  # noqa: E402
from lorakit.app.options import TrainOptions  # noqa: E402
from train_throughput import g2p_examples  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm")
R = 8


def group(name: str, shapes: list, vocab: int) -> str:
    """The group of one profiled op (see the module docstring)."""
    if name in MATMULS:
        dims = {d for s in shapes if s for d in s}
        if vocab in dims:
            return "LM head matmuls"
        return "LoRA matmuls" if R in dims else "base matmuls"
    if name.startswith("aten::_scaled_dot_product") or name.startswith("aten::scaled_dot_product"):
        return "attention"
    if "adamw" in name or name.startswith("aten::_foreach"):
        return "optimizer"
    return "other (elementwise, copies, autograd)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--steps", type=int, default=2, help="profiled optimizer steps (after 2 warm-up steps)")
    ap.add_argument("--compile", action="store_true", help="compile the blocks from step 1 (the warm-up compiles)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(None)  # the default model's tokenizer (and model) builds the G2P batches
    tokenizer = loaded.tokenizer
    model = loaded.model if args.model == "smollm2" else base_model("small")
    opts = TrainOptions()
    total = 2 + args.steps
    train_ex, _ = g2p_examples(tokenizer, total, opts.batch_size)
    lorakit.inject(model, LoRAConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN))
    model.train()
    cfg = LT.TrainConfig(steps=total, batch_size=opts.batch_size, lr=opts.lr, warmup=opts.warmup, max_grad_norm=1.0,
                         compile=args.compile)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sched = schedule(wait=1, warmup=1, active=args.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched, record_shapes=True) as prof:
        LT.train(model, LL.lm_task(train_ex, pad, cfg), cfg, on_log=lambda rec: prof.step(), progress=False)
    vocab = model.config.vocab_size
    times: dict[str, float] = collections.Counter()
    rest: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])  # op -> [self time, calls] in "other"
    for ev in prof.key_averages(group_by_input_shape=True):
        g = group(ev.key, ev.input_shapes, vocab)
        times[g] += ev.self_cpu_time_total
        if g.startswith("other"):
            rest[ev.key][0] += ev.self_cpu_time_total
            rest[ev.key][1] += ev.count
    total_us = sum(times.values())
    flag = " --compile" if args.compile else ""
    print(f"# step_profile.py --model {args.model} --steps {args.steps}{flag}: lorakit train, r={R} on 7 projections, "
          f"batch {opts.batch_size}, packed rows{', blocks compiled' if args.compile else ''}; {machine()}")
    print(f"profiled: {args.steps} optimizer steps, {total_us / 1e6 / args.steps:.2f} s of op time per step")
    print("| group | share of the step | s per step |")
    print("|---|---|---|")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * t / total_us:.1f}% | {t / 1e6 / args.steps:.3f} |")
    print("\n| largest ops in other | share of the step | calls per step |")
    print("|---|---|---|")
    for name, (t, n) in sorted(rest.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"| {name} | {100 * t / total_us:.1f}% | {n // args.steps} |")
    share = times["base matmuls"] / total_us
    print(f"base matmuls: {100 * share:.1f}% of the step; target >= 70%: {'MET' if share >= 0.7 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
