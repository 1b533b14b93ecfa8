"""Adapter I/O: merge and unmerge of the whole model, save and load of one adapter, lorakit vs PEFT.

    python benchmarks/adapter_io.py                 # SmolLM2-135M-Instruct
    python benchmarks/adapter_io.py --model small   # random 4-layer, hidden-512 Llama
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the lorakit CLI: no spinning threads on shared cores
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorakit  # noqa: E402
from common import SEVEN, base_model, interleaved, machine, spread_note  # noqa: E402
from lorakit import LoRAConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from peft import PeftModel

    base = base_model(args.model)
    torch.manual_seed(1)
    ours = lorakit.inject(copy.deepcopy(base), LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN, init_lora_weights=False))
    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "src")
    lorakit.save_adapter(ours, src)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), src).eval()
    print(f"# adapter_io.py --model {args.model}: r=8 on 7 projections; {machine()}")
    n = itertools.count()

    def merge_ours():
        lorakit.merge(ours)
        lorakit.unmerge(ours)

    def merge_theirs():
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    def load_ours():
        name = f"l{next(n)}"
        lorakit.load_adapter(ours, src, adapter_name=name)
        lorakit.set_adapter(ours, name)

    def load_theirs():
        name = f"l{next(n)}"
        theirs.load_adapter(src, adapter_name=name)
        theirs.set_adapter(name)

    rows = {
        "merge + unmerge (whole model)": interleaved({"lorakit": merge_ours, "PEFT": merge_theirs}, args.repeats),
        "save one adapter": interleaved({
            "lorakit": lambda: lorakit.save_adapter(ours, os.path.join(tmp, "ours"), adapter_name="default"),
            "PEFT": lambda: theirs.save_pretrained(os.path.join(tmp, "theirs"), selected_adapters=["default"]),
        }, args.repeats),
        "load one adapter + activate": interleaved({"lorakit": load_ours, "PEFT": load_theirs}, args.repeats),
    }
    size = os.path.getsize(os.path.join(src, "adapter_model.safetensors"))
    print(f"adapter file: {size / 2**20:.2f} MiB")
    print("\n| operation | lorakit ms | ± | PEFT ms | ± | PEFT / lorakit |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        o, p = r["lorakit"], r["PEFT"]
        print(f"| {label} | {o[0] * 1e3:.1f} | {o[1] * 1e3:.1f} | {p[0] * 1e3:.1f} | {p[1] * 1e3:.1f} | {p[0] / o[0]:.2f}x |")
    for label, r in rows.items():
        note = spread_note(label, r["lorakit"], r["PEFT"])
        if note:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
