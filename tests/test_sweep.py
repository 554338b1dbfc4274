"""`encdec sweep`: settings x seeds for one budget, one table, stoppable and restartable."""

import csv
import json
import os

import pytest
import yaml

from conftest import write_config
from encdec import sweep
from encdec.cli import main
from encdec.config import ConfigError


def test_grid_parsing_and_names():
    grid = sweep.parse_grid(["train.lr=1e-3,2e-3", "augment.vtlp=[0.9,1.1],[0.8, 1.2]"])
    assert grid == [("train.lr", ["1e-3", "2e-3"]), ("augment.vtlp", ["[0.9,1.1]", "[0.8, 1.2]"])]
    combos = sweep.settings(grid)
    assert len(combos) == 4 and combos[1] == {"train.lr": "1e-3", "augment.vtlp": "[0.8, 1.2]"}
    assert sweep.setting_name(combos[1]) == "lr-1e-3_vtlp-0.8--1.2"
    assert sweep.setting_name({"model.dropout": "0", "train.dropout": "1"}) == \
        "model-dropout-0_train-dropout-1"
    assert sweep.setting_name({}) == "base"
    for bad in ["train.lr", "train.lr=", "train.lr=1,,2"]:
        with pytest.raises(ConfigError, match="--grid"):
            sweep.parse_grid([bad])
    with pytest.raises(ConfigError, match="twice"):
        sweep.parse_grid(["train.lr=1", "train.lr=2"])


