"""Language-model training data: JSONL record shapes, prompt formats, and tokenisation with
completion-only labels (the built-in task's records come from ``g2p``).

Record shapes (detected per file from the first record; every record must have it):

- ``{"prompt": str, "completion": str}``: loss on the completion (plain concatenation).
- ``{"messages": [{"role": str, "content": str}, ...]}``: rendered with the tokenizer's chat
  template, loss on assistant turns only.
- ``{"instruction": str, "input": str (optional), "output": str}``: Alpaca; the Alpaca prompt
  template, loss on the output.
- ``{"text": str}``: plain language modelling, loss on every token.

Every example is a list of ``(text, trained)`` segments; each segment is tokenised on its own
(so the prompt is tokenised exactly as at generation time) and labelled with its token ids
when trained, else with ``IGNORE`` (-100).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from lorakit.errors import DataError

from .jsonl import read_objects

IGNORE = -100  # label of tokens that never count in the loss (PyTorch cross_entropy ignore_index)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)

# how a bare prompt is rendered at generation time, per record shape (stored with the adapter)
PROMPT_FORMATS = {
    "prompt-completion": {"type": "plain"},
    "messages": {"type": "chat", "system": None},
    "alpaca": {"type": "alpaca"},
    "text": {"type": "plain"},
}

SHAPES = {
    "prompt-completion": ({"prompt", "completion"}, set()),
    "messages": ({"messages"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
    "text": ({"text"}, set()),
}


@dataclass
class Example:
    """One tokenised training example.

    Attributes:
        input_ids: token ids, length T <= max_length.
        labels: same length; the token id where the token is trained, ``IGNORE`` elsewhere.
    """

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        """Tokens that are predicted in the loss (labels shifted by one: the first never is)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class Dataset:
    """Records of one file (or the built-in task), all of one shape.

    Attributes:
        shape: one of ``SHAPES``' keys, or ``"g2p"``.
        records: the parsed JSON objects (for g2p: ``{"prompt": word, "completion": phones}``).
        prompt_format: how a bare prompt is rendered at generation time (stored with the adapter).
        source: file name for messages.
        line_numbers: 1-based line of each record in the file (for error messages).
    """

    shape: str
    records: list[dict]
    prompt_format: dict
    source: str = "<built-in>"
    line_numbers: list[int] = field(default_factory=list)


# --- JSONL -----------------------------------------------------------------------------------


def detect_shape(record: dict) -> str | None:
    """The record shape of one JSON object, or None if it matches none.

    A record matches a shape when it has all the shape's required keys and no keys beyond
    the required and optional ones.
    """
    if not isinstance(record, dict):
        return None
    keys = set(record)
    for name, (required, optional) in SHAPES.items():
        if required <= keys and keys <= required | optional:
            return name
    return None


_SHAPE_KEYS = {"prompt-completion": "{prompt, completion}", "messages": "{messages}",
               "alpaca": "{instruction, input?, output}", "text": "{text}"}
_EXPECTED = "expected one of " + ", ".join(_SHAPE_KEYS.values())
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


