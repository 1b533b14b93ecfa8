"""Inference cost of an adapter: forward and greedy generation, base vs merged vs unmerged, lorakit vs PEFT.

    python benchmarks/inference.py                 # SmolLM2-135M-Instruct
    python benchmarks/inference.py --model small   # random 4-layer, hidden-512 Llama
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the lorakit CLI: no spinning threads on shared cores
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorakit  # noqa: E402
from common import SEVEN, base_model, interleaved, interleaved_times, machine, spread_note  # noqa: E402
from lorakit import LoRAConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from peft import PeftModel

    base = base_model(args.model)
    torch.manual_seed(1)
    unmerged = lorakit.inject(copy.deepcopy(base), LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN, init_lora_weights=False))
    path = tempfile.mkdtemp()
    lorakit.save_adapter(unmerged, path)
    merged = lorakit.unload(copy.deepcopy(unmerged), merge=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    models = {"base": base, "lorakit merged": merged, "lorakit unmerged": unmerged, "PEFT unmerged": peft}
    ids = torch.randint(0, base.config.vocab_size, (args.rows, args.tokens))
    prompt = ids[:1, :16]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=0, eos_token_id=None)
    print(f"# inference.py --model {args.model}: forward {args.rows} x {args.tokens} tokens; greedy generation "
          f"of {args.new_tokens} tokens after a 16-token prompt, batch 1; r=8 on 7 projections; {machine()}")
    with torch.inference_mode():
        fwd = interleaved({k: (lambda m: lambda: m(ids))(m) for k, m in models.items()}, args.repeats)
        raw = interleaved_times({k: (lambda m: lambda: m.generate(prompt, **gen))(m) for k, m in models.items()},
                                args.repeats)
    gens = {k: statistics.median(v) for k, v in raw.items()}
    b = fwd["base"][0]
    print("\n| model | forward median s | ± s | forward / base | generation tokens/s | ± tokens/s | tokens/s / base "
          "| paired tokens/s / base (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in models:
        tps = [args.new_tokens / t for t in raw[k]]
        paired = sorted(base_t / t for base_t, t in zip(raw["base"], raw[k]))  # same round: adjacent in time
        print(f"| {k} | {fwd[k][0]:.4f} | {fwd[k][1]:.4f} | {fwd[k][0] / b:.3f} | {args.new_tokens / gens[k]:.1f} | "
              f"{(max(tps) - min(tps)) / 2:.1f} | {gens['base'] / gens[k]:.3f} | "
              f"{statistics.median(paired):.3f} ({paired[0]:.3f}-{paired[-1]:.3f}) |")
    over_ours, over_peft = fwd["lorakit unmerged"][0] - b, fwd["PEFT unmerged"][0] - b
    print(f"\nunmerged overhead over base: lorakit {over_ours * 1e3:.1f} ms, PEFT {over_peft * 1e3:.1f} ms")
    for note in (spread_note("merged vs base", fwd["lorakit merged"], fwd["base"]),
                 spread_note("lorakit vs PEFT unmerged", fwd["lorakit unmerged"], fwd["PEFT unmerged"])):
        if note:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
