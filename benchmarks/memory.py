"""Peak memory (RSS) of training: lorakit LoRA vs full fine-tuning vs PEFT LoRA, one subprocess each;
with ``--bases``, lorakit LoRA on a float32, int8 and NF4 base (quantized.py).

    python benchmarks/memory.py                    # SmolLM2-135M-Instruct, 5 steps of 8 G2P examples
    python benchmarks/memory.py --model small      # random 4-layer, hidden-512 Llama
    python benchmarks/memory.py --bases fp32,int8,nf4   # + one default `lorakit train` per base
    python benchmarks/memory.py --bases fp32,nf4-gc,nf4 --workers-only   # KIND+gc / KIND-gc: checkpointing on / off

Modes (each ``python benchmarks/memory.py --worker MODE`` in a fresh process):

- ``lorakit``: lorakit LoRA (r=8, alpha=16, dropout 0, seven projections), ``lorakit.app.loop.train``.
- ``full``: full fine-tuning of the same model (every parameter trainable), the same ``train()`` loop.
- ``peft``: PEFT ``get_peft_model`` with the same LoRA config, the same ``train()`` loop (the
  adapter implementation is the only difference).
- ``peft-trainer``: PEFT + transformers ``Trainer`` (AdamW, same schedule, same batches): the stack.

All train the same batches (``lorakit.app.batches.batch_stream`` order, the G2P data of ``lorakit train``)
in float32. A background thread samples VmRSS from /proc/self/status every 10 ms; the kernel's
VmHWM (peak RSS), reset after loading through /proc/self/clear_refs, is reported alongside.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

MODES = ["lorakit", "full", "peft", "peft-trainer"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class Sampler:
    """Peak VmRSS (KiB) sampled every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.samples = interval, _status_kib("VmRSS"), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS"))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("VmRSS"))


def worker(mode: str, kind: str, steps: int, batch_size: int, quantize: str | None = None,
           checkpointing: bool = False) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import lorakit
    import lorakit.app.lm_loss as LL
    import lorakit.app.loop as LT
    from common import SEVEN, base_model
    from lorakit import LoRAConfig
    from train_throughput import LORA, g2p_examples

    import transformers

    transformers.logging.set_verbosity_error()
    if checkpointing:  # as lorakit train does with checkpointing on: freed large blocks go back to the OS
        from lorakit.app.allocator import return_large_blocks

        return_large_blocks()
    if kind == "smollm2":
        from lorakit.app.models import load_model

        lm = load_model(None)
        model, tok = lm.model, lm.tokenizer
    else:
        from transformers import AutoTokenizer

        from lorakit.app.models import _gguf_cache_dir, default_gguf

        tok = AutoTokenizer.from_pretrained(str(_gguf_cache_dir(default_gguf())), local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
        model = base_model("small")
    if quantize:  # as lorakit train --quantize does it, right after loading
        from lorakit.app.qbase import quantize_loaded

        quantize_loaded(model, quantize)
    train_ex, _ = g2p_examples(tok, steps, batch_size)
    cfg = LT.TrainConfig(steps=steps, batch_size=batch_size, lr=2e-3, warmup=10, seed=0)
    torch.manual_seed(0)
    if mode == "lorakit":
        lorakit.inject(model, LoRAConfig(target_modules=SEVEN, **LORA))
        net = model
    elif mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        net = model
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(target_modules=SEVEN, **LORA))
        net = model.base_model.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gc.collect()
    after_load, load_hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    try:  # reset the kernel's peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_ok = True
    except OSError:
        hwm_ok = False
    t = time.perf_counter()
    with Sampler() as s, LT.checkpointed(net, checkpointing):  # as lorakit train --gradient-checkpointing
        if mode == "peft-trainer":
            _trainer(model, train_ex, cfg, tok.pad_token_id)
        else:
            LT.train(net, LL.lm_task(train_ex, tok.pad_token_id, cfg), cfg, progress=False)
    return {"mode": mode, "after_load_kib": after_load, "peak_kib": s.peak, "samples": s.samples,
            "hwm_kib": _status_kib("VmHWM") if hwm_ok else None, "train_s": time.perf_counter() - t,
            "trainable": trainable, "load_hwm_kib": load_hwm}


