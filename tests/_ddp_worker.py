"""A training job for tests/test_distributed.py, run by torchrun (2 ranks) or in one process.

A two-layer MLP with two adapters trained together ("a" and "b", both active) on a task whose
loss skips the second layer for some examples; the examples of every other global batch that fall
on rank 1 all skip it, so in those steps the second layer's adapters get no gradient on rank 1.
In one process the same global batches (``batch × 2`` examples) give the reference. Each process
writes its adapters' final values to ``OUT/rank<k>.safetensors`` and its step losses to
``OUT/losses<k>.json``.

    torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT
    python tests/_ddp_worker.py OUT      # the one-process reference
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorakit
from lorakit.app import distributed
from lorakit.app.loop import Task, TrainConfig, train

BATCH = 2  # per rank; the global batch is 4


def examples() -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(16):
        skip = (i // 4) % 2 == 0 and i % 4 >= 2  # the second half of every other global batch
        out.append((torch.randn(8, generator=g), torch.randn(4, generator=g), skip))
    return out


def task(exs: list[tuple]) -> Task:
    def batches(start: int, size: int):
        i = start
        while True:
            n = len(exs) // size
            yield exs[(i % n) * size:(i % n + 1) * size]
            i += 1

    def collate(b):
        return torch.stack([e[0] for e in b]), torch.stack([e[1] for e in b]), torch.tensor([e[2] for e in b])

    def loss(model, batch):
        x, y, skip = batch
        total = torch.zeros(())
        if (~skip).any():  # the full model
            total = total + ((model(x[~skip]) - y[~skip]) ** 2).sum()
        if skip.any():  # the first layer only: the second layer's adapters get no gradient from these rows
            total = total + (model[0](x[skip]) ** 2).sum() * 0.01
        return total

    return Task(n_examples=len(exs), batches=batches, collate=collate, loss=loss,
                units=lambda b: len(b[0]), tokens=lambda b: len(b[0]))


def main(out: Path) -> None:
    d = distributed.setup()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoRAConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                 init_lora_weights=False), adapter_name=name)
    lorakit.set_adapter(model, ["a", "b"])
    world = d.world if d is not None else 1
    cfg = TrainConfig(steps=8, batch_size=BATCH * (2 // world), lr=1e-2, warmup=0, eval_every=0)
    logs: list[dict] = []
    train(model, task(examples()), cfg, on_log=logs.append, progress=False, dist=d)
    rank = d.rank if d is not None else 0
    out.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"losses{rank}.json").write_text(json.dumps([r["loss"] for r in logs]))
    distributed.teardown(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
