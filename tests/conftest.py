"""Shared fixtures: a tiny synthetic corpus (spell a word backwards in capitals) and tiny runs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from encdec.cli import main

# Under CI a missing system dependency (Debian packages the Makefile installs) fails the tests
# that need it, so a run cannot go green with them untested; elsewhere they are skipped, and
# `make test` prints why (pytest -rs).
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def needs_system(missing: list[str], what: str):
    """Mark a test that needs the system packages ``missing`` (empty: all present)."""
    reason = f"{what}: Debian package(s) {' '.join(missing)} not installed (`make sysdeps`)"
    return pytest.mark.needs_system(reason=reason) if missing else pytest.mark.needs_system()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_system(reason): needs system packages; fails under "
                                       "CI=true when they are missing, else skipped")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_system"):
        reason = mark.kwargs.get("reason")
        if reason:
            if IN_CI:
                pytest.fail(f"CI=true and {reason}", pytrace=False)
            pytest.skip(reason)


TINY_MODEL = {"d_model": 64, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ffn_dim": 128,
              "dropout": 0.0}


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
        pairs.append((word, " ".join(reversed(word.upper()))))
    return pairs


def write_tsv(path: Path, pairs) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    train = write_tsv(root / "train.tsv", make_pairs(600, 1))
    dev = write_tsv(root / "dev.tsv", make_pairs(40, 2))
    test = write_tsv(root / "test.tsv", make_pairs(40, 3))
    out = root / "data"
    assert main(["prepare", "--train", str(train), "--dev", str(dev), "--test", str(test),
                 "--out", str(out), "--src-tokenizer", "char", "--tgt-tokenizer", "whitespace",
                 "--metric", "g2p", "--group-refs"]) == 0
    return out


def write_config(path: Path, data_dir: Path, run_dir: Path, **train) -> Path:
    cfg = {
        "data": {"dir": str(data_dir)},
        "model": dict(TINY_MODEL),
        "train": {"run_dir": str(run_dir), "max_tokens": 400, "lr": 3e-3, "warmup_steps": 10,
                  "valid_every": 200, "log_every": 10, "max_steps": 100, "num_threads": 1, **train},
        "decode": {"beam_size": 3, "max_len_a": 1.0, "max_len_b": 3},
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_metrics(tmp_path: Path, data_dir: Path, name: str, **train) -> tuple[Path, list[dict]]:
    """Train a tiny run named ``name`` with these train options; its run directory and the
    records of its metrics.jsonl."""
    run = tmp_path / f"run-{name}"
    cfg = write_config(tmp_path / f"{name}.yaml", data_dir, run, **train)
    assert main(["train", str(cfg)]) == 0
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_in_background(args, **popen):
    """``encdec ARGS`` in a child process on one thread, its output piped."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "encdec.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_step(proc, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Wait until ``run_dir``'s metrics reach ``step`` (fail if ``proc`` ends first)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(x).get("step", 0) >= step
                                 for x in path.read_text().splitlines() if x.endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"training did not reach step {step} in {timeout} s")


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    cfg = write_config(root / "tiny.yaml", tiny_data, root / "run", max_steps=600)
    assert main(["train", str(cfg)]) == 0
    return root / "run"


# ---- speech: tone "words" (each letter a 60 ms tone of its own pitch) --------------------
TONES = {ch: 300.0 * 1.25 ** i for i, ch in enumerate("abcdef")}
TINY_SPEECH_MODEL = {"arch": "speech", "d_model": 32, "n_heads": 2, "enc_layers": 2,
                     "dec_layers": 1, "ffn_dim": 64, "dropout": 0.0, "front_channels": 8,
                     "ctc_weight": 0.3}


def tone_word(word: str, rate: int = 16000, letter_s: float = 0.06) -> np.ndarray:
    """A word spoken as tones: each letter a tone (with a short gap), padded with silence."""
    t = np.arange(int(rate * letter_s)) / rate
    parts = [np.zeros(int(rate * 0.05), dtype=np.float32)]
    for ch in word:
        tone = 0.3 * np.sin(2 * np.pi * TONES[ch] * t) * np.hanning(t.size)
        parts += [tone.astype(np.float32), np.zeros(int(rate * 0.02), dtype=np.float32)]
    parts.append(np.zeros(int(rate * 0.05), dtype=np.float32))
    return np.concatenate(parts)


def write_tone_list(folder: Path, name: str, n: int, seed: int) -> Path:
    """n tone words as WAV files and their list NAME.tsv (relative paths)."""
    import soundfile

    rng = random.Random(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        rel = f"{name}/{i:03d}.wav"
        soundfile.write(str(folder / rel), tone_word(word), 16000)
        lines.append(f"{rel}\t{' '.join(word)}\n")
    path = folder / f"{name}.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_speech_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_speech")
    lists = [write_tone_list(root, s, n, seed) for s, n, seed in
             (("train", 160, 1), ("dev", 12, 2), ("test", 12, 3))]
    out = root / "data"
    assert main(["prepare", "--train", str(lists[0]), "--dev", str(lists[1]), "--test",
                 str(lists[2]), "--out", str(out), "--tgt-tokenizer", "whitespace"]) == 0
    return out


def write_speech_config(path: Path, data_dir: Path, run_dir: Path, model=None, **train) -> Path:
    cfg = {
        "data": {"dir": str(data_dir)},
        "model": {**TINY_SPEECH_MODEL, **(model or {})},
        "train": {"run_dir": str(run_dir), "max_frames": 1500, "lr": 3e-3, "warmup_steps": 10,
                  "valid_every": 100, "log_every": 10, "max_steps": 60, "num_threads": 1,
                  **train},
        "augment": {"speed_perturb": [0.9, 1.0, 1.1], "noise_prob": 0.5, "freq_width": 10,
                    "time_width": 5},
        "decode": {"beam_size": 3, "ctc_weight": 0.3, "max_len_a": 1.0, "max_len_b": 3},
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_speech_run(tiny_speech_data, tmp_path_factory) -> Path:
    """A tiny joint CTC/attention recognizer of tone words, trained enough to read them."""
    root = tmp_path_factory.mktemp("speech_run")
    cfg = write_speech_config(root / "tiny.yaml", tiny_speech_data, root / "run", max_steps=300,
                              valid_every=150)
    assert main(["train", str(cfg)]) == 0
    return root / "run"
