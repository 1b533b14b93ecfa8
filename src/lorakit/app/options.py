"""``lorakit train`` options: one dataclass whose field defaults are the defaults, the command-line
flags generated from its fields, the YAML/JSON config file, and their validation.

Precedence: ``TrainOptions`` defaults < the task's own defaults (``task_defaults``) < config file
< command-line flags. Flags default to None (not given); config-file keys are field names
(``batch_size`` or ``batch-size``; ``no_progress`` too). Defaults that belong to the library are
read from it: r, alpha and dropout from ``LoRAConfig``, the optimisation settings from the
loop's ``TrainConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorakit import LoRAConfig
from lorakit.config import ALL_LINEAR
from lorakit.errors import CheckpointError, ConfigError, UsageError
from lorakit.durable import read_utf8
from lorakit.quantize import QUANT_TYPES

from . import classify, devices, g2p
from .checkpoint import changed_keys
from .loop import TrainConfig
from .models import DEFAULT_MODEL

# LoRA targets of the main job: every projection of a Llama-style block (LoRAConfig's own
# default is the four attention projections).
JOB_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
USER_MAX_LENGTH = 512  # tokens per example on user data
USER_EPOCHS = 1.0  # passes over user data when neither --steps nor --epochs is given
TASKS = ("g2p", "classify")
QUANTIZE_ONE_PROCESS = ("--quantize trains in one process: DDP / FSDP do not broadcast or shard bitsandbytes' "
                        "quantised weights; drop --nproc / --fsdp")
# bitsandbytes' int8 layers keep their quantised weight where it was quantised (the CPU): auto stays there
INT8_CPU_ONLY = "--quantize int8 quantises on the CPU and its weights stay there; on a GPU use --quantize nf4"
NONFINITE = ("error", "skip")
# options a resumed run may change: they do not change what is trained (the others are hashed
# into each checkpoint, and a resume that changes them is refused)
RESUME_MAY_CHANGE = frozenset({"output", "overwrite", "progress", "save_every", "keep", "resume", "on_nonfinite",
                               "gradient_checkpointing", "nproc", "compile", "device"})  # the loop checks the number of processes


def _default(cls, name: str):
    """The default of dataclass field ``name`` of ``cls`` (the library's, not repeated here)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _opt(default, help: str, type=None, flag: str | None = None, group: str | None = None, negatable: bool = False):
    """A ``TrainOptions`` field: its default, and how its flag reads (``type`` None: a switch; ``negatable``:
    ``--x`` and ``--no-x``, for a switch whose default depends on other options, see ``task_defaults``)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**kw, metadata={"help": help, "type": type, "flag": flag, "group": group, "negatable": negatable})


@dataclass
class TrainOptions:
    """Everything ``lorakit train`` takes; each field is a ``--flag`` and a config-file key."""

    task: str = _opt("g2p", "g2p: causal LM on --data or the built-in CMUdict task; classify: an encoder with a "
                     "trained head on JSONL {text, label} or the built-in CMUdict syllable-count task", type=str)
    model: str = _opt(DEFAULT_MODEL, "transformers folder, cached Hugging Face id, .gguf file, or 'default'", type=str)
    data: str | None = _opt(None, "training JSONL (default: the built-in CMUdict task)", type=str)
    eval_data: str | None = _opt(None, "validation JSONL for loss/perplexity before and after", type=str)
    output: str | None = _opt(None, "output folder (default: runs/<task>-<timestamp>, printed)", type=str)
    r: int = _opt(_default(LoRAConfig, "r"), "LoRA rank", type=int)
    lora_alpha: float = _opt(_default(LoRAConfig, "lora_alpha"), "LoRA alpha", type=float)
    lora_dropout: float = _opt(_default(LoRAConfig, "lora_dropout"), "dropout on the LoRA input", type=float)
    target_modules: list[str] | str = _opt(JOB_TARGETS, "comma-separated module names, or 'all-linear'", type=str)
    rslora: bool = _opt(False, "scale by alpha/sqrt(r)")
    dora: bool = _opt(False, "DoRA: a trained magnitude per output feature on top of LoRA (Liu et al. 2024)")
    full: bool = _opt(False, "full fine-tuning instead of LoRA (every parameter trained; the model is written to "
                      "OUTPUT/model): the baseline LoRA is compared with")
    steps: int | None = _opt(None, f"optimizer steps (default {g2p.G2P_STEPS} on the built-in task)", type=int,
                             group="length")
    epochs: float | None = _opt(None, f"passes over the data (default {USER_EPOCHS:g} on user data)", type=float,
                                group="length")
    batch_size: int = _opt(_default(TrainConfig, "batch_size"), "examples per micro-batch", type=int)
    grad_accum: int = _opt(_default(TrainConfig, "grad_accum"), "micro-batches per step", type=int)
    lr: float = _opt(_default(TrainConfig, "lr"), "peak learning rate", type=float)
    warmup: int = _opt(_default(TrainConfig, "warmup"), "warmup steps", type=int)
    max_length: int | None = _opt(None, f"tokens per example (default {g2p.G2P_MAX_LENGTH} built-in, "
                                  f"{USER_MAX_LENGTH} user data)", type=int)
    seed: int = _opt(_default(TrainConfig, "seed"), "seed for LoRA init, split and batch order", type=int)
    split_seed: int | None = _opt(None, "built-in task: seed of the train/validation/test split alone (default "
                                  "--seed): vary --seed with it fixed to compare training seeds on the same words",
                                  type=int)
    quantize: str | None = _opt(None, "quantise the frozen base's linear layers (output head and embeddings kept): "
                                "nf4 (4-bit NormalFloat, QLoRA) or int8; adapters stay float32; recorded so eval, "
                                "generate and merge rebuild the same base (merge writes a dequantised, full-precision "
                                "checkpoint); needs bitsandbytes", type=str)
    bf16: bool = _opt(False, "bfloat16 autocast where the device supports it (AVX512-BF16 or AMX CPUs, CUDA compute capability 8.0+)")
    gradient_checkpointing: bool = _opt(False, "recompute each block's activations in the backward instead of keeping "
                                        "them (default: on with --quantize, as QLoRA and PEFT's "
                                        "prepare_model_for_kbit_training do; off with --no-gradient-checkpointing)",
                                        negatable=True)
    compile: bool | None = _opt(None, "torch.compile the transformer blocks: steps about 1.1x as fast after a 15-75 s "
                                "first step (default: decided after the first steps from their time and the steps "
                                "left, and printed; --no-compile: never)", negatable=True)
    eval_every: int = _opt(_default(TrainConfig, "eval_every"), "validation loss every N steps (0 = never)", type=int)
    test_size: int = _opt(200, "built-in task: test words", type=int)
    num_beams: int = _opt(4, "built-in task: beam search width of the test evaluation after training (1: greedy; "
                          "chosen on the validation words, benchmarks/decoding.py); the untrained base's is greedy",
                          type=int)
    save_every: int = _opt(0, "write a checkpoint (OUTPUT/checkpoint-STEP) every N steps (0 = only on "
                           "SIGINT/SIGTERM)", type=int)
    keep: int | None = _opt(None, "keep only the newest K checkpoints (default: all)", type=int)
    resume: str | None = _opt(None, "continue the run in this output folder from its newest complete checkpoint "
                              "(options not given are the run's own)", type=str)
    on_nonfinite: str = _opt("error", "a NaN/inf loss or gradient: 'error' stops naming the step and parameter, "
                             "'skip' drops that step's update", type=str)
    nproc: int = _opt(1, "train on N processes: starts torchrun --standalone --nproc_per_node N (DDP; gloo on "
                      "CPU, nccl on GPU); each takes --batch-size examples per micro-batch", type=int)
    fsdp: bool = _opt(False, "with --nproc or torchrun: shard each decoder layer, frozen base included (FSDP2), "
                      "for bases that do not fit one process; --save-every / --resume as with DDP; on the CPU only "
                      "(--device auto then picks it)")
    device: str = _opt("auto", "where to train: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or "
                       "cuda:N; under torchrun each process takes cuda:LOCAL_RANK (nccl) or the CPU (gloo)", type=str)
    overwrite: bool = _opt(False, "reuse an output folder holding an adapter or checkpoints")
    progress: bool = _opt(True, "no progress bar", flag="--no-progress")

    @property
    def builtin(self) -> bool:
        """True for the built-in CMUdict task (no ``--data``)."""
        return self.data is None

    def lora_config(self, **kw) -> LoRAConfig:
        """The adapter's ``LoRAConfig`` from these options (``kw``: more fields, e.g. the base model)."""
        return LoRAConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          use_rslora=bool(self.rslora), use_dora=bool(self.dora), target_modules=self.target_modules or [], **kw)

    def train_config(self, **kw) -> TrainConfig:
        """The loop's ``TrainConfig`` from these options (``kw``: overrides)."""
        return TrainConfig(**{"steps": self.steps, "epochs": self.epochs, "batch_size": self.batch_size,
                              "grad_accum": self.grad_accum, "lr": float(self.lr), "warmup": self.warmup,
                              "seed": self.seed, "bf16": bool(self.bf16), "eval_every": self.eval_every,
                              "compile": "auto" if self.compile is None else bool(self.compile),
                              "on_nonfinite": self.on_nonfinite, **kw})


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}


