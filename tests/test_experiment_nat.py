"""`encdec experiment nat`: AT vs NAT on original and distilled targets, and mixed outputs."""

import csv
import json

import pytest
import yaml

from conftest import write_config
from encdec.cli import main
from encdec.experiment_nat import (count_mixed, count_repeats, mixes_references,
                                   repeated_token_share, repeats_token)
from encdec.metrics import g2p_scores


def test_an_output_mixing_two_references_is_counted():
    a, b = "T AH M EY T OW".split(), "T AH M AA T OW".split()
    c, d = "R IY D".split(), "R EH D".split()
    assert not mixes_references(a, [a, b])  # a reference itself
    assert not mixes_references("T AH M IY T OW".split(), [a, b])  # a token neither has
    # needs a token only the first has and one only the second has
    x, y = "K AE T AH".split(), "K AA T ER".split()
    assert mixes_references("K AE T ER".split(), [x, y])
    assert mixes_references("K AA T AH".split(), [x, y])
    assert not mixes_references("K AE T".split(), [x, y])  # another length
    assert not mixes_references(c, [c, d])
    hyps = ["K AE T ER", "K AE T AH", "R IH D", "K AA T AH"]
    refs = [["K AE T AH", "K AA T ER"], ["K AE T AH", "K AA T ER"], ["R IY D", "R EH D"],
            ["K AA T AH"]]  # the last has one reference: nothing to mix
    assert count_mixed(hyps, refs) == (1, 3)
    # references of different lengths only cannot be mixed position by position
    assert count_mixed(["A B"], [["A B C", "A D"]]) == (0, 0)
    assert count_mixed(["A C"], [["A B", "A B", "D C"]]) == (1, 1)


def test_an_output_repeating_a_token_no_reference_repeats_is_counted():
    refs = ["B UH K K IY P ER".split(), "B UH K IY P ER".split()]
    assert not repeats_token("B UH K K IY P ER".split(), refs)  # a reference repeats K
    assert repeats_token("B UH UH K IY P ER".split(), refs)
    assert not repeats_token("B UH K IY P ER".split(), refs)
    assert not repeats_token("UH B UH".split(), refs)  # twice, but not in a row
    assert repeats_token("the the lord".split(), ["the lord".split()])
    hyps = ["A A B", "A B", "C C", "C C D D"]
    assert count_repeats(hyps, [["A B"], ["A B"], ["C C"], ["C C D"]]) == 2
    # by token: A A (1 of 3), none, C C a reference doubles, D D (1 of 4); "D D D" is two
    assert repeated_token_share(hyps, [["A B"], ["A B"], ["C C"], ["C C D"]]) == \
        pytest.approx(100 * 2 / 11)
    assert repeated_token_share(["D D D", "E"], [["D"], ["E"]]) == pytest.approx(100 * 2 / 4)


