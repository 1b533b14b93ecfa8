"""How a bank's stacked A factors should lie in memory for the decoding step's batched matmul.

A mixed batch's decoding step runs ``bmm(xs (S, L, in), A^T (S, in, r))`` over the adapter slots
(``lorakit.adapter.stacked_bypass``). ``A^T`` can be stored row-major as (S, in, r), or as A itself,
(S, r, in) row-major, viewed transposed (``lorakit.hot.a_slots``, lorakit's layout). This times both,
interleaved, at SmolLM2-135M's projection shapes (in = 576 for q/k/v/o/gate/up, 1536 for down), and
the B side (S, r, out) for scale. Usage: ``python benchmarks/slot_layout.py [--slots 16] [--rows 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import machine  # noqa: E402


def per_call_us(fn, calls: int = 500) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=16, help="adapters in the batch (bank slots)")
    ap.add_argument("--rows", type=int, default=2, help="rows per slot (32 decoding rows over 16 adapters: 2)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    s, L, r = args.slots, args.rows, args.r
    print(f"# slot_layout.py: {s} slots x {L} rows, r={r}; {machine()}")
    print("| in | A^T row-major (S, in, r) µs | A row-major (S, r, in), viewed transposed µs | ratio | B (S, r, out) µs |")
    print("|---|---|---|---|---|")
    for n_in, n_out in ((576, 576), (1536, 576)):
        xs, h = torch.randn(s, L, n_in), torch.randn(s, L, r)
        a_rows = torch.randn(s, n_in, r)  # A^T stored as it is used
        a_as_a = a_rows.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, A's own layout
        b = torch.randn(s, r, n_out)
        want = torch.bmm(xs.double(), a_rows.double())  # both layouts give the float64 product to float32 rounding
        for a in (a_rows, a_as_a):
            assert (torch.bmm(xs, a) - want).abs().max() <= 1e-5 * want.abs().max()
        times: dict[str, list[float]] = {"rows": [], "as_a": [], "b": []}
        for _ in range(args.repeats):  # interleaved: the machine's drift hits each layout alike
            times["rows"].append(per_call_us(lambda: torch.bmm(xs, a_rows)))
            times["as_a"].append(per_call_us(lambda: torch.bmm(xs, a_as_a)))
            times["b"].append(per_call_us(lambda: torch.bmm(h, b)))
        med = {k: statistics.median(v) for k, v in times.items()}
        spread = {k: (max(v) - min(v)) / 2 for k, v in times.items()}
        print(f"| {n_in} | {med['rows']:.1f} ± {spread['rows']:.1f} | {med['as_a']:.1f} ± {spread['as_a']:.1f} "
              f"| {med['as_a'] / med['rows']:.3f} | {med['b']:.1f} ± {spread['b']:.1f} |")


if __name__ == "__main__":
    main()