def split_seed(o: TrainOptions) -> int:
    """The seed of the built-in task's word split: ``--split-seed``, else ``--seed``."""
    return o.seed if o.split_seed is None else o.split_seed


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``TrainOptions`` field (default None = not given), and ``--config``."""
    p.add_argument("--config", help="YAML or JSON file with option names as keys (flags override it)")
    groups = {"length": p.add_mutually_exclusive_group()}
    for f in FIELDS.values():
        m = f.metadata
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if m["negatable"]:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=m["help"])
            continue
        target = groups[m["group"]] if m["group"] else p
        if m["type"] is None:  # a switch: sets the opposite of the default
            target.add_argument(flag, dest=f.name, action="store_const", const=not f.default, help=m["help"])
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else repr(default) if isinstance(default, str) else default
        help = m["help"] if default is None else f"{m['help']} (default {shown})"
        choices = {"task": TASKS, "on_nonfinite": NONFINITE, "quantize": QUANT_TYPES}.get(f.name)
        target.add_argument(flag, dest=f.name, type=m["type"], choices=choices, help=help)


def task_defaults(task: str, values: dict) -> dict:
    """Defaults of ``task`` that replace ``TrainOptions``' (given ``values`` from file and flags)."""
    length_given = "steps" in values or "epochs" in values
    recipe = {"gradient_checkpointing": values.get("quantize") is not None}  # QLoRA's memory recipe
    if task == "classify":
        d = {"epochs": classify.EPOCHS, "batch_size": classify.BATCH_SIZE, "max_length": classify.MAX_LENGTH,
             "target_modules": list(classify.TARGETS), **recipe}
        return {k: v for k, v in d.items() if not (k == "epochs" and length_given)}
    builtin = values.get("data") is None
    d = {"max_length": g2p.G2P_MAX_LENGTH if builtin else USER_MAX_LENGTH, **recipe}
    if not length_given:
        d.update({"steps": g2p.G2P_STEPS} if builtin else {"epochs": USER_EPOCHS})
    if builtin and "r" not in values and "lora_alpha" not in values:  # the job's rank, with its alpha
        d.update({"r": g2p.G2P_R, "lora_alpha": g2p.G2P_ALPHA})
    return d