def json_type(value) -> str:
    """The JSON name of a parsed value's type (``object``, ``array``, ``string``, ``number``, ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _shown(value) -> str:
    """``value`` for a message: its JSON type and (shortened) text, e.g. ``number 3`` or ``null``."""
    return "null" if value is None else f"{json_type(value)} {json.dumps(value)[:40]}"


def _shape_error(rec, where: str, shape: str | None) -> DataError:
    """The error for a record that matches no shape: not an object, a partial record (its missing
    keys named; the file's shape is tried first), or unknown keys."""
    if not isinstance(rec, dict):
        return DataError(f"{where}: a JSON {json_type(rec)}, not an object; each line must be one record, {_EXPECTED}")
    keys = set(rec)
    for name in ([shape] if shape else []) + list(SHAPES):
        required, optional = SHAPES[name]
        if keys & required and keys <= required | optional:
            missing = ", ".join(repr(k) for k in sorted(required - keys))
            return DataError(f"{where}: record lacks {missing} (shape {name!r}: {_SHAPE_KEYS[name]})")
    return DataError(f"{where}: unknown record shape {sorted(keys)}; {_EXPECTED}")


def _check_record(rec: dict, shape: str, where: str) -> None:
    def need_str(key, nonempty=False):
        v = rec.get(key)
        if not isinstance(v, str):
            raise DataError(f"{where}: {key!r} must be a string, got {_shown(v)}")
        if nonempty and not v:
            raise DataError(f"{where}: {key!r} is empty")

    if shape == "prompt-completion":
        need_str("prompt"), need_str("completion", nonempty=True)
    elif shape == "alpaca":
        need_str("instruction", nonempty=True), need_str("output", nonempty=True)
        if "input" in rec:
            need_str("input")
    elif shape == "text":
        need_str("text", nonempty=True)
    elif shape == "messages":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list, got {_shown(msgs)}")
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, so nothing to train on")


def read_jsonl(path: str | os.PathLike) -> Dataset:
    """Read a JSONL file of one record shape (through ``jsonl.read_objects``).

    Raises:
        DataError: a missing file or a folder, invalid JSON, a line that is not an object, a record
            of an unknown or different shape or lacking a key, a field of the wrong type or empty,
            or no records at all (file and line named; see also ``jsonl.read_objects``).
    """
    records, lines, shape = [], [], None
    for lineno, rec in read_objects(path):
        where = f"{path}:{lineno}"
        s = detect_shape(rec)
        if s is None:
            raise _shape_error(rec, where, shape)
        if shape is None:
            shape = s
        elif s != shape:
            raise DataError(f"{where}: record has shape {s!r} but the file's first record has shape {shape!r}")
        _check_record(rec, s, where)
        records.append(rec)
        lines.append(lineno)
    if not records:
        raise DataError(f"data file {str(path)!r} holds no records")
    return Dataset(shape, records, dict(PROMPT_FORMATS[shape]), str(path), lines)


# --- prompt formats and tokenisation ---------------------------------------------------------


def render_prompt(tokenizer, prompt: str, fmt: dict) -> str:
    """The text a bare ``prompt`` becomes under prompt format ``fmt`` (generation prompt included).

    Formats: ``{"type": "plain"}`` (as is), ``{"type": "alpaca"}`` (prompt is the instruction),
    ``{"type": "chat", "system": str | None}`` (chat template with that system message, or the
    template's default when None).

    Raises:
        DataError: an unknown format, or chat format with a tokenizer without chat template.
    """
    kind = fmt.get("type")
    if kind == "plain":
        return prompt
    if kind == "alpaca":
        return _alpaca_prompt({"instruction": prompt})
    if kind == "chat":
        msgs = [{"role": "user", "content": prompt}]
        if fmt.get("system") is not None:
            msgs.insert(0, {"role": "system", "content": fmt["system"]})
        return _chat(tokenizer, msgs, generation_prompt=True)
    raise DataError(f"unknown prompt format {fmt!r}")


def render_messages(tokenizer, messages: list[dict], fmt: dict) -> str:
    """The text a chat request's ``messages`` become under prompt format ``fmt`` (generation
    prompt included). One user message renders exactly as ``render_prompt`` renders its content.

    Chat format: the chat template over all messages, with ``fmt``'s system message first when
    the messages bring none. Plain and alpaca formats take a single user message.

    Raises:
        DataError: several messages under a plain or alpaca format; no chat template.
    """
    if fmt.get("type") == "chat":
        msgs = [dict(m) for m in messages]
        if fmt.get("system") is not None and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": fmt["system"]})
        return _chat(tokenizer, msgs, generation_prompt=True)
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise DataError(f"this model's prompt format {fmt.get('type')!r} takes exactly one user message")
    return render_prompt(tokenizer, messages[0]["content"], fmt)


def _alpaca_prompt(rec: dict) -> str:
    inp = rec.get("input") or ""
    return ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if inp else "",
        instruction=rec["instruction"],
        input=f"### Input:\n{inp}\n\n" if inp else "",
    )


