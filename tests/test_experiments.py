"""`encdec experiment depth|norm|sampling|rnn`: tables and plots, step budgets, --from, seeds,
and a command started again continuing where it stopped."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_in_background, wait_for_step, write_config
from encdec.cli import main
from encdec.config import Config


def _state(out):
    """Per variant directory: its checkpoints (name, size, mtime) and its metrics lines."""
    return {run.name: (sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                              for p in (run / "checkpoints").rglob("*") if p.is_file()),
                       (run / "metrics.jsonl").read_text())
            for run in sorted(out.iterdir()) if (run / "checkpoints").is_dir()}


def _last_step(run):
    from encdec import checkpoint
    return int(checkpoint.resolve(run, "last").name.split("-")[1])


def _weights(run):
    from safetensors.torch import load_file

    from encdec import checkpoint
    return load_file(str(checkpoint.resolve(run, "last") / "model.safetensors"))


def test_an_experiment_stopped_and_started_again_trains_what_an_uninterrupted_one_trains(
        tiny_data, tmp_path):
    """Ctrl-C during the first variant, then the same command: per variant the weights, the
    training losses and the test figures of an uninterrupted run; a third start trains
    nothing. A larger budget continues every variant."""
    import signal

    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused", log_every=1)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["experiment", "depth", "--config", str(cfg), "--steps", "120",
              "train.valid_max_inputs=8"]
    assert main(common + ["--out", str(whole)]) == 0
    variants = [r["variant"].replace(" ", "-").replace("+", "x")
                for r in csv.DictReader(open(whole / "results.csv", encoding="utf-8"))]
    proc = run_in_background(common + ["--out", str(parts)])
    wait_for_step(proc, parts / variants[0], 3, timeout=600)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    stopped = _last_step(parts / variants[0])
    assert 3 <= stopped < 120 and not (parts / variants[1]).exists()

    result = subprocess.run([sys.executable, "-m", "encdec.cli", *common, "--out", str(parts)],
                            capture_output=True, text=True, env=dict(
                                os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"continuing from step {stopped}") == 1

    def table(out):
        return [{k: v for k, v in r.items() if k not in ("train_tok_s", "train_min")}
                for r in csv.DictReader(open(out / "results.csv", encoding="utf-8"))]

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl")
                                                    .read_text().splitlines()) if "loss" in r]

    assert [r["steps"] for r in table(parts)] == ["120"] * 2
    assert table(parts) == table(whole)
    for variant in variants:
        assert len(losses(parts / variant)) == 120
        assert losses(parts / variant) == losses(whole / variant)
        a, b = _weights(parts / variant), _weights(whole / variant)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    before = _state(parts)
    assert main(common + ["--out", str(parts)]) == 0  # finished: read back, nothing trained
    assert _state(parts) == before and table(parts) == table(whole)
    assert main(["experiment", "depth", "--config", str(cfg), "--steps", "130",
                 "train.valid_max_inputs=8", "--out", str(parts)]) == 0
    assert [_last_step(parts / v) for v in variants] == [130, 130]


def test_an_experiment_refuses_to_continue_a_model_started_with_other_settings(
        tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused")
    out = tmp_path / "depth"
    common = ["experiment", "depth", "--config", str(cfg), "--out", str(out),
              "train.valid_max_inputs=8"]
    assert main(common + ["--steps", "4"]) == 0
    before = _state(out)
    capsys.readouterr()
    assert main(common + ["--steps", "8", "model.dropout=0.3"]) == 2
    err = capsys.readouterr().err
    assert "model.dropout: 0.0 then, 0.3 now" in err and "another --out" in err
    assert _state(out) == before  # refused before anything trained

    # a schedule that decays over the budget cannot take a larger one
    cosine = tmp_path / "cosine"
    common = ["experiment", "depth", "--config", str(cfg), "--out", str(cosine),
              "train.valid_max_inputs=8", "train.schedule=cosine"]
    assert main(common + ["--steps", "4"]) == 0
    before = _state(cosine)
    assert main(common + ["--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: 4 then, 8 now" in err and "decays the learning rate over the budget" in err
    assert _state(cosine) == before
    assert main(common + ["--steps", "4"]) == 0  # the same budget: read back
    assert _state(cosine) == before


@pytest.mark.parametrize("name", ["depth", "sampling", "rnn", "norm"])
def test_experiments_write_tables_and_plots(name, tiny_data, tmp_path):
    import csv
    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused")
    out = tmp_path / name
    heads = ["model.n_heads=4"] if name == "rnn" else []  # the LSTM's width need not divide
    assert main(["experiment", name, "--config", str(cfg), "--out", str(out), "--minutes", "5",
                 "train.max_steps=6", "train.valid_every=3", "train.valid_max_inputs=8",
                 *heads]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    from encdec.experiments import EXPERIMENTS
    assert len(rows) == EXPERIMENTS[name]
    assert all(int(r["steps"]) == 6 for r in rows)
    # The table reports each variant's own test outputs, scored against the references.
    from encdec.metrics import g2p_scores
    refs = [json.loads(x)["refs"] for x in (tiny_data / "test.eval.jsonl").read_text().splitlines()]
    for r in rows:
        slug = r["variant"].replace(" ", "-").replace("+", "x")
        hyps = (out / slug / "eval" / "test-greedy.hyp").read_text().splitlines()
        assert len(hyps) == len(refs)
        assert float(r["test_wer"]) == pytest.approx(g2p_scores(hyps, refs)["wer"], abs=0.01)
    assert (out / "plot.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    if name == "sampling":
        assert "by output position" in md
    if name in ("depth", "rnn"):  # parameter counts matched within 10 %
        counts = [int(r["parameters"]) for r in rows]
        assert max(counts) / min(counts) < 1.1, counts


def test_step_budgeted_experiments_are_reproducible(tiny_data, tmp_path):
    import csv
    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused")
    tables = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["experiment", "norm", "--config", str(cfg), "--out", str(out), "--steps", "5",
                     "train.valid_max_inputs=8"]) == 0
        rows = list(csv.DictReader(open(out / "results.csv")))
        assert [int(r["steps"]) for r in rows] == [5, 5, 5]
        losses = [json.loads(line).get("valid_loss") for line in
                  (out / "pre-BatchNorm" / "metrics.jsonl").read_text().splitlines()]
        tables.append(([{k: v for k, v in r.items() if k not in ("train_tok_s", "train_min")}
                        for r in rows], [x for x in losses if x is not None]))
    assert tables[0][1] and tables[0] == tables[1]  # bit-identical dev losses too
    assert "5 steps per variant" in (tmp_path / "b" / "results.md").read_text()


def test_sampling_from_a_trained_run(tiny_run, tmp_path):
    """experiment sampling --from RUN: both variants continue a copy of the trained run from
    its last checkpoint on the same batches; only the scheduled-sampling one samples, on a
    schedule that starts at the run's last step; the run itself is left as it was."""
    import csv

    from encdec import checkpoint
    before = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    out = tmp_path / "ss"
    assert main(["experiment", "sampling", "--from", str(tiny_run), "--steps", "16",
                 "--out", str(out), "train.valid_max_inputs=8", "train.log_every=1"]) == 0
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == before
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [int(r["steps"]) for r in rows] == [616, 616]
    tf, ss = (Config.load(out / d / "config.yaml").train
              for d in ("teacher-forcing", "scheduled-sampling"))
    assert tf.scheduled_sampling == "off" and ss.scheduled_sampling == "inverse_sigmoid"
    assert ss.ss_start_step == 600 and tf.max_steps == ss.max_steps == 616
    # the same start: the copies' records up to step 600 are the run's own
    records = {d: [json.loads(x) for x in (out / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("teacher-forcing", "scheduled-sampling")}
    original = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for recs in records.values():
        assert [r for r in recs if r["step"] <= 600] == original
    losses = {d: [r["loss"] for r in recs if "loss" in r and r["step"] > 600]
              for d, recs in records.items()}
    assert len(losses["teacher-forcing"]) == 16
    # only the scheduled-sampling copy samples, from its first step on (whether its losses then
    # differ depends on the tiny model making a training error at a sampled position)
    probs = [r.get("sampling_prob") for r in records["scheduled-sampling"] if "loss" in r and r["step"] > 600]
    assert all(p is not None and 0.1 < p <= 0.25 for p in probs) and probs == sorted(probs)
    assert not any("sampling_prob" in r for r in records["teacher-forcing"])
    for d in records:  # scored at the last step
        assert checkpoint.resolve(out / d, "last").name == "step-0000616"
        assert json.loads((out / d / "eval" / "test-greedy-last.json").read_text())["checkpoint"] \
            == "step-0000616"
    assert "16 steps from step 600" in (out / "results.md").read_text()
    for bad in (["experiment", "depth", "--from", str(tiny_run), "--steps", "4"],
                ["experiment", "sampling", "--from", str(tiny_run), "--minutes", "1"],
                ["experiment", "sampling", "--from", str(tmp_path), "--steps", "4"]):
        assert main(bad + ["--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_error_by_position():
    from encdec.experiments import error_by_position
    errs = error_by_position(["A B C", "A X", "A B C D"], [["A B C"], ["A B C"], ["A B C E"]], 4)
    assert errs[:4] == pytest.approx([0.0, 100 / 3, 100 / 3, 100.0])


def test_experiment_over_seeds_in_parallel(tiny_data, tmp_path):
    """experiment --seeds S1,S2 --jobs 2: every variant once per seed in OUT/VARIANT/seed-N,
    trained two at a time in worker processes; seed 1's model is the one a plain run with
    train.seed=1 trains, seed 2's differs; the table gives each variant's mean and range."""
    import csv
    import statistics

    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused")
    common = ["--config", str(cfg), "--steps", "5", "train.valid_max_inputs=8",
              "train.num_threads=1"]
    out = tmp_path / "seeds"
    assert main(["experiment", "depth", "--seeds", "1,2", "--jobs", "2", "--out", str(out),
                 *common]) == 0
    assert main(["experiment", "depth", "--out", str(tmp_path / "one"), *common,
                 "train.seed=1"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    assert len(variants) == 2 and [(r["variant"], r["seed"]) for r in rows] == [
        (v, s) for v in variants for s in ("1", "2")]

    def losses(run):
        return [json.loads(x)["valid_loss"] for x in (run / "metrics.jsonl").read_text()
                .splitlines() if "valid_loss" in x]

    for slug in (v.replace(" ", "-").replace("+", "x") for v in variants):
        assert Config.load(out / slug / "seed-2" / "config.yaml").train.seed == 2
        assert losses(out / slug / "seed-1") == losses(tmp_path / "one" / slug)
        assert losses(out / slug / "seed-1") != losses(out / slug / "seed-2")
    one = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "one" / "results.csv"))}
    md = (out / "results.md").read_text()
    assert "5 steps per variant, 2 seeds" in md
    for variant in variants:
        wers = [float(r["test_wer"]) for r in rows if r["variant"] == variant]
        assert wers[0] == float(one[variant]["test_wer"])
        line = next(x for x in md.splitlines() if x.startswith(f"| {variant} |"))
        assert f"{statistics.mean(wers):.2f} ({min(wers):.2f}–{max(wers):.2f})" in line
        assert f"{wers[0]:.2f} / {wers[1]:.2f}" in line
    for bad in (["--seeds", "1,1"], ["--seeds", "1,x"], ["--jobs", "0"]):
        assert main(["experiment", "depth", *bad, "--out", str(tmp_path / "no"), *common]) == 2
    assert main(["experiment", "nat", "--seeds", "1,2", "--out", str(tmp_path / "no"),
                 *common]) == 2
    assert not (tmp_path / "no").exists()


def test_experiment_from_a_run_refuses_several_seeds(tiny_run, tmp_path):
    assert main(["experiment", "sampling", "--from", str(tiny_run), "--steps", "4",
                 "--seeds", "1,2", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()
