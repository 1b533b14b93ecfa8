"""Training checkpoints: ``OUTPUT/checkpoint-STEP/``, written atomically, read back bit for bit.

A checkpoint holds everything a resumed run needs to continue exactly where the interrupted one
was, so that both end with byte-identical adapters:

- the trained adapters in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``;
  an adapter other than ``default`` in a subfolder of its name, as PEFT saves several);
- ``optimizer.safetensors``: AdamW's per-parameter state (step, exp_avg, exp_avg_sq);
- ``rng.safetensors``: torch's CPU (and CUDA) generator states, of each rank (``rank0.torch``, ...);
- ``trainer_state.json``: the global step, the optimizer's hyperparameters and parameter names,
  the learning-rate scheduler's state, Python's and NumPy's generator states of each rank, the data
  position (epoch, order seed, batches consumed), the run's configuration and its SHA-256, the log
  history, the skipped non-finite steps, the caller's extra state, the SHA-256 of every other file
  and its own (so a hand edit counts as damage, like a truncated file).

Nothing is unpickled on load: tensors come from safetensors, the rest from JSON. The folder is
built beside its final name, fsynced and renamed (``files.write_folder``), so a crash at any
instant leaves the previous checkpoints complete; only the newest ``keep`` are kept. An
FSDP-sharded run writes the same files, with the whole tensors gathered from every rank's shards
(``fsdp_state``), so its checkpoints load in one process like any other.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit import active_adapters, save_adapter, set_adapter
from lorakit.errors import AdapterLoadError, CheckpointError, SaveError
from lorakit.io import adapter_tensors, load_adapter_tensors, read_adapter
from lorakit.tree import model_state

from .console import log
from .files import write_folder

PREFIX = "checkpoint-"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
FORMAT = 1
_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass
class Checkpointing:
    """How ``loop.train`` checkpoints and resumes.

    Attributes:
        folder: the run's output folder; checkpoints go to ``folder/checkpoint-STEP``.
        every: write one every this many optimizer steps (0: only when SIGINT / SIGTERM stop the run).
        keep: keep only the newest this many (None: all).
        config: the caller's run configuration (JSON values: data file digests, model, options); with
            the loop's own settings and the adapters' configs it is hashed into the checkpoint, and a
            resume with a different one is refused with the changed keys listed.
        resume: continue from the newest complete checkpoint in ``folder``.
        extra: JSON state the caller wants back on resume (e.g. the evaluation before training).
    """

    folder: Path
    every: int = 0
    keep: int | None = None
    config: dict = field(default_factory=dict)
    resume: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class TrainState:
    """Where a run stands after ``step`` optimizer steps (what a checkpoint stores beyond tensors)."""

    step: int = 0
    skipped: int = 0
    val_loss_start: float | None = None
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    rng: tuple[dict, dict] | None = None  # (JSON part, tensor part) to restore before the next step
    compile_from: int | None = None  # --compile auto's decision: None (not yet), 0 (eager) or the first compiled step


def digest(obj) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """``key (old -> new)`` for each (dotted) key whose value differs between two configurations."""
    a, b = _flat(old), _flat(new)
    return [f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def run_config(model, cfg, extra: dict, world: int = 1) -> dict:
    """The configuration a checkpoint must match: the caller's ``extra``, the loop's settings (all
    but ``on_nonfinite`` and ``compile``, which a resume may change), the number of processes and each active
    adapter's config."""
    train = {k: v for k, v in vars(cfg).items() if k not in ("on_nonfinite", "compile")}
    configs = model_state(model).configs
    adapters = {n: {k: v for k, v in configs[n].to_dict().items() if k not in ("base_model_name_or_path", "revision")}
                for n in active_adapters(model)}
    return json.loads(json.dumps({"run": extra, "train": train, "world_size": world, "adapters": adapters},
                                 default=str))


def _unbind_compile(config):
    """``config`` without ``compile`` (checkpoints before a resume could change it bound it)."""
    out = dict(config) if isinstance(config, dict) else config
    if isinstance(out, dict) and isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k != "compile"}
    run = out.get("run") if isinstance(out, dict) else None
    if isinstance(run, dict) and isinstance(run.get("options"), dict):
        out["run"] = {**run, "options": {k: v for k, v in run["options"].items() if k != "compile"}}
    return out


