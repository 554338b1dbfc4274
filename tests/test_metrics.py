import pytest

from encdec.metrics import edit_distance, g2p_scores, score, text_scores


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b"], ["a", "b"]) == 0


def test_g2p_scores_use_any_reference_for_wer_and_closest_for_per():
    hyps = ["T AH M EY T OW", "T AH M AA T OW", "K AE T"]
    refs = [["T AH M EY T OW", "T AH M AA T OW"], ["T AH M EY T OW"], ["K AE T S"]]
    s = g2p_scores(hyps, refs)
    assert s["wer"] == pytest.approx(100 * 2 / 3)
    # edits: 0 (exact), 1 (AA vs EY, ref len 6), 1 (missing S, ref len 4)
    assert s["per"] == pytest.approx(100 * 2 / (6 + 6 + 4))


def test_text_scores_carry_sacrebleu_signatures():
    s = text_scores(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)
    assert s["bleu_signature"].startswith("nrefs:1|")
    assert s["chrf_signature"].startswith("nrefs:1|")
    partial = score("text", ["the cat sat on a mat"], [["the cat sat on the mat"]])
    assert 0 < partial["bleu"] < 100 and partial["exact_match"] == 0.0
