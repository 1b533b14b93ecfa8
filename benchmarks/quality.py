"""Quality ablations of the main job (issue 17): the LoRA paper's Tables 5 and 6 on SmolLM2 + CMUdict G2P,
and full fine-tuning, each a real ``lorakit train`` run (subprocess) on the built-in task.

    python benchmarks/quality.py                          # every group, seed 0, 100 steps of 8 words
    python benchmarks/quality.py --groups table5 --steps 100
    python benchmarks/quality.py --groups defaults        # the candidates for new defaults

Groups (Hu et al. 2021 beside each):
- ``table5``: which weights to adapt at an equal trainable-parameter budget (about 9.2k per layer, the
  budget of W_q at r = 8): W_q, W_k, W_v, W_o, W_q+W_k, W_q+W_v, all four attention matrices, all seven
  projections (Table 5: W_q+W_v beats any single matrix; all four at r = 2 is best).
- ``table6``: r in {1, 2, 4, 8, 16, 64} on W_q+W_v and on all seven, and all seven with rsLoRA
  (Table 6: r = 1-2 already suffices on W_q+W_v; Kalajdzievski 2023: rsLoRA helps large r).
- ``full``: full fine-tuning (``lorakit train --full``) at two learning rates (Table 2: LoRA matches FT).
- ``defaults``: longer runs and learning rates, the candidates for the default job.
- ``seeds``, ``peft``, ``full-seeds``: the default run (r = 16, alpha 32, lr 2e-3, ``3 * --steps`` steps) at each
  training seed of ``--seeds`` (LoRA init / batch order; ``--split-seed 0`` keeps the words) by ``lorakit train``,
  by PEFT + transformers Trainer (``peft_quality.py``: same base, config, batches, optimizer, schedule and
  decoding) and by full fine-tuning at lr 1e-4 (Table 2: LoRA matches FT); a second table gives each one's
  mean and spread over the seeds.

    python benchmarks/quality.py --groups seeds,peft --seeds 0,1,2 --out runs/quality2

Every run uses the same held-out test words (split seed 0; ``--split-seed`` fixes it) and the same number
of training words per step; choices are read off the validation loss (32 validation words), never the
test set. Results go to ``--out``/results.json (runs already there are not repeated), a markdown table
on stdout, and plots ``per_vs_r.png`` and ``per_vs_params.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANKS = (1, 2, 4, 8, 16, 64)


def _runs(steps: int) -> dict[str, dict[str, list[str]]]:
    """group -> run name -> extra ``lorakit train`` arguments."""
    table5 = {  # ranks chosen so r * (in + out) summed over the matrices is about 8 * (576 + 576) = 9216 per layer
        "Wq r=8": ["--target-modules", "q_proj", "--r", "8"],
        "Wk r=12": ["--target-modules", "k_proj", "--r", "12"],
        "Wv r=12": ["--target-modules", "v_proj", "--r", "12"],
        "Wo r=8": ["--target-modules", "o_proj", "--r", "8"],
        "Wq+Wk r=5": ["--target-modules", "q_proj,k_proj", "--r", "5"],
        "Wq+Wv r=5": ["--target-modules", "q_proj,v_proj", "--r", "5"],
        "Wq,Wk,Wv,Wo r=2": ["--target-modules", "q_proj,k_proj,v_proj,o_proj", "--r", "2"],
        "all seven r=1": ["--target-modules", SEVEN, "--r", "1"],
    }
    table6 = {}
    for r in RANKS:  # alpha = 2r keeps s = 2 (the default r = 8, alpha = 16)
        table6[f"Wq+Wv r={r}"] = ["--target-modules", "q_proj,v_proj", "--r", str(r), "--lora-alpha", str(2 * r)]
        table6[f"all seven r={r}"] = ["--target-modules", SEVEN, "--r", str(r), "--lora-alpha", str(2 * r)]
        if r >= 8:  # rsLoRA changes nothing at the reference rank and matters for large r
            table6[f"all seven r={r} rsLoRA"] = ["--target-modules", SEVEN, "--r", str(r), "--lora-alpha", "5.66",
                                                 "--rslora"]  # s = 5.66/sqrt(r): 2 at r = 8
    full = {f"full FT lr={lr}": ["--full", "--lr", lr] for lr in ("3e-5", "1e-4")}
    defaults = {f"all seven r={r} {3 * steps} steps lr={lr}": ["--steps", str(3 * steps), "--lr", lr, "--r", str(r),
                                                                 "--lora-alpha", str(2 * r)]
                for r, lr in ((8, "2e-3"), (8, "4e-3"), (16, "2e-3"), (16, "4e-3"))}
    return {"table5": table5, "table6": table6, "full": full, "defaults": defaults}


def _seed_runs(steps: int, seeds: list[int]) -> dict[str, dict[str, list[str]]]:
    """The default run (r = 16, alpha 32, lr 2e-3, ``3 * steps`` steps) by lorakit, by PEFT, and full fine-tuning at
    its best lr, at each training seed; the split stays seed 0's (``--split-seed 0``): the same words everywhere."""
    n = str(3 * steps)
    return {
        "seeds": {f"lorakit default seed={s}": ["--steps", n, "--seed", str(s), "--split-seed", "0"] for s in seeds},
        "peft": {f"PEFT default seed={s}": ["--peft", "--steps", n, "--seed", str(s), "--split-seed", "0"]
                 for s in seeds},
        "full-seeds": {f"full FT lr=1e-4 {n} steps seed={s}": ["--full", "--lr", "1e-4", "--steps", n, "--seed", str(s),
                                                              "--split-seed", "0"] for s in seeds},
    }


