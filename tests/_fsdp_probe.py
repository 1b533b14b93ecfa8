"""``lorakit train`` as a torchrun worker that records what this rank held of the base model, for
tests/test_distributed.py (FSDP's sharded loading):

    torchrun --standalone --nproc_per_node 2 tests/_fsdp_probe.py PROBE train ... --fsdp

Writes ``PROBE-rank<k>.json``: ``loads`` (calls of ``models.load_model``: reading the base), for each
``fully_shard`` call the parameter bytes of the module and how many of them were in memory (not on
the ``meta`` device) just before it, and ``most_gathered_after_forward``: the most sharded modules
found holding whole (not DTensor) parameters right after a sharded module's forward returned.
"""

import json
import os
import sys
from pathlib import Path

from torch.distributed import fsdp
from torch.distributed.tensor import DTensor

from lorakit.app import cli, models


def main(probe: str, argv: list[str]) -> int:
    rec = {"loads": 0, "shard_calls": [], "most_gathered_after_forward": 0}
    sharded = []
    load_model, fully_shard = models.load_model, fsdp.fully_shard

    def counting_load(*a, **kw):
        rec["loads"] += 1
        return load_model(*a, **kw)

    def after_forward(*_):
        whole = sum(any(not isinstance(p, DTensor) for p in m.parameters()) for m in sharded)
        rec["most_gathered_after_forward"] = max(rec["most_gathered_after_forward"], whole)

    def recording_shard(module, **kw):
        params = list(module.parameters())
        rec["shard_calls"].append({"bytes": sum(p.numel() * p.element_size() for p in params),
                                   "held": sum(p.numel() * p.element_size() for p in params if not p.is_meta)})
        out = fully_shard(module, **kw)
        sharded.append(module)
        module.register_forward_hook(after_forward)  # after FSDP's own hook, which reshards (or not)
        return out

    models.load_model, fsdp.fully_shard = counting_load, recording_shard
    try:
        return cli.main(argv)
    finally:  # the process group is gone by now: torchrun's RANK names the rank
        Path(f"{probe}-rank{os.environ['RANK']}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
