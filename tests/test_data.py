"""Record shapes, JSONL errors, completion-only labels, batching, the CMUdict split."""

import random

import pytest

from _tiny import tiny_tokenizer, write_jsonl
from lorakit.app import batches as B
from lorakit.app import data as D
from lorakit.app import g2p
from lorakit.app.data import IGNORE
from lorakit.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    "rec, shape",
    [
        ({"prompt": "a", "completion": "b"}, "prompt-completion"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
        ({"text": "t"}, "text"),
        ({"prompt": "a"}, None),
        ({"prompt": "a", "completion": "b", "extra": 1}, None),
        ([1, 2], None),
    ],
)
def test_detect_shape(rec, shape):
    assert D.detect_shape(rec) == shape


def test_read_each_shape(tmp_path):
    cases = {
        "prompt-completion": {"prompt": "a", "completion": "b"},
        "messages": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "alpaca": {"instruction": "i", "output": "o"},
        "text": {"text": "t"},
    }
    for shape, rec in cases.items():
        ds = D.read_jsonl(write_jsonl(tmp_path / f"{shape}.jsonl", [rec, rec]))
        assert ds.shape == shape and len(ds.records) == 2 and ds.line_numbers == [1, 2]


def test_bad_json_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        D.read_jsonl(f)


def test_unknown_mixed_empty_missing(tmp_path):
    with pytest.raises(DataError, match=r":1: unknown record shape \['foo'\]"):
        D.read_jsonl(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))
    with pytest.raises(DataError, match=r":2: record has shape 'text'"):
        D.read_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "t"}]))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        D.read_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="nope.jsonl' does not exist"):
        D.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        D.read_jsonl(tmp_path)
    with pytest.raises(DataError, match=r":1: 'completion' must be a string"):
        D.read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": 3}]))


def test_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'.encode())
    ds = D.read_jsonl(path)
    assert ds.shape == "prompt-completion" and [r["prompt"] for r in ds.records] == ["a", "c"]


def _labelled_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_prompt_completion_labels(tok):
    ds = D.Dataset("prompt-completion", [{"prompt": "hello", "completion": " HH AH0"}], {"type": "plain"})
    (ex,) = D.tokenize_dataset(tok, ds, 64)
    p = tok("hello", add_special_tokens=False).input_ids
    c = tok(" HH AH0<|im_end|>", add_special_tokens=False).input_ids
    assert ex.input_ids == p + c  # prompt tokenised alone, as at generation time
    assert ex.labels == [IGNORE] * len(p) + c  # prompt tokens never count in the loss
    assert ex.n_label_tokens == len(c)


def test_messages_labels_assistant_only(tok):
    rec = {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "cat"},
        {"role": "assistant", "content": "K AE1 T"}, {"role": "user", "content": "dog"},
        {"role": "assistant", "content": "D AO1 G"},
    ]}
    ds = D.Dataset("messages", [rec], {"type": "chat", "system": None})
    (ex,) = D.tokenize_dataset(tok, ds, 200)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert _labelled_text(tok, ex) == "K AE1 T<|im_end|>\nD AO1 G<|im_end|>\n"


def test_alpaca_and_text(tok):
    ds = D.Dataset("alpaca", [{"instruction": "Say", "input": "cat", "output": "K AE1 T"}], {"type": "alpaca"})
    (ex,) = D.tokenize_dataset(tok, ds, 200)
    text = tok.decode(ex.input_ids)
    assert "### Instruction:\nSay\n\n### Input:\ncat\n\n### Response:\n" in text
    assert _labelled_text(tok, ex) == "K AE1 T<|im_end|>"
    (ex,) = D.tokenize_dataset(tok, D.Dataset("text", [{"text": "cat dog"}], {"type": "plain"}), 64)
    assert ex.labels == ex.input_ids  # plain language modelling: every token


def test_max_length(tok):
    ds = D.Dataset("prompt-completion", [{"prompt": "hello world", "completion": " K AE1 T"}], {"type": "plain"},
                   source="f.jsonl", line_numbers=[7])
    n_prompt = len(tok("hello world", add_special_tokens=False).input_ids)
    with pytest.raises(DataError, match=rf"f.jsonl:7: prompt is {n_prompt} tokens, which leaves no answer token within --max-length {n_prompt} \(it needs more than {n_prompt}\)"):
        D.tokenize_dataset(tok, ds, n_prompt)
    (ex,) = D.tokenize_dataset(tok, ds, n_prompt + 2)  # completion truncated, 2 tokens kept
    assert len(ex) == n_prompt + 2 and ex.n_label_tokens == 2


def test_length_batches_cover_once_and_pad_little():
    rng = random.Random(0)
    lengths = [rng.randint(5, 40) for _ in range(1000)]
    batches = B.length_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert pad < 0.02 * sum(lengths)


def test_collate_left_right():
    ex = [D.Example([1, 2, 3], [IGNORE, 2, 3]), D.Example([4], [4])]
    ids, mask, lab = B.collate(ex, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert lab.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    ids, mask, _ = B.collate(ex, pad_id=0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_g2p_split_deterministic_disjoint():
    a, b = g2p.g2p_split(seed=3, n_test=200, n_validation=32), g2p.g2p_split(seed=3, n_test=200, n_validation=32)
    assert [w for w, _ in a.test] == [w for w, _ in b.test]
    assert len(a.test) == 200 and len(a.validation) == 32
    train = {w for w, _ in a.train}
    assert not train & {w for w, _ in a.test} and not train & {w for w, _ in a.validation}
    assert len(train) + 232 == len({w for w, _ in a.train + a.test + a.validation})
    c = g2p.g2p_split(seed=4, n_test=200, n_validation=32)
    assert [w for w, _ in a.test] != [w for w, _ in c.test]
    recs = g2p.g2p_dataset(a.test[:3]).records
    assert recs[0]["prompt"] == a.test[0][0] and recs[0]["completion"] == " ".join(a.test[0][1][0])


def test_render_prompt_g2p(tok):
    text = D.render_prompt(tok, "cat", g2p.G2P_FORMAT)
    assert text == f"<|im_start|>system\n{g2p.G2P_SYSTEM}<|im_end|>\n<|im_start|>user\ncat<|im_end|>\n<|im_start|>assistant\n"
    assert D.render_prompt(tok, "cat", {"type": "plain"}) == "cat"
    with pytest.raises(DataError):
        D.render_prompt(tok, "cat", {"type": "nope"})
