"""LoRA on a float32, int8 and NF4 base (``lorakit train --quantize``), run by ``memory.py --bases``.

    python benchmarks/memory.py --bases fp32,int8,nf4

For each base, in fresh processes, one after the other:

1. ``memory.py``'s worker (``lorakit`` mode, the base quantised right after loading as the CLI does):
   RSS after load, the load's peak (VmHWM before training) and the peak RSS of ``--steps`` training steps
   (VmRSS sampled every 10 ms and VmHWM reset after load), on the same G2P batches.
2. The default run, ``lorakit train [--quantize KIND]`` (built-in G2P task and its defaults: r=16 on the
   seven projections, 300 steps): the whole process's peak RSS (``ru_maxrss`` of the child: load, the evaluation
   before and after, training), training tokens/s, and test PER and exact match after training from its
   eval.json. The float32 run evaluates merged (its merge keeps a copy of each adapted weight); the
   quantised runs evaluate unmerged (a quantised base takes no merge).

Targets (issue 16): NF4 peak RSS <= 0.6x float32's; NF4 test PER within 10% (relative) of float32's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 / 1024


def parse_base(base: str) -> tuple[str, bool]:
    """``KIND`` (``lorakit train``'s default: gradient checkpointing with a quantised base only), ``KIND+gc`` or
    ``KIND-gc`` (``--gradient-checkpointing`` / ``--no-gradient-checkpointing``): (kind, checkpointing)."""
    kind = base.removesuffix("+gc").removesuffix("-gc")
    return kind, base.endswith("+gc") or (kind != "fp32" and not base.endswith("-gc"))


def cli_run(base: str, out: Path) -> dict:
    """One default ``lorakit train`` on ``base`` in a child process: its peak RSS and eval.json."""
    kind, checkpointing = parse_base(base)
    cmd = [sys.executable, "-m", "lorakit.app.cli", "train", "--output", str(out), "--no-progress"]
    cmd += [] if kind == "fp32" else ["--quantize", kind]
    cmd += ["--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"]
    t = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lorakit train ({base}) failed; log: {out.with_suffix('.log')}")
    ev = json.loads((out / "eval.json").read_text())
    return {"maxrss_kib": usage.ru_maxrss, "wall_s": time.perf_counter() - t, "eval": ev}


def compare_bases(bases: list[str], run_worker, args) -> int:
    from common import machine

    load_before = os.getloadavg()[0]
    work = {}
    for b in bases:
        kind, checkpointing = parse_base(b)
        work[b] = run_worker("lorakit", args, None if kind == "fp32" else kind, checkpointing)
    root = Path(tempfile.mkdtemp(prefix="lorakit-bases-"))
    runs = {b: cli_run(b, root / b) for b in bases} if not args.workers_only else {}
    print(f"# memory.py --bases {','.join(bases)} --steps {args.steps} --batch-size {args.batch_size}: lorakit LoRA "
          f"r=8 on 7 projections of SmolLM2-135M-Instruct; columns 2-4: memory.py's worker ({args.steps} G2P steps); "
          f"the rest: one default `lorakit train [--quantize]` each; {machine()}; load average at start "
          f"{load_before:.2f}; logs in {root}")
    print("\n| base | RSS after load MiB | load peak MiB | training peak MiB | training peak / fp32 | "
          "`lorakit train` peak MiB | / fp32 | train tokens/s | test PER after | exact match after | PER / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = bases[0]
    pk = lambda r: max(r["peak_kib"], r["hwm_kib"] or 0)  # noqa: E731
    for b in bases:
        w = work[b]
        row = (f"| {b} | {w['after_load_kib'] * MIB:.0f} | {w['load_hwm_kib'] * MIB:.0f} | {pk(w) * MIB:.0f} | "
               f"{pk(w) / pk(work[ref]):.3f} | ")
        if b not in runs:  # --workers-only
            print(row + "- | - | - | - | - | - |")
            continue
        r = runs[b]
        after, tr = r["eval"]["after"], r["eval"]["train"]
        print(row + f"{r['maxrss_kib'] * MIB:.0f} | {r['maxrss_kib'] / runs[ref]['maxrss_kib']:.3f} | "
              f"{tr['tokens_per_s']:.0f} | {after['per']:.4f} | {after['exact_match']:.3f} | "
              f"{after['per'] / runs[ref]['eval']['after']['per']:.3f} |")
    if not runs:
        return 0
    before = runs[ref]["eval"]["before"]
    print(f"\nbase model before training ({ref}): PER {before['per']:.4f}, exact match {before['exact_match']:.3f}; "
          f"wall s: " + ", ".join(f"{b} {runs[b]['wall_s']:.0f}" for b in bases))
    if "nf4" in runs and ref == "fp32":
        peak_ratio = pk(work["nf4"]) / pk(work[ref])
        run_ratio = runs["nf4"]["maxrss_kib"] / runs[ref]["maxrss_kib"]
        per_ratio = runs["nf4"]["eval"]["after"]["per"] / runs[ref]["eval"]["after"]["per"]
        print(f"target NF4 peak RSS <= 0.6x fp32: training {peak_ratio:.3f} {'MET' if peak_ratio <= 0.6 else 'NOT MET'}, "
              f"whole `lorakit train` {run_ratio:.3f} {'MET' if run_ratio <= 0.6 else 'NOT MET'}")
        print(f"target NF4 PER within 10% of fp32: {per_ratio - 1:+.1%} {'MET' if abs(per_ratio - 1) <= 0.1 else 'NOT MET'}")
    return 0
