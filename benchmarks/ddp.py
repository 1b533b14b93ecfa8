"""Wall time and peak memory of ``lorakit train`` on 1 process against ``--nproc 2`` (torchrun, DDP)
and ``--nproc 2 --fsdp`` (FSDP2, the base sharded).

Runs the three commands one after the other (``--runs`` times each, interleaved), samples every
process of each run's tree for its peak resident memory (``VmHWM`` in /proc), and prints the wall
times, their ratios and the peak RSS of each training process (the ``--nproc`` launcher left out).
Extra arguments go to every run (default: the built-in main job).

    .venv/bin/python benchmarks/ddp.py                       # the default run, 1 vs 2 processes
    .venv/bin/python benchmarks/ddp.py -- --steps 20         # shorter

On a machine with fewer cores than processes no speed-up is expected; the point is correctness.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [pid], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _hwm(pid: int) -> tuple[str, int] | None:
    """(command line, peak RSS in KiB) of a process, or None once it is gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return cmd, int(line.split()[1])
    except OSError:
        return None
    return None


def measure(argv: list[str]) -> tuple[float, list[int]]:
    """Run ``argv``; (wall seconds, peak RSS in MiB of each process that ran lorakit.app.cli train)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks: dict[int, int] = {}
    while p.poll() is None:
        for pid in _tree(p.pid):
            got = _hwm(pid)
            if got and "lorakit.app.cli train" in got[0] and "--nproc" not in got[0]:  # the workers, not the launcher
                peaks[pid] = max(peaks.get(pid, 0), got[1])
        time.sleep(0.5)
    if p.returncode != 0:
        sys.exit(f"{argv} exited {p.returncode}")
    return time.perf_counter() - t0, sorted(v // 1024 for v in peaks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("extra", nargs="*", help="arguments for both runs (after --)")
    a = ap.parse_args()
    cli = [sys.executable, "-m", "lorakit.app.cli", "train", "--no-progress", *a.extra]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            one = measure(cli + ["--output", f"{tmp}/one{i}"])
            ddp = measure(cli + ["--output", f"{tmp}/ddp{i}", "--nproc", "2"])
            fsdp = measure(cli + ["--output", f"{tmp}/fsdp{i}", "--nproc", "2", "--fsdp"])
            print(f"run {i + 1}: 1 process {one[0]:.0f} s (peak RSS {one[1]} MiB); "
                  f"2 processes DDP {ddp[0]:.0f} s (peak RSS per rank {ddp[1]} MiB, wall {ddp[0] / one[0]:.2f}x); "
                  f"2 processes FSDP {fsdp[0]:.0f} s (peak RSS per rank {fsdp[1]} MiB, wall {fsdp[0] / one[0]:.2f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
