"""Which form a mixed batch's decoding takes, side by side in one process: greedy generation of 32 rows
with 16 adapters (r=8 on 7 projections) under each form of ``lorakit.mixed``, and the base model (the
adapters disabled), interleaved. Rows go round-robin (row i: adapter i mod 16) or at random.

Forms (selected by ``lorakit.mixed``'s constants): ``bank-dense`` every resident adapter on every row,
masked; ``bank-slots`` every bank slot's rows padded, one bmm pair over the bank as it lies (no
copy); ``hot-slots`` the same over the layer's hot slots (``lorakit.hot``: the mix's adapters copied
once; the form taken when many more adapters are resident than in the batch). Usage:
``python benchmarks/mixed_forms.py [--model small] [--repeats 4]``.
"""

from __future__ import annotations

import argparse
import os
import random

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import lorakit  # noqa: E402
import lorakit.mixed as mixed  # noqa: E402
from common import SEVEN, base_model, interleaved, machine  # noqa: E402

CONSTANTS = ("DENSE_COLUMNS", "DENSE_WORK", "BANK_ROWS", "BANK_SPARE")
FORMS = {  # values of CONSTANTS
    "bank-dense": (10 ** 9, 10 ** 9, 0, 10 ** 9),
    "bank-slots": (0, 0, 10 ** 9, 10 ** 9),
    "hot-slots": (0, 0, 10 ** 9, 0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "small"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rows", type=int, default=32, help="batch rows (the server's decoding batch: 16)")
    args = ap.parse_args()
    from lorakit.app.console import quiet_transformers

    quiet_transformers()  # generate's right-padding warning: the prompts here have no padding
    model = base_model(args.model)
    names = [f"t{i}" for i in range(16)]
    torch.manual_seed(0)
    for n in names:
        lorakit.inject(model, lorakit.LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN), adapter_name=n)
        with torch.no_grad():
            for pn, p in model.named_parameters():
                if f".{n}.lora_B" in pn:
                    p.normal_(0, 0.02)
    rng = random.Random(0)
    n = args.rows
    layouts = {"round-robin": [names[i % 16] for i in range(n)], "random": [rng.choice(names) for _ in range(n)]}
    prompt = torch.randint(0, 1000, (n, 4))
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def run(rows, form):
        def fn():
            for name, value in zip(CONSTANTS, FORMS[form]):
                setattr(mixed, name, value)
            with torch.no_grad(), lorakit.mixed_batch(model, rows):
                model.generate(prompt, **kw)
        return fn

    def base():
        with torch.no_grad(), lorakit.disable_adapters(model):
            model.generate(prompt, **kw)

    defaults = [getattr(mixed, name) for name in CONSTANTS]
    print(f"# mixed_forms.py --model {args.model}: {n} rows, 16 adapters resident, 4-token prompt, {args.new_tokens} new tokens; "
          f"{machine()}")
    print("| rows | " + " | ".join(f"{f} / base" for f in FORMS) + " | base s |")
    print("|---|" + "---|" * (len(FORMS) + 1))
    for label, rows in layouts.items():
        res = interleaved({"base": base, **{f: run(rows, f) for f in FORMS}}, args.repeats)
        b = res["base"][0]
        label = f"{label} ({len(set(rows))} adapters)"
        print(f"| {label} | " + " | ".join(f"{res[f][0] / b:.3f} (± {res[f][1]:.2f} s)" for f in FORMS)
              + f" | {b:.2f} ± {res['base'][1]:.2f} |")
    for name, value in zip(CONSTANTS, defaults):
        setattr(mixed, name, value)
    print("defaults pick: hot-slots when the layer holds more than BANK_SPARE x the mix's adapters, else bank-dense while "
          "rows x tokens x S·r <= DENSE_WORK and S·r <= DENSE_COLUMNS, else bank-slots")


if __name__ == "__main__":
    main()
