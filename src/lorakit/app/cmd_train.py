"""``lorakit train``: the causal-LM job (the built-in CMUdict G2P task or the user's JSONL) and
``--task classify``.

The LM job, in order: options -> data (read before the slow model load, so bad files fail fast)
-> base model + LoRA -> evaluation before -> ``loop.train`` -> adapter + ``lorakit.json`` ->
evaluation after (merged) -> ``eval.json``, ``loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from safetensors import SafetensorError

from lorakit import disable_adapters, inject, merge, save_adapter, trainable_parameters, unmerge
from lorakit.errors import CheckpointError, CLIError, DataError, SaveError
from lorakit.durable import write_json

from . import allocator, checkpoint, classify, devices, distributed, fsdp_load, fsdp_state, full, g2p, loop
from .checkpoint import Checkpointing
from .distributed import Dist
from .console import log, pct, quiet_transformers
from .data import Dataset, read_jsonl, tokenize_dataset
from .evaluate import evaluate_g2p, perplexity
from .jsonl import RecordLog
from .lm_loss import lm_task, mean_loss
from .models import DEFAULT_HF_ID, DEFAULT_MODEL, load_base, write_metadata
from .options import (INT8_CPU_ONLY, QUANTIZE_ONE_PROCESS, TrainOptions, resumed_options, run_options, split_seed,
                      train_options)
from .plots import plot_losses


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``lorakit train`` with the merged, validated options. Returns the exit status (0)."""
    t_start = time.perf_counter()
    o, given = train_options(args)
    if o.task == "classify":
        return train_classify(o, given)
    if o.full:
        full.check(o, given)
    if distributed.launched():  # a worker: the job's size, recorded so that --resume starts as many
        o = dataclasses.replace(o, nproc=int(os.environ["WORLD_SIZE"]))
    resume = None
    if o.resume is not None:
        resume = _resume_point(o)
        o = resumed_options(o, given, resume[1]["config"]["run"]["options"], resume[1]["extra"]["options"])
    if o.nproc > 1 and not distributed.launched():  # --nproc, or a resumed run of several processes
        devices.resolve(o.device, o.nproc - 1, distributed.FSDP_CPU_ONLY if o.fsdp else None, o.nproc)  # each rank's
        _check_data_files(o)  # here, before any worker starts: a worker failing alone leaves its peers' noise
        return distributed.launch(distributed.without_nproc(getattr(args, "argv", None) or sys.argv[1:]), o.nproc,
                                  o.fsdp)
    return train_lm(o, t_start, resume)


def output_folder(o: TrainOptions, name: str, adapter_dir: str = ".") -> Path:
    """``--output`` or ``runs/<name>-<timestamp>``, refused when it already holds an adapter or, unless
    resumed, checkpoints of another run.

    Raises:
        CLIError: the folder holds an adapter or checkpoints (and no ``--overwrite``), or the path is not
            a folder.
    """
    out = Path(o.output or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / adapter_dir / "adapter_config.json").exists() and not o.overwrite:
        raise CLIError(f"output folder {str(out)!r} already holds an adapter (use --overwrite or another --output)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is not a folder")
    if o.resume is None and checkpoint.steps_in(out) and not o.overwrite:
        raise CLIError(f"output folder {str(out)!r} holds checkpoints of an earlier run (--resume {str(out)} "
                       "continues it; --overwrite starts over)")
    return out


def _resume_point(o: TrainOptions) -> tuple[Path, dict]:
    """The newest complete checkpoint of ``--resume``'s folder and its state.

    Raises:
        CLIError: the folder holds the finished run's adapter.
        CheckpointError: no complete checkpoint, or one not written by ``lorakit train``.
    """
    folder = Path(o.resume)
    if not folder.exists() or not folder.is_dir():
        raise CLIError(f"--resume {str(folder)!r} " + ("does not exist" if not folder.exists() else "is not a folder"))
    if folder in [p for _, p in checkpoint.steps_in(folder.parent)]:
        raise CLIError(f"--resume {str(folder)!r} is a checkpoint; give its run folder: --resume {str(folder.parent)!r}")
    if (folder / "adapter_config.json").exists():
        raise CLIError(f"{str(folder)!r} holds a finished run's adapter; nothing to resume")
    path, doc = checkpoint.latest(folder, log=lambda *_: None)  # the training loop notes damaged ones
    if not {"options"} <= set(doc.get("config", {}).get("run", {})) or "options" not in doc.get("extra", {}):
        raise CheckpointError(f"{str(path)!r} was not written by lorakit train; resume it with the library's "
                              "loop.train(checkpoints=...)")
    return path, doc


