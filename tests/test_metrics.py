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