def steps_in(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint folders in ``folder`` (complete by construction), oldest first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()] \
        if folder.is_dir() else []
    return sorted(found)


def _verify(path: Path) -> dict:
    """The checkpoint's trainer state, after checking every file against its recorded SHA-256."""
    try:
        state = json.loads((path / STATE).read_text())
        files, own = state["files"], state.pop("state_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(path / STATE)!r} is missing or corrupt: {e}") from None
    if own != digest(state) or state.get("step") != int(_NAME.fullmatch(path.name).group(1)):
        raise CheckpointError(f"{str(path / STATE)!r} was changed after it was written (its SHA-256 or step "
                              "does not match)")
    for rel, sha in files.items():
        f = path / rel
        if not f.is_file() or file_digest(f) != sha:
            raise CheckpointError(f"{str(f)!r} is missing or does not match its recorded SHA-256")
    return state


def latest(folder: str | Path, log=log) -> tuple[Path, dict]:
    """The newest complete, intact checkpoint in ``folder`` and its trainer state.

    A damaged checkpoint (a file changed after it was written) is skipped with a note.

    Raises:
        CheckpointError: ``folder`` holds no complete checkpoint, or only damaged ones (the newest's
            damage named).
    """
    damaged = []
    for _, path in reversed(steps_in(folder)):
        try:
            return path, _verify(path)
        except CheckpointError as e:
            log(f"lorakit: note: skipping damaged checkpoint: {e}")
            damaged.append(e)
    if damaged:
        raise CheckpointError(f"{str(folder)!r} holds {len(damaged)} checkpoint(s), all damaged; the newest: "
                              f"{damaged[0]}; nothing to resume")
    raise CheckpointError(f"{str(folder)!r} holds no complete checkpoint (checkpoint-STEP/ with {STATE}); "
                          "nothing to resume")


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's Python, NumPy and torch (CPU, CUDA) generator states: (JSON part, tensors)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}, tensors


def set_rng_state(rng: tuple[dict, dict[str, torch.Tensor]]) -> None:
    """Restore the Python, NumPy and torch generators saved in a checkpoint."""
    import numpy as np

    plain, tensors = rng
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    for i, state in enumerate(cuda[:torch.cuda.device_count()] if torch.cuda.is_available() else []):
        torch.cuda.set_rng_state(state, i)  # the devices visible now (a resume may see fewer)


def _adapter_folder(root: Path, name: str) -> Path:
    return root if name == "default" else root / name