def _check_data_files(o: TrainOptions) -> None:
    """Raises ``DataError`` naming ``--data`` / ``--eval-data`` if it does not exist or is a folder."""
    for v in (o.data, o.eval_data):
        if v and not Path(v).is_file():
            raise DataError(f"data file {v!r} "
                            + ("is a folder, not a JSONL file" if Path(v).is_dir() else "does not exist"))


def _run_config(o: TrainOptions) -> dict:
    """What a checkpoint of this run is bound to: the options that shape the adapter, the SHA-256 of the
    data files, and the size and modification time of the local base model's files (a changed file is a
    changed run).

    Raises:
        DataError: a data file does not exist.
    """
    files = {"data": o.data, "eval_data": o.eval_data}
    _check_data_files(o)
    digests = {k: checkpoint.file_digest(v) if v else None for k, v in files.items()}
    model = Path(o.model)
    entries = ([model] if model.is_file() else sorted(model.iterdir())) if model.exists() else None
    stamps = {p.name: [(st := p.stat()).st_size, st.st_mtime_ns]  # not hashed: a base can be many GB
              for p in entries if p.is_file()} if entries is not None else None
    return {"options": run_options(o), "data_sha256": digests, "model_files": stamps}


def train_classify(o: TrainOptions, given: frozenset[str]) -> int:
    """``lorakit train --task classify`` (``classify.run_classify``)."""
    device = devices.select(o.device)
    out = output_folder(o, "classify", "adapter")
    log(f"output folder: {out}")
    log(f"device: {devices.describe(device)}")
    kw = {k: getattr(o, k) for k in classify.OPTIONS - {"data", "eval_data", "epochs"}} | {"device": device}
    res = classify.run_classify(out, o.data, o.eval_data, model_dir=None if o.model == DEFAULT_MODEL else o.model,
                                epochs=int(o.epochs), **kw, log=log, progress=o.progress)
    log(f"accuracy before {res['accuracy_before']:.4f}, after {res['accuracy_after']:.4f} "
        f"on {res['n_eval']} examples; eval.json and adapter/ in {out}")
    return 0


def _read_data(o: TrainOptions):
    """``(train Dataset, validation Dataset or None, G2P split or None)``."""
    if o.builtin:
        split = g2p.g2p_split(split_seed(o), o.test_size, g2p.G2P_VALIDATION)
        # Tokenise only the words the run will see (the full split is 124k words, ~1 min).
        n_words = len(split.train) if o.steps is None else min(len(split.train), o.steps * o.batch_size * o.grad_accum)
        return g2p.g2p_dataset(split.train[:n_words]), g2p.g2p_dataset(split.validation), split
    train_data = read_jsonl(o.data)
    val_data = read_jsonl(o.eval_data) if o.eval_data else None
    if val_data is not None and val_data.prompt_format != train_data.prompt_format:
        raise CLIError(f"--eval-data has shape {val_data.shape!r} but --data has shape {train_data.shape!r}")
    return train_data, val_data, None


def _model_with_lora(o: TrainOptions, d: Dist | None = None, device: torch.device | None = None):
    """The base model with the adapter injected, on ``device``: ``(LoadedModel, LoRAConfig, trainable, base
    parameters)``; under ``--fsdp`` loaded sharded (``fsdp_load``: only rank 0 reads the base), its layers split."""
    quiet_transformers()
    torch.manual_seed(o.seed)
    fsdp = d is not None and d.fsdp
    lm = fsdp_load.skeleton(load_base, o.model, d) if fsdp else load_base(o.model, o.quantize)
    if o.full:
        n = full.prepare(lm.model.to(device or "cpu"))
        return lm, None, n, n
    lcfg = o.lora_config(base_model_name_or_path=DEFAULT_HF_ID if lm.reference == DEFAULT_MODEL else lm.reference)
    inject(lm.model, lcfg)
    trainable, total = trainable_parameters(lm.model)
    if fsdp:
        fsdp_load.shard(lm.model, d)
    elif device is not None:
        lm.model.to(device)  # the base and the adapter; batches follow the model (devices.model_device)
    return lm, lcfg, trainable, total - trainable


