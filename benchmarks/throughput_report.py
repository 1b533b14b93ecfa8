"""The report of ``train_throughput.py``: the header line, the table and the ratio lines."""

from __future__ import annotations

import random
import statistics

from common import machine
from trl_anchor import BATCHES  # a plain module: TRL itself is imported only to run it

REF = "PEFT + Trainer"


def padding_stats(examples, batches) -> tuple[int, int]:
    """(real tokens, padded tokens B*T_max) of a batch list."""
    real = sum(len(e) for b in batches for e in b)
    padded = sum(len(b) * max(len(e) for e in b) for b in batches)
    return real, padded


def _stats(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return statistics.median(xs), q[0], q[2], (max(xs) - min(xs)) / 2

def per_step(run) -> tuple[dict, dict]:
    """Per-step (tokens/s, (tokens, seconds)) of every run after the warm-up step."""
    skip, tokens = 1, run["tokens"]
    tps = {REF: [t / s for t, s in zip(tokens[skip:], run["trainer_times"][skip:])]}
    work = {REF: list(zip(tokens[skip:], run["trainer_times"][skip:]))}
    for v in run["variants"]:
        tps[v.name] = [r["tokens_per_s"] for r in v.recs[skip:]]
        work[v.name] = [(t, t / r["tokens_per_s"]) for t, r in zip(tokens[skip:], v.recs[skip:])]
    for st in run["steppers"]:
        tps[st.name] = [r["tokens_per_s"] for r in st.recs[skip:]]
        work[st.name] = [(r["tokens"], r["seconds"]) for r in st.recs[skip:]]
    return tps, work


def header(run) -> None:
    args, cfg, flat = run["args"], run["cfg"], run["flat"]
    real, _ = padding_stats(flat, run["batches"])
    extra = (f" --levers {','.join(args.levers)}" if args.levers else "") + f" --anchors {args.anchors}"
    print(f"# train_throughput.py --model {args.model} --steps {args.steps} --batch-size {args.batch_size}{extra}: "
          f"r=8, alpha=16, dropout 0, 7 projections, G2P (cmd_train's data), {len(flat)} examples, {real} real "
          f"tokens ({real / len(flat):.1f}/example), lr {cfg.lr:g} warmup {cfg.warmup} cosine, fp32; {machine()}; "
          f"load average before/after {run['load'][0]:.2f}/{run['load'][1]:.2f}; setup {run['load_s']:.0f} s, "
          f"interleaved training {run['wall']:.0f} s")
    if "max_length" in run["trl_info"]:
        i = run["trl_info"]
        print(f"TRL packing: max_length {i['max_length']} (the smallest giving at most {args.steps} rows), "
              f"{i['rows']} packed rows of {i['tokens']} tokens (lorakit's tokenisation: {real})")
    print(f"\nmedian over steps 2..{args.steps}; 'paired' = median over steps of (this run's tokens/s / Trainer's "
          f"on the same step; the same batch except for TRL packing)\n")


def table(run, tps, work) -> None:
    print("| run | tokens/s median | p25-p75 | ± (half min-max) | total tokens/s | paired speed-up vs PEFT + Trainer "
          "| val loss | val loss vs PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    val = run["val"]
    for n in [REF] + run["names"] + [st.name for st in run["steppers"]]:
        med, q1, q3, half = _stats(tps[n])
        agg = sum(t for t, _ in work[n]) / sum(s for _, s in work[n])
        paired = statistics.median([a / b for a, b in zip(tps[n], tps[REF])])
        print(f"| {n} | {med:.0f} | {q1:.0f}-{q3:.0f} | {half:.0f} | {agg:.0f} | {paired:.3f} | {val[n]:.4f} | "
              f"{100 * (val[n] / val[REF] - 1):+.2f}% |")


def summary(run, tps, work) -> None:
    args, val, recs = run["args"], run["val"], run["variants"][0].recs
    real, padded = padding_stats(run["flat"], run["batches"])
    rnd = list(run["flat"])
    random.Random(0).shuffle(rnd)
    _, padded_rnd = padding_stats(rnd, [rnd[i:i + args.batch_size] for i in range(0, len(rnd), args.batch_size)])
    gap = max(abs(r["loss"] - t) for r, t in zip(recs, run["trainer_losses"]))
    print(f"\nvalidation loss before training {run['val_start']:.4f}; per-step training loss, lorakit vs Trainer: "
          f"max |difference| {gap:.2e} (same batches, same schedule)")
    for st in run["steppers"]:
        if st.name == BATCHES:
            gap = max(abs(r["loss"] - t["loss"]) for r, t in zip(recs, st.recs))
            same = f"{val['lorakit']:.4f}" == f"{val[st.name]:.4f}"
            print(f"per-step training loss, lorakit vs {st.name}: max |difference| {gap:.2e}; validation loss "
                  f"{val['lorakit']:.4f} vs {val[st.name]:.4f}: {'equal' if same else 'DIFFERENT'} to 4 decimals")
    print(f"length batching (every run on lorakit's batches): {padded} padded tokens for {real} real "
          f"({100 * (padded / real - 1):.1f}% padding) vs {padded_rnd} ({100 * (padded_rnd / real - 1):.1f}%) for "
          f"random batches of the same examples")
    med_l = statistics.median(tps["lorakit"])
    for n in [REF] + [st.name for st in run["steppers"]]:
        ratio, val_ok = med_l / statistics.median(tps[n]), abs(val["lorakit"] / val[n] - 1) <= 0.02
        print(f"ratio lorakit / {n} tokens/s (medians): {ratio:.3f}; target >= {args.target:g}x with val loss "
              f"within 2%: {'MET' if ratio >= args.target and val_ok else 'NOT MET'} (speed "
              f"{'ok' if ratio >= args.target else 'short'}, val loss {'ok' if val_ok else 'off'})")
    levers(run, tps, work)
    _, q1l, q3l, _ = _stats(tps["lorakit"])
    _, q1p, q3p, _ = _stats(tps[REF])
    if q1l <= q3p and q1p <= q3l:
        print("note: the interquartile ranges of lorakit and PEFT + Trainer tokens/s overlap")


def levers(run, tps, work) -> None:
    secs = {n: [s for _, s in w] for n, w in work.items()}
    med_p = statistics.median(tps[REF])
    for n in run["args"].levers:
        if n == "compile":
            tokens = run["tokens"]
            first = {v.name: tokens[0] / v.recs[0]["tokens_per_s"] for v in run["variants"]}  # the warm-up step, s
            print(f"lever compile on: lorakit {statistics.median(tps[n]):.0f} tokens/s "
                  f"({statistics.median(tps[n]) / med_p:.3f}x PEFT + Trainer, medians; val loss {run['val'][n]:.4f}), "
                  f"{statistics.median([a / b for a, b in zip(secs['lorakit'], secs[n])]):.3f}x the eager steps "
                  f"(paired); first step {first[n]:.0f} s (compilation), {sum(secs[n]) + first[n]:.0f} s for all "
                  f"{run['args'].steps} steps vs {sum(secs['lorakit']) + first['lorakit']:.0f} s eager")
            continue
        print(f"lever {n} off: lorakit {statistics.median(tps[n]):.0f} tokens/s; the lever is worth "
              f"{statistics.median([a / b for a, b in zip(secs[n], secs['lorakit'])]):.3f}x (paired)")


def report(run) -> None:
    tps, work = per_step(run)
    header(run)
    table(run, tps, work)
    summary(run, tps, work)