def check_covered(model) -> None:
    """Every trainable parameter must belong to an active adapter: checkpoints hold adapters only.

    Raises:
        CheckpointError: a trainable parameter outside the adapters (named).
    """
    covered = {id(t) for n in active_adapters(model) for t in adapter_tensors(model, n).values()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            raise CheckpointError(f"parameter {name!r} is trainable but belongs to no active adapter; "
                                  "checkpoints hold the adapters, so freeze it or train it as modules_to_save")


def _optimizer_parts(opt: torch.optim.Optimizer, names: list[str], tensors: dict | None) -> tuple[dict, dict]:
    """(JSON part, tensors) of the optimizer's state; ``tensors``: already gathered whole (FSDP)."""
    sd = opt.state_dict()
    if tensors is None:
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    return {"param_groups": sd["param_groups"], "parameters": names}, tensors


def save(ck: Checkpointing, step: int, model, opt, sched, names: list[str], state: TrainState,
         data: dict, config: dict, rngs: list[tuple[dict, dict]], gathered: tuple[dict, dict] | None = None) -> Path:
    """Write ``ck.folder/checkpoint-STEP`` atomically, then drop all but the newest ``ck.keep``.

    ``rngs``: each rank's ``rng_state()`` (one entry in a single process). ``gathered``: for a
    sharded model, the whole adapters and optimizer tensors (``fsdp_state.gather``), written instead
    of the model's and optimizer's own (one rank's shards).

    Raises:
        SaveError: the write failed (disk full, permission); the path is named, the temporary
            folder removed, every earlier checkpoint left as it was.
    """
    dest = Path(ck.folder) / f"{PREFIX}{step}"
    rng_tensors = {f"rank{k}.{name}": t for k, (_, ts) in enumerate(rngs) for name, t in ts.items()}
    opt_plain, opt_tensors = _optimizer_parts(opt, names, gathered[1] if gathered else None)
    active = active_adapters(model)

    def fill(tmp: Path) -> None:
        for name in active:
            save_adapter(model, _adapter_folder(tmp, name), name, gathered[0][name] if gathered else None)
        save_file(opt_tensors, str(tmp / OPTIMIZER), metadata={"format": "pt"})
        save_file(rng_tensors, str(tmp / RNG), metadata={"format": "pt"})
        files = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        doc = {"format": FORMAT, "step": step, "config_hash": digest(config), "config": config,
               "adapters": active, "optimizer": opt_plain, "scheduler": sched.state_dict(),
               "rng": [plain for plain, _ in rngs], "data": data, "skipped_steps": state.skipped,
               "val_loss_start": state.val_loss_start, "extra": state.extra, "log_history": state.history,
               "compile_from": state.compile_from,
               "files": files}
        doc["state_sha256"] = digest(doc)  # a hand-edited state counts as damaged
        (tmp / STATE).write_text(json.dumps(doc, indent=1) + "\n")

    try:
        write_folder(dest, fill, replace=True)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise SaveError(f"could not write checkpoint {str(dest)!r}: {reason}; "
                        "the earlier checkpoints are unchanged") from None
    if ck.keep:
        for _, old in steps_in(ck.folder)[:-ck.keep]:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def remove_partial(folder: str | Path) -> None:
    """Remove temporary checkpoint folders a crash left behind (``.checkpoint-STEP.*``)."""
    for p in Path(folder).glob(f".{PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def restore(path: Path, doc: dict, model, opt, sched, names: list[str], config: dict, rank: int = 0,
            sharded: bool = False) -> TrainState:
    """Load a checkpoint (``latest``'s result) into the model, optimizer and scheduler; the generator
    states to restore before the next step are rank ``rank``'s. ``sharded``: an FSDP model, every
    rank calls this together and keeps its shards of the whole tensors (``fsdp_state.scatter``).

    Raises:
        CheckpointError: the configuration, adapters or parameters differ from the checkpoint's
            (changed keys listed), or a file does not load.
    """
    older = _unbind_compile(doc.get("config", {}))
    if doc.get("config_hash") != digest(config) and digest(older) != digest(config):
        changed = changed_keys(older, config)
        raise CheckpointError(f"{str(path)!r} was written by a run with another configuration; changed: "
                              f"{', '.join(changed) or 'unknown'}")
    if doc["optimizer"]["parameters"] != names:
        raise CheckpointError(f"{str(path)!r} trains other parameters than this model "
                              f"(first: {doc['optimizer']['parameters'][:1]} vs {names[:1]})")
    active, whole = active_adapters(model), {}
    try:
        for name in doc["adapters"]:
            src = _adapter_folder(path, name)
            cfg, tensors = read_adapter(src)
            if sharded:  # loaded below, into the shards
                whole[name] = tensors
            else:
                load_adapter_tensors(model, cfg, tensors, name, src)
        opt_tensors, rng_tensors = load_file(str(path / OPTIMIZER)), load_file(str(path / RNG))
    except (AdapterLoadError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from None
    finally:
        set_adapter(model, active)
    state: dict = {}
    for key, t in opt_tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    if sharded:
        from .fsdp_state import scatter

        scatter(model, opt, whole, state, doc["optimizer"]["param_groups"], names, str(path))
    else:
        opt.load_state_dict({"state": state, "param_groups": doc["optimizer"]["param_groups"]})
    sched.load_state_dict(doc["scheduler"])
    return TrainState(step=doc["step"], skipped=doc["skipped_steps"], val_loss_start=doc["val_loss_start"],
                      history=doc["log_history"], extra=doc["extra"], compile_from=doc.get("compile_from"),
                      rng=(doc["rng"][rank], {k.split(".", 1)[1]: t for k, t in rng_tensors.items()
                                              if k.split(".", 1)[0] == f"rank{rank}"}))