def run_one(name: str, extra: list[str], out: Path, steps: int, test_size: int, reuse: bool = False) -> dict:
    """One ``lorakit train`` run (``--peft`` first in ``extra``: ``peft_quality.py``, the PEFT arm); its test PER /
    exact match, last validation loss and trainable count. ``reuse``: a folder already holding ``eval.json`` is read,
    not trained again."""
    folder = out / name.replace(" ", "_").replace("=", "").replace(",", "-").replace("+", "-")
    args = ["--steps", str(steps)] + extra if "--steps" not in extra else extra
    peft = "--peft" in args
    if peft:
        cmd = [sys.executable, str(Path(__file__).with_name("peft_quality.py")), "--output", str(folder),
               "--test-size", str(test_size), *[a for a in args if a != "--peft"]]
    else:
        cmd = [sys.executable, "-m", "lorakit.app.cli", "train", "--no-progress", "--overwrite", "--output",
               str(folder), "--test-size", str(test_size), "--seed", "0", *args]
    t = time.perf_counter()
    if not (reuse and (folder / "eval.json").is_file()):
        (out / "logs").mkdir(exist_ok=True)
        with open(out / "logs" / f"{folder.name}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed; see {out / 'logs' / folder.name}.log")
    ev = json.loads((folder / "eval.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    meta = json.loads((folder / ("model" if "--full" in extra else "") / "lorakit.json").read_text())
    beams = ev["num_beams"] if peft else meta.get("g2p", {}).get("num_beams", 1)
    return {"name": name, "args": args, "per": ev["after"]["per"], "exact_match": ev["after"]["exact_match"],
            "per_before": ev.get("before", {}).get("per"), "val_loss": val[-1] if val else None,
            "trainable": meta["trainable_parameters"], "steps": ev["train"]["steps"], "num_beams": beams,
            "tokens_per_s": ev["train"]["tokens_per_s"], "seconds": ev.get("wall_seconds", time.perf_counter() - t)}


def table(results: list[dict]) -> str:
    lines = ["| run | trainable | val loss | test PER | exact match | steps | decoding | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        beams = r.get("num_beams", 1)
        lines.append(f"| {r['name']} | {r['trainable']:,} | {r['val_loss']:.3f} | {r['per']:.3f} | "
                     f"{100 * r['exact_match']:.1f}% | {r['steps']} | {f'{beams} beams' if beams > 1 else 'greedy'} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def seed_table(results: list[dict]) -> str:
    """Mean and spread over the seeds of each run named ``... seed=N``: sample standard deviation and range."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if " seed=" in r["name"]:
            groups.setdefault(r["name"].rsplit(" seed=", 1)[0], []).append(r)
    lines = ["| run | seeds | test PER mean ± sd (min-max) | exact match mean ± sd (min-max) | val loss mean |",
             "|---|---|---|---|---|"]
    for name, rs in groups.items():
        cells = []
        for key, scale, fmt in (("per", 1, ".3f"), ("exact_match", 100, ".1f")):
            v = [scale * r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            cells.append(f"{statistics.mean(v):{fmt}} ± {sd:{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})")
        seeds = ",".join(r["name"].rsplit("=", 1)[1] for r in rs)
        val = statistics.mean(r["val_loss"] for r in rs)
        lines.append(f"| {name} | {seeds} | {cells[0]} | {cells[1]} | {val:.3f} |")
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["name"]: r for r in results}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, fmt in (("Wq+Wv", "Wq+Wv r={}"), ("all seven", "all seven r={}"), ("all seven rsLoRA", "all seven r={} rsLoRA")):
        pts = [(r, by[fmt.format(r)]["per"]) for r in RANKS if fmt.format(r) in by]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xscale="log", xlabel="rank r", ylabel="test PER (lower is better)", title="PER against r")
    if ax.lines:  # no Table 6 runs in this folder: no legend (and no warning)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_vs_r.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["trainable"], r["per"], s=14)
        ax.annotate(r["name"], (r["trainable"], r["per"]), fontsize=5)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="test PER", title="PER against trainable parameters")
    fig.tight_layout()
    fig.savefig(out / "per_vs_params.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="defaults,table5,full,table6")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", default="0", help="training seeds of the groups seeds, peft and full-seeds")
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--reuse", action="store_true", help="read a run folder already holding eval.json, not train again")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    done = {r["name"]: r for r in json.loads(store.read_text())} if store.is_file() else {}
    runs = _runs(args.steps) | _seed_runs(args.steps, [int(s) for s in args.seeds.split(",")])
    for group in args.groups.split(","):
        for name, extra in runs[group].items():
            if name not in done:
                done[name] = run_one(name, extra, out, args.steps, args.test_size, args.reuse)
                store.write_text(json.dumps(list(done.values()), indent=1))
                r = done[name]
                print(f"{name}: PER {r['per']:.3f}, EM {100 * r['exact_match']:.1f}%, val loss {r['val_loss']:.3f} "
                      f"({r['seconds']:.0f} s)", flush=True)
    results = list(done.values())
    print(table(results))
    print(seed_table(results))
    plots(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