def test_sweep_trains_every_setting_and_seed_and_restarts(tiny_data, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused", valid_every=4)
    out = tmp_path / "sweep"
    args = ["sweep", str(cfg), "--out", str(out), "--steps", "8", "--seeds", "1,2",
            "--grid", "train.lr=1e-3,3e-3", "--average", "2", "--beam", "2",
            "train.schedule=linear"]
    # one run stopped half way beforehand: the sweep continues it rather than start over
    half = out / "lr-3e-3" / "seed-2"
    assert main(["train", str(cfg), f"train.run_dir={half}", "train.max_steps=4",
                 "train.lr=3e-3", "train.seed=2", "train.schedule=linear"]) == 0
    assert main(args) == 0

    runs = list(csv.DictReader(open(out / "runs.csv", encoding="utf-8")))
    assert [(r["setting"], r["seed"]) for r in runs] == [
        ("lr-1e-3", "1"), ("lr-1e-3", "2"), ("lr-3e-3", "1"), ("lr-3e-3", "2")]
    for r in runs:
        run_dir = out / r["setting"] / f"seed-{r['seed']}"
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["train"]["seed"] == int(r["seed"])
        assert saved["train"]["lr"] == float(r["train.lr"])
        assert saved["train"]["schedule"] == "linear" and saved["train"]["max_steps"] == 8
        assert r["steps"] == "8"
        # the table's scores are the run's own evaluation files (best, and the average)
        best = json.loads((run_dir / "eval" / "test-beam2.json").read_text())
        assert float(r["test_wer"]) == round(best["scores"]["wer"], 2)
        avg = json.loads((run_dir / "eval" / "test-beam2-avg-last2.json").read_text())
        assert float(r["test_avg2_wer"]) == round(avg["scores"]["wer"], 2)
    # seeds differ: two seeds of one setting do not train the same weights
    curves = [[json.loads(line).get("loss") for line in
               (out / "lr-1e-3" / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()]
              for s in (1, 2)]
    assert curves[0] != curves[1]
    # the continued run kept its first four steps' records and went on to step 8
    steps = [json.loads(line)["step"] for line in (half / "metrics.jsonl").read_text().splitlines()
             if "valid_loss" in json.loads(line)]
    assert steps == [4, 8]

    table = (out / "results.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| lr-")]
    assert len(lines) == 2
    means = {}
    for r in runs:
        means.setdefault(r["setting"], []).append(float(r["test_wer"]))
    best_first = sorted(means, key=lambda k: sum(means[k]) / 2)
    assert [line.split(" | ")[0][2:] for line in lines] == best_first
    for line in lines:
        name = line.split(" | ")[0][2:]
        assert f"{sum(means[name]) / 2:.2f} ({min(means[name]):.2f}–{max(means[name]):.2f})" in line
        assert ", ".join(f"{v:.2f}" for v in means[name]) in line
    assert (out / "plot.png").stat().st_size > 0

    # a second call reads the finished runs back and trains nothing
    def no_training(*a, **k):
        raise AssertionError("trained a finished run again")

    monkeypatch.setattr("encdec.train.train", no_training)
    assert main(args) == 0
    assert list(csv.DictReader(open(out / "runs.csv", encoding="utf-8"))) == runs


def test_sweep_refuses_bad_requests(tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused")
    out = str(tmp_path / "sweep")
    assert main(["sweep", str(cfg), "--out", out, "--seeds", "1,1", "--steps", "2"]) == 2
    assert "distinct seeds" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--out", out, "--seeds", "one", "--steps", "2"]) == 2
    assert "--seeds 'one'" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--out", out, "--grid", "train.lrr=1,2", "--steps", "2"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err


def test_parallel_sweep_equals_one_run_at_a_time(tiny_data, tmp_path):
    """--jobs 2 trains two runs at once in worker processes: with the same threads per run the
    table is the one a sequential sweep writes; without train.num_threads each run gets its
    share of the cores."""
    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused", valid_every=4)
    common = ["--steps", "8", "--seeds", "1", "--grid", "train.lr=1e-3,3e-3", "--beam", "2"]
    tables = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs-{jobs}"
        assert main(["sweep", str(cfg), "--out", str(out), "--jobs", jobs, *common]) == 0
        rows = list(csv.DictReader(open(out / "runs.csv", encoding="utf-8")))
        tables.append([{k: v for k, v in r.items() if k != "train_min"} for r in rows])
    assert [r["setting"] for r in tables[0]] == ["lr-1e-3", "lr-3e-3"]
    assert tables[0] == tables[1]
    out = tmp_path / "shared"
    assert main(["sweep", str(cfg), "--out", str(out), "--jobs", "2", "--steps", "2", "--seeds",
                 "1,2", "train.num_threads=0"]) == 0
    for seed in (1, 2):
        saved = yaml.safe_load((out / "base" / f"seed-{seed}" / "config.yaml").read_text())
        assert saved["train"]["num_threads"] == max(1, (os.cpu_count() or 1) // 2)


def _children(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found |= {int(x) for x in f.read().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_workers_of_a_killed_sweep_save_and_exit(tiny_data, tmp_path):
    """A sweep killed while its workers train (SIGKILL: nothing of it can pass the word on)
    leaves no worker behind: each notices it is orphaned, saves a resumable checkpoint and
    exits; the same command started again continues both runs."""
    import signal
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path / "base.yaml", tiny_data, tmp_path / "unused", valid_every=10000,
                       log_every=1)
    out = tmp_path / "sweep"
    def cmd(steps):
        return [sys.executable, "-m", "encdec.cli", "sweep", str(cfg), "--out", str(out),
                "--jobs", "2", "--seeds", "1,2", "--steps", str(steps), "--method", "greedy"]

    parent = subprocess.Popen(cmd(100000), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = [out / "base" / f"seed-{s}" / "metrics.jsonl" for s in (1, 2)]
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not all(p.exists() and p.read_text().count("\n") >= 3 for p in logs):
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = {pid for pid in _children(parent.pid) if _alive(pid)}
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its sweep"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    steps = []
    for s in (1, 2):
        last = (out / "base" / f"seed-{s}" / "checkpoints" / "last").read_text().strip()
        steps.append(int(last.split("-")[1]))
    assert min(steps) >= 3
    again = subprocess.run(cmd(max(steps) + 2), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("continuing") == 2
    rows = list(csv.DictReader(open(out / "runs.csv", encoding="utf-8")))
    assert [int(r["steps"]) for r in rows] == [max(steps) + 2] * 2