def _chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so 'messages' records cannot be rendered")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _eos(tokenizer) -> str:
    return tokenizer.eos_token or ""


def segments(tokenizer, rec: dict, shape: str, fmt: dict) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of one record; their concatenation is the full example text.

    Raises:
        DataError: a chat template that does not render conversations prefix-consistently
            (the assistant turns cannot then be located).
    """
    eos = _eos(tokenizer)
    if shape in ("prompt-completion", "g2p"):
        return [(render_prompt(tokenizer, rec["prompt"], fmt), False), (rec["completion"] + eos, True)]
    if shape == "alpaca":
        return [(_alpaca_prompt(rec), False), (rec["output"] + eos, True)]
    if shape == "text":
        return [(rec["text"] + eos, True)]
    if shape == "messages":
        msgs = rec["messages"]
        final = _chat(tokenizer, msgs, generation_prompt=False)
        out, pos = [], 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = _chat(tokenizer, msgs[:i], generation_prompt=True) if i else ""
            upto = _chat(tokenizer, msgs[: i + 1], generation_prompt=False)
            if not (upto.startswith(prefix) and final.startswith(upto) and len(prefix) >= pos):
                raise DataError("the chat template does not render conversations prefix by prefix")
            out += [(prefix[pos:], False), (upto[len(prefix):], True)]
            pos = len(upto)
        out.append((final[pos:], False))
        return [(t, trained) for t, trained in out if t]
    raise DataError(f"unknown record shape {shape!r}")


def _bos_prefix(tokenizer) -> list[int]:
    """The BOS id the tokenizer adds by itself (e.g. Llama 2), else nothing."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a").input_ids
    return [bos] if with_special and with_special[0] == bos else []


def tokenize_example(tokenizer, segs: list[tuple[str, bool]], max_length: int, where: str = "") -> Example:
    """Tokenise segments into an ``Example`` with completion-only labels.

    Each segment is tokenised separately without special tokens (chat-template special
    tokens in the text are still recognised); a BOS is prepended when the tokenizer adds
    one itself. Trained segments are truncated at ``max_length`` tokens.

    Raises:
        DataError: the untrained prefix before the first trained token is ``max_length``
            tokens or longer (nothing left to learn); ``where`` is put in the message.
    """
    ids = _bos_prefix(tokenizer)
    labels = [IGNORE] * len(ids)
    for text, trained in segs:
        t = tokenizer(text, add_special_tokens=False).input_ids
        ids += t
        labels += list(t) if trained else [IGNORE] * len(t)
    first = next((i for i, x in enumerate(labels) if x != IGNORE), None)
    if first is None or (first >= max_length) or (first == 0 and max_length < 2):
        n = first if first is not None else len(ids)
        raise DataError(f"{where + ': ' if where else ''}prompt is {n} tokens, which leaves no answer token "
                        f"within --max-length {max_length} (it needs more than {n})")
    return Example(ids[:max_length], labels[:max_length])


def tokenize_dataset(tokenizer, data: Dataset, max_length: int) -> list[Example]:
    """Tokenise every record of ``data``; examples with no trained token are dropped.

    Raises:
        DataError: see ``tokenize_example`` and ``segments`` (messages name the line).
    """
    out = []
    for i, rec in enumerate(data.records):
        where = f"{data.source}:{data.line_numbers[i]}" if data.line_numbers else f"{data.source} record {i + 1}"
        try:
            ex = tokenize_example(tokenizer, segments(tokenizer, rec, data.shape, data.prompt_format), max_length, where)
        except DataError as e:
            if str(e).startswith(where):
                raise
            raise DataError(f"{where}: {e}") from None
        if ex.n_label_tokens:
            out.append(ex)
    if not out:
        raise DataError(f"{data.source}: no example has a token to train on")
    return out
