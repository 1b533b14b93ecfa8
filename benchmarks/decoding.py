"""Is decoding what holds the G2P adapter back? Greedy against beam search, and the stop criteria (issue 17, item 3).

    python benchmarks/decoding.py --adapter runs/g2p-...      # an adapter `lorakit train` wrote
    python benchmarks/decoding.py --adapter runs/g2p-... --beams 2,4 --extra-tokens 16

On the adapter's own held-out test words (the split recorded with it, as `lorakit eval` reads it),
merged into the base as `lorakit eval` runs it, each decoding is scored with the same PER / exact
match: greedy with the default cap (the longest reference in tokens + 2, `evaluate_g2p`), greedy with
``--extra-tokens`` more room (does the cap cut words short?), and beam search with each ``--beams``
width (length penalty 1, stopping when every beam has ended). Also counted: completions that hit
the cap without the end-of-sequence token (truncated), and completions holding anything but
phoneme symbols (the stop criterion letting text run on).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402
from lorakit.app import g2p  # noqa: E402
from lorakit.app.console import quiet_transformers  # noqa: E402
from lorakit.app.data import render_prompt  # noqa: E402
from lorakit.app.evaluate import g2p_scores, generated_tokens  # noqa: E402
from lorakit.app.models import load_with_adapter, prompt_format  # noqa: E402
from lorakit.app.qbase import merge_unless_quantized  # noqa: E402

PHONEME = re.compile(r"^[A-Z]{1,2}[012]?$")  # ARPAbet, with CMUdict's stress digits


def decode(model, tokenizer, prompts: list[str], max_new_tokens: int, beams: int):
    """Completions of ``prompts`` (greedy when ``beams`` is 1) and, per prompt, whether it ended with EOS."""
    rows = generated_tokens(model, tokenizer, prompts, max_new_tokens, batch_size=32, num_beams=beams)
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    return texts, [bool((row == tokenizer.eos_token_id).any()) for row in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="a folder `lorakit train` wrote (built-in G2P task)")
    ap.add_argument("--beams", default="2,4", help="comma list of beam widths")
    ap.add_argument("--extra-tokens", type=int, default=16, help="the longer cap: default cap + this")
    ap.add_argument("--split", choices=["test", "validation"], default="test",
                    help="the recorded held-out words to score (choose decoding on validation)")
    args = ap.parse_args(argv)
    quiet_transformers()
    lm, meta = load_with_adapter(args.adapter)
    merge_unless_quantized(lm.model)
    lm.model.eval()
    g = meta.get("g2p", {})
    split = g2p.g2p_split(g.get("seed", 0), g.get("test_size", 200), g.get("validation_size", g2p.G2P_VALIDATION))
    items, tok = getattr(split, args.split), lm.tokenizer
    cap = 2 + max(len(tok(" ".join(p), add_special_tokens=False).input_ids) for _, refs in items for p in refs)
    prompts = [render_prompt(tok, w, prompt_format(meta, tok)) for w, _ in items]
    refs = [r for _, r in items]
    runs = [("greedy", 1, cap), (f"greedy, cap + {args.extra_tokens}", 1, cap + args.extra_tokens)]
    runs += [(f"beam search, {b} beams", b, cap) for b in (int(x) for x in args.beams.split(",") if x)]
    print(f"# decoding.py --adapter {args.adapter} --split {args.split}: {len(items)} words, default cap {cap} new "
          f"tokens; {machine()}")
    print("| decoding | PER | exact match | truncated (no EOS) | non-phoneme output | s |")
    print("|---|---|---|---|---|---|")
    for label, beams, max_new in runs:
        t = time.perf_counter()
        texts, ended = decode(lm.model, tok, prompts, max_new, beams)
        dt = time.perf_counter() - t
        scores = g2p_scores(texts, refs)
        odd = sum(any(not PHONEME.match(p) for p in text.split()) for text in texts)
        print(f"| {label} | {scores['per']:.4f} | {100 * scores['exact_match']:.1f}% | {ended.count(False)} "
              f"| {odd} | {dt:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