def test_nat_experiment_trains_distills_and_writes_one_table(tiny_data, tmp_path):
    base = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused")
    nat = write_config(tmp_path / "nat.yaml", tiny_data, tmp_path / "unused")
    nat.write_text(nat.read_text().replace("model:\n", "model:\n  arch: nat\n")
                   .replace("decode:\n", "decode:\n  method: nat\n  length_beam: 2\n"))
    out = tmp_path / "nat"
    assert main(["experiment", "nat", "--config", str(base), "--nat-config", str(nat),
                 "--out", str(out), "--steps", "6", "train.valid_every=3",
                 "train.valid_max_inputs=8"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [r["decoder"] for r in rows] == [
        "AT beam 5", "AT greedy", "NAT, 1 pass", "NAT, 4 passes", "NAT, 10 passes",
        "NAT distilled, 1 pass", "NAT distilled, 4 passes", "NAT distilled, 10 passes"]
    assert all(r["steps"] == "6" for r in rows)
    assert [r["length_beam"] for r in rows] == ["", ""] + ["2"] * 6
    # the distilled model trained on the AT model's outputs, the raw one on the real targets
    distilled = out / "data-distilled"
    meta = json.loads((distilled / "meta.json").read_text())
    assert meta["distilled"]["teacher"] == str(out / "at")
    assert meta["distilled"]["decode"]["beam_size"] == 5
    cfgs = {run: yaml.safe_load((out / run / "config.yaml").read_text())
            for run in ("at", "nat-raw", "nat-distilled")}
    assert cfgs["nat-distilled"]["data"]["dir"] == str(distilled)
    assert cfgs["nat-raw"]["data"]["dir"] == cfgs["at"]["data"]["dir"] == str(tiny_data)
    assert cfgs["at"]["model"]["arch"] == "transformer"
    assert cfgs["nat-raw"]["model"]["arch"] == cfgs["nat-distilled"]["model"]["arch"] == "nat"
    # each row scores its own outputs against the real references
    refs = [json.loads(x)["refs"] for x in (tiny_data / "test.eval.jsonl").read_text().splitlines()]
    for r in rows:
        hyps = (out / f"{r['decoder'].replace(' ', '-').replace(',', '')}.hyp") \
            .read_text().splitlines()
        assert len(hyps) == len(refs)
        assert float(r["test_wer"]) == pytest.approx(g2p_scores(hyps, refs)["wer"], abs=0.01)
        assert (int(r["mixed_outputs"]), int(r["mixable_inputs"])) == count_mixed(hyps, refs)
        assert int(r["repeat_outputs"]) == count_repeats(hyps, refs)
        assert float(r["repeated_tokens_pct"]) == pytest.approx(
            repeated_token_share(hyps, refs), abs=0.01)
        assert float(r["inputs_per_s_b64"]) > 0 and float(r["ms_per_input_b1"]) > 0
    md = (out / "results.md").read_text()
    assert "NAT distilled, 4 passes (length beam 2)" in md and "1.00×" in md
    assert (out / "plot.png").stat().st_size > 1000


def test_nat_experiment_continues_and_takes_a_trained_teacher(tiny_data, tiny_run, tmp_path,
                                                              capsys):
    """Started again, the command reads its finished runs and distilled targets back; a longer
    budget continues the runs; --from RUN is the AT model and teacher, trained elsewhere."""
    from encdec import checkpoint

    nat = write_config(tmp_path / "nat.yaml", tiny_data, tmp_path / "unused")
    nat.write_text(nat.read_text().replace("model:\n", "model:\n  arch: nat\n")
                   .replace("decode:\n", "decode:\n  method: nat\n  length_beam: 2\n"))
    out = tmp_path / "nat"
    cmd = ["experiment", "nat", "--from", str(tiny_run), "--nat-config", str(nat), "--out",
           str(out), "train.valid_every=3", "train.valid_max_inputs=8"]
    assert main(cmd + ["--steps", "4"]) == 0
    assert not (out / "at").exists()  # nothing trained for the AT side
    teacher_step = int(checkpoint.resolve(tiny_run, "last").name.split("-")[1])
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [r["steps"] for r in rows] == [str(teacher_step)] * 2 + ["4"] * 6
    meta = json.loads((out / "data-distilled" / "meta.json").read_text())
    assert meta["distilled"]["teacher"] == str(tiny_run)
    # the AT rows are the teacher's own outputs
    from encdec.translate import Translator
    src = [json.loads(x)["src"] for x in (tiny_data / "test.eval.jsonl").read_text().splitlines()]
    assert (out / "AT-greedy.hyp").read_text().splitlines() == \
        Translator.from_run(tiny_run).translate(src, method="greedy")
    distilled_at = (out / "data-distilled" / "meta.json").stat().st_mtime_ns
    capsys.readouterr()

    assert main(cmd + ["--steps", "4"]) == 0  # again: nothing to train or distill
    said = capsys.readouterr().out
    assert "distilled earlier by the same AT model" in said and "continuing" in said
    assert (out / "data-distilled" / "meta.json").stat().st_mtime_ns == distilled_at
    for run in ("nat-raw", "nat-distilled"):
        assert checkpoint.resolve(out / run, "last").name == "step-0000004"

    assert main(cmd + ["--steps", "7"]) == 0  # a longer budget continues both NAT runs
    for run in ("nat-raw", "nat-distilled"):
        assert checkpoint.resolve(out / run, "last").name == "step-0000007"
    assert (out / "data-distilled" / "meta.json").stat().st_mtime_ns == distilled_at
    capsys.readouterr()
    assert main(cmd + ["--steps", "9", "model.dropout=0.3"]) == 2  # other settings: refused
    assert "model.dropout: 0.0 then, 0.3 now" in capsys.readouterr().err
    for run in ("nat-raw", "nat-distilled"):
        assert checkpoint.resolve(out / run, "last").name == "step-0000007"

    # targets from another teacher (or the same one trained on) are not mixed with a student
    # trained on the earlier ones
    stamp = out / "distilled-from.json"
    stamp.write_text(json.dumps({"teacher": str(tiny_run), "step": teacher_step + 1}))
    assert main(cmd + ["--steps", "7"]) == 2
    assert "nat-distilled" in capsys.readouterr().err
    assert main(["experiment", "nat", "--from", str(tmp_path), "--out", str(tmp_path / "no"),
                 "--steps", "4"]) == 2
    assert not (tmp_path / "no").exists()