def read_config_file(path: str) -> dict:
    """Options from a YAML or JSON file (keys are field names, ``-`` or ``_``).

    Raises:
        UsageError: no such file.
        UsageError: not UTF-8, not valid YAML/JSON, not a mapping, or an unknown key.
    """
    import yaml

    f = Path(path)
    if not f.is_file():
        raise UsageError(f"config file {path!r} does not exist")
    kind = "JSON" if f.suffix == ".json" else "YAML"
    try:
        text = read_utf8(f, UsageError)
        d = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"config file {path!r} is not valid {kind}: {e}".replace("\n", " ")) from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option names to values")
    out, spelt = {}, {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key == "no_progress":
            key, v = "progress", not v
        if key not in FIELDS:
            raise UsageError(f"config file {path!r}: unknown option {k!r}")
        if key in spelt:
            raise UsageError(f"config file {path!r} sets {key!r} twice, as {spelt[key]!r} and {k!r}; keep one")
        out[key], spelt[key] = v, k
    return out


def train_options(args: argparse.Namespace) -> tuple[TrainOptions, frozenset[str]]:
    """Merge defaults < task defaults < config file < flags, validate, and name the options given.

    Returns:
        ``(options, given)``: ``given`` holds the fields set by the config file or a flag.

    Raises:
        UsageError: an unknown config key or an invalid value (named).
        UsageError: the config file does not exist.
    """
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    for a, b in (("steps", "epochs"), ("epochs", "steps")):
        if a in flags:  # a flag replaces the file's --steps/--epochs choice
            values.pop(b, None)
    values.update(flags)
    task = values.get("task", _default(TrainOptions, "task"))
    opts = TrainOptions(**{**task_defaults(task, values), **values})
    validate(opts, frozenset(values))
    return opts, frozenset(values)


def validate(o: TrainOptions, given: frozenset[str] = frozenset()) -> None:
    """Check every option, in place (numbers read from YAML strings, target modules split).

    Raises:
        UsageError: the first invalid option, named as its flag.
    """
    if o.task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {o.task!r}")
    if o.on_nonfinite not in NONFINITE:
        raise UsageError(f"--on-nonfinite must be one of {', '.join(NONFINITE)}, got {o.on_nonfinite!r}")
    if not (o.compile is None or o.compile is True or o.compile is False):  # a config file's value
        if str(o.compile).strip().lower() != "auto":
            raise UsageError(f"--compile must be the boolean true or false (unquoted in a config file) or the "
                             f"string auto (the default), got {type(o.compile).__name__} {o.compile!r}")
        o.compile = None
    o.device = devices.check_spec(o.device)
    if o.quantize is not None and o.quantize not in QUANT_TYPES:
        raise UsageError(f"--quantize must be one of {', '.join(QUANT_TYPES)}, got {o.quantize!r}")
    _check_numbers(o)
    if o.quantize is not None and (o.fsdp or o.nproc > 1):
        raise UsageError(QUANTIZE_ONE_PROCESS)
    if o.quantize is not None and o.dora:
        raise UsageError("--dora needs the dense base weight (DoRA's column norm); it does not combine with --quantize")
    for key in ("data", "eval_data", "model"):  # absolute: a resume may start in another folder
        v = getattr(o, key)
        if isinstance(v, str) and (key != "model" or Path(v).exists()):
            setattr(o, key, str(Path(v).absolute()))
    tm = o.target_modules
    if isinstance(tm, str):
        o.target_modules = ALL_LINEAR if tm.strip() == ALL_LINEAR else [s.strip() for s in tm.split(",") if s.strip()]
    try:  # built here so that bad LoRA settings fail before any model is loaded
        o.lora_config()
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if o.steps is not None and o.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if o.max_length is not None and o.max_length < 2:
        raise UsageError("--max-length must be >= 2")
    if o.resume is not None and o.output is not None and Path(o.output) != Path(o.resume):
        raise UsageError(f"--output {o.output!r} and --resume {o.resume!r} differ; a resumed run writes to its "
                         "own folder")
    if o.task == "classify":
        _check_classify(o, given)
    elif not o.builtin and o.split_seed is not None:
        raise UsageError("--split-seed splits the built-in task's words; --data brings its own split")
    elif o.builtin and o.eval_data is not None and o.resume is None:  # a resumed run's --data is the run's
        raise UsageError("--eval-data needs --data (the built-in task has its own validation split)")


def _check_numbers(o: TrainOptions) -> None:
    for key, low in (("batch_size", 1), ("grad_accum", 1), ("steps", 1), ("max_length", 1), ("test_size", 1),
                     ("num_beams", 1), ("warmup", 0), ("eval_every", 0), ("seed", 0), ("split_seed", 0),
                     ("save_every", 0), ("keep", 1), ("nproc", 1)):
        v = getattr(o, key)
        if (v is not None or (low == 0 and key != "split_seed")) and (isinstance(v, bool) or not isinstance(v, int)
                                                                     or v < low):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    for key in ("lr", "epochs", "lora_alpha", "lora_dropout"):
        v = getattr(o, key)
        if isinstance(v, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                setattr(o, key, float(v))
            except ValueError:
                raise UsageError(f"--{key.replace('_', '-')} must be a number, got {v!r}") from None
    for key in ("lr", "epochs"):
        v = getattr(o, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise UsageError(f"--{key} must be a finite number > 0, got {v!r}")


def _check_classify(o: TrainOptions, given: frozenset[str]) -> None:
    refused = sorted(given - classify.OPTIONS - {"task", "model", "output", "overwrite", "progress"})
    if refused:
        raise UsageError(f"--task classify does not take --{refused[0].replace('_', '-')}")
    if o.epochs is not None and not float(o.epochs).is_integer():
        raise UsageError(f"--epochs must be a whole number for --task classify, got {o.epochs!r}")


def run_options(o: TrainOptions) -> dict:
    """The options a checkpoint is bound to (all but ``RESUME_MAY_CHANGE``), as JSON values."""
    return {k: v for k, v in dataclasses.asdict(o).items() if k not in RESUME_MAY_CHANGE}


def resumed_options(o: TrainOptions, given: frozenset[str], run: dict, changeable: dict) -> TrainOptions:
    """The options of ``--resume``: the checkpointed run's (``run``: ``run_options``, ``changeable``:
    the rest), with the changeable ones given now.

    Raises:
        CheckpointError: an option given now differs from the run's (each changed key listed).
    """
    now = run_options(o)
    asked = given & set(now)
    changed = changed_keys({k: run.get(k) for k in asked}, {k: now[k] for k in asked})
    if changed:
        raise CheckpointError(f"--resume {o.resume!r}: the run was trained with other options; changed: "
                              f"{', '.join(changed)} (resume with the run's own options, or start a new run)")
    keep_now = {k: getattr(o, k) for k in RESUME_MAY_CHANGE if k in given}
    return TrainOptions(**{**changeable, **run, **keep_now, "resume": o.resume, "output": o.resume})
