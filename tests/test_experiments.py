"""`encdec experiment depth|norm|sampling|rnn` started again: it continues where it stopped."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_in_background, wait_for_step, write_config
from encdec.cli import main


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
    assert "train.max_steps: 4 then, 8 now" in err and "decays over the budget" in err
    assert _state(cosine) == before
    assert main(common + ["--steps", "4"]) == 0  # the same budget: read back
    assert _state(cosine) == before
