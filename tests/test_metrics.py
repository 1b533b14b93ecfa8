"""Edit distance, exact match and phoneme error rate on hand-computed cases."""

import math

from lorakit.app.evaluate import edit_distance, g2p_scores, perplexity, phoneme_errors


def test_edit_distance():
    assert edit_distance(list("kitten"), list("sitting")) == 3  # 2 substitutions + 1 insertion
    assert edit_distance([], ["AH0", "B"]) == 2
    assert edit_distance(["K", "AE1", "T"], ["K", "AE1", "T"]) == 0
    assert edit_distance(["K", "AE1", "T"], ["K", "AE0", "T"]) == 1  # stress counts
    assert edit_distance(["A", "B", "C", "D"], ["B", "C", "D", "E"]) == 2


def test_closest_reference():
    refs = [["T", "AH0", "M", "EY1", "T", "OW2"], ["T", "AH0", "M", "AA1", "T", "OW2"]]
    assert phoneme_errors(["T", "AH0", "M", "AA1", "T", "OW2"], refs) == (0, 6)
    assert phoneme_errors(["T", "AH0", "M", "EY1", "T"], refs) == (1, 6)
    # fewest edits wins even against a shorter reference
    assert phoneme_errors(["A", "B", "C"], [["A"], ["A", "B", "C", "D"]]) == (1, 4)


def test_g2p_scores():
    preds = ["HH AH0 L OW1", "K AE1 T S", "", "garbage words here"]
    refs = [
        [["HH", "AH0", "L", "OW1"], ["HH", "EH0", "L", "OW1"]],  # exact: 0 edits / 4
        [["K", "AE1", "T"]],  # 1 insertion / 3
        [["D", "AO1", "G"]],  # empty prediction: 3 deletions / 3
        [["W", "ER1", "D", "Z"]],  # 3 substitutions + 1 deletion / 4
    ]
    s = g2p_scores(preds, refs)
    assert s["words"] == 4
    assert s["exact_match"] == 0.25
    assert math.isclose(s["per"], (0 + 1 + 3 + 4) / (4 + 3 + 3 + 4))


def test_perplexity():
    assert math.isclose(perplexity(math.log(7.0)), 7.0)
    assert perplexity(1e6) == float("inf")


def test_beam_search_completions_are_transformers_beam_search_per_prompt(tmp_path):
    """``greedy_generate(num_beams=3)`` in a left-padded batch gives, per prompt, what transformers' own beam
    search gives on that prompt alone (and greedy stays greedy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from _tiny import tiny_model_folder, tiny_tokenizer
    from lorakit.app.evaluate import encode_prompt, greedy_generate

    folder = tiny_model_folder(tmp_path / "m", seed=6)
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), tiny_tokenizer()
    prompts = ["cat", "hello world", "tiny dog"]  # different lengths: left padding in the batch
    greedy = greedy_generate(model, tok, prompts, max_new_tokens=6)
    assert greedy != greedy_generate(model, tok, prompts, max_new_tokens=6, num_beams=3)  # beams change the output
    for beams in (1, 3):
        got = greedy_generate(model, tok, prompts, max_new_tokens=6, num_beams=beams)
        for text, prompt in zip(got, prompts):
            ids = torch.tensor([encode_prompt(tok, prompt)])
            kw = {"num_beams": beams, "early_stopping": True} if beams > 1 else {}
            with torch.no_grad():
                want = model.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **kw)[0, ids.shape[1]:]
            assert text == tok.decode(want, skip_special_tokens=True).strip(), (beams, prompt)