def _evaluate(model, tok, data: Dataset, split, val_ex, label: str,
              num_beams: int = 1) -> tuple[dict | None, list | None]:
    """Test exact match / PER (built-in task; greedy, or beam search with ``num_beams``) or validation
    loss (user data) as ``label`` reports it."""
    t = time.perf_counter()
    if split is not None:
        res, preds = evaluate_g2p(model, tok, split.test, data.prompt_format, num_beams=num_beams)
        words = f" on {res['words']} test words" if label == "before" else ""
        how = f", {num_beams} beams" if num_beams > 1 else (", greedy" if label == "before" else "")
        print(f"{label + ':':<7} exact match {pct(res['exact_match'])}, PER {res['per']:.3f}{words} "
              f"({time.perf_counter() - t:.0f} s{how})", flush=True)
        return res, preds
    if not val_ex:
        return None, None
    loss, n = mean_loss(model, val_ex, tok.pad_token_id)
    print(f"{label + ':':<7} eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}", flush=True)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": n}, None


def _fit(model, task: loop.Task, tcfg: loop.TrainConfig, o: TrainOptions, out: Path,
         ck: Checkpointing, d: Dist | None) -> tuple[dict, list[dict]]:
    """``loop.train`` with each step's record appended to ``out/metrics.jsonl`` (by rank 0): (summary, records).
    A resumed run rewrites ``metrics.jsonl`` from the checkpoint's records, then appends its own."""
    main = d is None or d.main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if o.gradient_checkpointing:
            print("gradient checkpointing: activations recomputed in the backward" + (
                " (--quantize's default; --no-gradient-checkpointing keeps them)" if o.quantize else "")
                + ("; freed blocks of 1 MiB or more returned to the OS" if allocator.large_blocks_returned() else ""))
    history: list[dict] = []
    with RecordLog(out / "metrics.jsonl") if main else nullcontext() as metrics, \
            loop.checkpointed(model, o.gradient_checkpointing):

        def on_log(rec: dict) -> None:
            history.append(rec)
            if metrics is not None:
                metrics.write(rec)

        summary = loop.train(model, task, tcfg, on_log=on_log, progress=o.progress, checkpoints=ck, dist=d)
    first, last = summary["resumed_from"] + 1, summary["steps"]
    done = f"{last} steps" if first == 1 else f"steps {first}-{last}" if first <= last else "no steps (resumed at the last)"
    skipped = f" ({summary['skipped_steps']} non-finite steps skipped)" if summary["skipped_steps"] else ""
    print(f"trained {done}, {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s: "
          f"{summary['tokens_per_s']:.0f} tokens/s{skipped}", flush=True)
    return summary, history


def _metadata(o: TrainOptions, lm, data: Dataset, n_steps: int, trainable: int, base_params: int, device: str) -> dict:
    """The adapter's ``lorakit.json``: base model, prompt format, task, sizes, settings, device (cpu, cuda)."""
    meta = {
        "base_model": lm.reference,
        "prompt_format": data.prompt_format,
        "data_shape": data.shape,
        "task": g2p.G2P_TASK if o.builtin else None,
        "max_length": o.max_length,
        "quantize": o.quantize,  # eval / generate / merge rebuild the same base
        "base_parameters": base_params,
        "trainable_parameters": trainable,
        "train": {k: getattr(o, k) for k in ("data", "epochs", "batch_size", "grad_accum", "lr", "warmup", "seed",
                                             "nproc")}
        | {"steps": n_steps, "device": device},
    }
    if o.builtin:
        meta["g2p"] = {"seed": split_seed(o), "test_size": o.test_size, "validation_size": g2p.G2P_VALIDATION,
                       "num_beams": o.num_beams}
    return meta