def _trainer(peft_model, train_ex, cfg, pad_id) -> None:
    import tempfile

    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    import lorakit.app.loop as LT
    from lorakit.app import batches as B

    stream = B.batch_stream(train_ex, cfg.batch_size, cfg.seed)
    flat = [e for _ in range(cfg.steps) for e in next(stream)]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    sched = LT.schedule(opt, cfg.schedule, cfg.warmup, cfg.steps)

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def collator(examples):
        ids, mask, labels = B.collate(examples, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm, use_cpu=True, eval_strategy="no", save_strategy="no",
        logging_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_pin_memory=False, seed=0,
    )
    SequentialTrainer(model=peft_model, args=args, train_dataset=flat, data_collator=collator,
                      optimizers=(opt, sched)).train()


def run_worker(mode: str, args, quantize: str | None = None, checkpointing: bool = False) -> dict:
    """``worker(mode, ...)`` in a fresh process: its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size)] + (["--quantize", quantize] if quantize else [])
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"worker {mode} {quantize or ''} failed ({p.returncode})")
    return json.loads(line[0][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--bases", help="instead of the modes: lorakit LoRA on these bases (fp32,int8,nf4), the "
                    "training peak here and one default `lorakit train` run each (quantized.py)")
    ap.add_argument("--workers-only", action="store_true", help="with --bases: the training peaks only, no "
                    "`lorakit train` runs")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--quantize", help=argparse.SUPPRESS)
    ap.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.model, args.steps, args.batch_size, args.quantize, args.gradient_checkpointing)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.bases:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from quantized import compare_bases

        return compare_bases(args.bases.split(","), run_worker, args)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine

    load_before = os.getloadavg()[0]
    res = {mode: run_worker(mode, args) for mode in args.modes.split(",")}

    mib = 1 / 1024
    print(f"# memory.py --model {args.model} --steps {args.steps} --batch-size {args.batch_size}: peak RSS of "
          f"training, one fresh process per mode, VmRSS sampled every 10 ms; G2P batches of lorakit train; "
          f"fp32; {machine()}; load average at start {load_before:.2f}")
    print("\n| mode | trainable params | RSS after load MiB | peak RSS in training MiB | VmHWM MiB | "
          "training increment MiB | train s |")
    print("|---|---|---|---|---|---|---|")
    for m, r in res.items():
        peak = max(r["peak_kib"], r["hwm_kib"] or 0)
        r["inc"] = peak - r["after_load_kib"]
        print(f"| {m} | {r['trainable']:,} | {r['after_load_kib'] * mib:.0f} | {r['peak_kib'] * mib:.0f} | "
              f"{(r['hwm_kib'] or 0) * mib:.0f} | {r['inc'] * mib:.0f} | {r['train_s']:.1f} |")
    print("\n(training increment = max(sampled peak, VmHWM) - RSS after load)")
    if "lorakit" in res:
        lk = res["lorakit"]
        pk = lambda r: max(r["peak_kib"], r["hwm_kib"] or 0)  # noqa: E731
        for other, label in (("full", "LoRA / full fine-tuning"), ("peft", "lorakit / PEFT (same loop)"),
                             ("peft-trainer", "lorakit / PEFT + Trainer")):
            if other in res:
                o = res[other]
                print(f"{label}: peak {pk(lk) / pk(o):.3f}, training increment {lk['inc'] / o['inc']:.3f}")
        if "peft" in res:
            ok = pk(lk) <= pk(res["peft"])
            print(f"target LoRA peak <= PEFT peak (same loop): {'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