def _checkpointing(o: TrainOptions, out: Path, run: dict, resume: tuple[Path, dict] | None,
                   main: bool = True, world: int = 1) -> Checkpointing:
    """How this run checkpoints: every ``--save-every`` steps, and on SIGINT / SIGTERM.

    Raises:
        CheckpointError: resuming with changed data or base model files (changed keys listed), or on
            another number of processes (``world``; refused before any file of the run is touched).
    """
    if resume is not None:
        was = resume[1]["config"].get("world_size", 1)
        if was != world:
            raise CheckpointError(f"{str(resume[0])!r} was written by {was} processes; resume it on as many: "
                                  f"world_size ({was} -> {world})")
        changed = checkpoint.changed_keys(resume[1]["config"]["run"], run)
        if changed:
            raise CheckpointError(f"--resume {str(out)!r}: the run's files changed since {str(resume[0])!r}: "
                                  f"{', '.join(changed)}")
    elif o.overwrite and main:
        for _, old in checkpoint.steps_in(out):  # an earlier run's, which --overwrite replaces
            shutil.rmtree(old)
    if out.is_dir() and main:
        checkpoint.remove_partial(out)
    changeable = {k: v for k, v in dataclasses.asdict(o).items() if k not in run["options"]}
    return Checkpointing(out, o.save_every, o.keep, run, resume=resume is not None, extra={"options": changeable})


def _save_adapter(model, out: Path, meta: dict, tensors: dict | None = None) -> None:
    """The trained adapter (``tensors``: its whole values, gathered from FSDP shards) and ``lorakit.json``,
    each file atomically.

    Raises:
        SaveError: a write failed (the folder named; files already there are left as they were).
    """
    new = [f for f in (out / "adapter_model.safetensors", out / "adapter_config.json", out / "lorakit.json")
           if not f.exists()]
    try:
        save_adapter(model, out, tensors=tensors)  # the weights first: a failure there leaves every file as it was
        write_metadata(out, meta)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        for f in new:  # no half adapter where there was none
            f.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise SaveError(f"could not write the adapter to {str(out)!r}: {reason}") from None


def train_lm(o: TrainOptions, t_start: float, resume: tuple[Path, dict] | None = None) -> int:
    """The causal-LM job (see the module docstring). Returns 0; the adapter is written only after
    training, checkpoints while it runs (``resume``: the checkpoint to continue from and its state).
    Under torchrun every rank trains its share; rank 0 alone evaluates, prints and writes."""
    if o.fsdp and not distributed.launched():
        world = resume[1]["config"].get("world_size") if resume is not None else None
        raise CLIError("--fsdp shards the model across processes: " + (
            f"the run was checkpointed by {world} processes; resume it on as many, world_size ({world} -> 1)"
            if world else "add --nproc N (N > 1) or run under torchrun"))
    if o.quantize and distributed.launched():
        raise CLIError(QUANTIZE_ONE_PROCESS)
    d = distributed.setup(fsdp=o.fsdp, device=o.device)
    quiet = open(os.devnull, "w") if d is not None and not d.main else None
    try:
        with redirect_stdout(quiet) if quiet else nullcontext(), redirect_stderr(quiet) if quiet else nullcontext():
            return _train_lm(o, t_start, resume, d)
    finally:
        distributed.teardown(d)
        if quiet:
            quiet.close()


def _train_lm(o: TrainOptions, t_start: float, resume: tuple[Path, dict] | None, d: Dist | None) -> int:
    main = d is None or d.main
    # a bad --device fails before the data is read
    device = d.device if d is not None else devices.select(o.device, INT8_CPU_ONLY if o.quantize == "int8" else None)
    out = output_folder(o, "g2p" if o.builtin else "lora")
    run = _run_config(o)
    ck = _checkpointing(o, out, run, resume, main, d.world if d is not None else 1)
    train_data, val_data, split = _read_data(o)
    if o.gradient_checkpointing:  # memory over speed: large freed blocks go back to the OS (the load's too)
        allocator.return_large_blocks()
    if o.bf16 and not devices.bf16_supported(device):
        log(f"lorakit: note: {devices.NO_BF16[device.type]}; training in float32")
        o = dataclasses.replace(o, bf16=False)
    lm, lcfg, trainable, base_params = _model_with_lora(o, d, device)
    model, tok = lm.model, lm.tokenizer
    print(f"output: {out}\ndevice: {devices.describe(device, d.world if d is not None else 1)}")
    if o.full:
        print(f"full fine-tuning: all {trainable:,} parameters trainable (LoRA options ignored)", flush=True)
    else:
        print(f"LoRA r={lcfg.r} alpha={lcfg.lora_alpha:g} on {lcfg.target_modules}: "
              f"{trainable:,} trainable parameters ({pct(trainable / base_params)} of {base_params:,})", flush=True)
    train_ex = tokenize_dataset(tok, train_data, o.max_length)
    val_ex = tokenize_dataset(tok, val_data, o.max_length) if val_data is not None else None
    tcfg = o.train_config()
    world = d.world if d is not None else 1
    n_steps = tcfg.total_steps(len(train_ex), world)
    ranks = f" on each of {world} processes ({'FSDP' if o.fsdp else 'DDP'})" if d is not None else ""
    print(f"data: {len(train_ex):,} training examples ({train_data.shape}), {n_steps} steps of "
          f"{tcfg.batch_size}x{tcfg.grad_accum}{ranks}, max length {o.max_length}", flush=True)
    results: dict = {}
    if resume is not None:  # evaluated before the interrupted run's first step
        results["before"], before_preds = resume[1]["extra"]["before"], resume[1]["extra"]["before_preds"]
    elif main or o.fsdp:  # a sharded model evaluates on every rank together
        with disable_adapters(model) if not o.full else nullcontext():  # the base model (B = 0: same, slower)
            results["before"], before_preds = _evaluate(model, tok, train_data, split, val_ex, "before")
    else:
        results["before"], before_preds = None, None
    if d is not None:
        d.barrier()  # the other ranks wait for rank 0's evaluation
    ck.extra |= {"before": results["before"], "before_preds": before_preds}
    summary, history = _fit(model, lm_task(train_ex, tok.pad_token_id, tcfg, val_ex), tcfg, o, out,
                            None if o.full else ck, d)
    meta = _metadata(o, lm, train_data, n_steps, trainable, base_params, device.type)
    meta["train"] |= {k: summary.get(k) for k in ("compile", "compiled_from_step")}  # whether the blocks ran compiled
    # FSDP: all ranks gather the adapter's tensors, one at a time (not the layers); rank 0 writes
    whole = fsdp_state.gather_adapters(model, ["default"]) if o.fsdp else None
    if main and o.full:
        print(f"model written to {full.save(model, tok, out, meta)}")
    elif main:
        _save_adapter(model, out, meta, whole["default"] if whole else None)
    if d is not None:
        d.barrier()
    if main or o.fsdp:  # a sharded model evaluates on every rank together; rank 0 writes
        _finish(model, tok, out, (train_data, split, val_ex), results, before_preds, summary, history, t_start,
                merged=not (o.fsdp or o.full or o.quantize is not None), write=main,  # a quantised base cannot merge
                num_beams=o.num_beams)
    if d is not None:
        d.barrier()
    return 0


def _finish(model, tok, out: Path, data: tuple, results: dict, before_preds, summary: dict,
            history: list[dict], t_start: float, merged: bool = True, write: bool = True, num_beams: int = 1) -> None:
    """After training: the evaluation after (merged, unless the model is sharded), ``eval.json`` and
    ``loss.png`` (``write``)."""
    train_data, split, val_ex = data
    if merged:
        merge(model)  # faster decoding; unmerge restores the weights exactly
    try:
        results["after"], preds = _evaluate(model, tok, train_data, split, val_ex, "after", num_beams)
    finally:
        if merged:
            unmerge(model)
    if not write:
        return
    if split is not None:
        results["examples"] = [
            {"word": w, "reference": [" ".join(p) for p in refs], "before": b, "after": a}
            for (w, refs), b, a in list(zip(split.test, before_preds, preds))[:10]
        ]
    results = {k: v for k, v in results.items() if v is not None}
    results["train"] = summary
    results["wall_seconds"] = time.perf_counter() - t_start
    write_json(out / "eval.json", results)
    plot_losses(history, out / "loss.png", summary.get("val_loss_start"))
    saved = "the model" if (out / full.MODEL_DIR).is_dir() else "adapter"
    print(f"saved {saved}, metrics.jsonl, eval.json, loss.png to {out} ({time.perf_counter() - t_start:.0f} s total)")
