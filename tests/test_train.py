import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_in_background, wait_for_step, write_config, write_speech_config
from encdec import checkpoint
from encdec.cli import main
from encdec.config import Config
from encdec.train import Trainer, lr_at
from encdec.translate import Translator

ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_cli(tiny_run, tiny_data, tmp_path):
    """prepare -> train (fixture) -> evaluate -> translate, each through the real CLI."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ev = subprocess.run([sys.executable, "-m", "encdec.cli", "evaluate", str(tiny_run),
                         "--split", "test", "--beam", "3", "--batch-size", "7"],
                        capture_output=True, text=True, env=env)
    assert ev.returncode == 0, ev.stderr
    assert "WER" in ev.stdout and "PER" in ev.stdout
    result = json.loads((tiny_run / "eval" / "test-beam3.json").read_text())
    assert result["decode"]["beam_size"] == 3 and result["inputs"] == 40
    assert result["decode"]["batch_size"] == 7
    # 600 tiny steps learn to spell backwards: WER about 30 %; a broken decoder (early or
    # missing EOS, shifted tokens) gets every word wrong.
    assert result["scores"]["wer"] < 50.0 and result["scores"]["per"] < 20.0
    tr = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(tiny_run),
                         "--beam", "2", "--nbest", "2", "--scores"], input="abc\n\ncab\n",
                        capture_output=True, text=True, env=env)
    assert tr.returncode == 0, tr.stderr
    lines = tr.stdout.splitlines()
    assert len(lines) == 6 and lines[0].startswith("0\t") and lines[1].startswith("1\t")
    (tmp_path / "in.txt").write_text("abc\nhead\n")
    tf = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(tiny_run), "-i",
                         str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt")],
                        capture_output=True, text=True, env=env)
    assert tf.returncode == 0, tf.stderr
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 2


def test_python_api_preserves_order_and_matches_greedy(tiny_run):
    tr = Translator.from_run(tiny_run)
    words = ["abc", "h", "abcdef", "", "dcba"]
    beam = tr.translate(words)
    assert len(beam) == 5 and beam[3] == ""
    one_by_one = [tr.translate([w])[0] for w in words]
    assert beam == one_by_one
    # beam_search itself (the API routes a beam of 1 to greedy): the same tokens and scores
    from encdec.decoding import beam_search, greedy
    from encdec.data.dataset import pad
    ids = [tr.assets.src_vocab.encode(tr.assets.src_tokenizer.encode(w)) for w in words if w]
    src = pad(ids)
    by_beam = beam_search(tr.model, src, beam_size=1, length_penalty=0.0, max_len_a=1.0, max_len_b=3)
    by_greedy = greedy(tr.model, src, max_len_a=1.0, max_len_b=3)
    assert [h[0].tokens for h in by_beam] == [h[0].tokens for h in by_greedy]
    assert [h[0].score for h in by_beam] == pytest.approx([h[0].score for h in by_greedy], abs=1e-5)
    nbest = tr.translate_nbest(["abc"], beam_size=3, nbest=3, need_attention=True)[0]
    assert len(nbest) == 3 and nbest[0].score >= nbest[1].score >= nbest[2].score
    att = nbest[0].attention
    assert att.shape == (len(nbest[0].tokens) + 1, 3)
    torch.testing.assert_close(att.sum(-1), torch.ones(att.size(0)))


def test_training_writes_metrics_and_checkpoints(tiny_run):
    records = _records(tiny_run)
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in valid] == [200, 400, 600]
    assert {"valid_wer", "valid_per", "valid_exact_match"} <= set(valid[0])
    assert (tiny_run / "config.yaml").exists() and (tiny_run / "data" / "src.vocab").exists()
    assert checkpoint.resolve(tiny_run, "last").name == "step-0000600"
    assert checkpoint.resolve(tiny_run, "best").exists()


def test_lr_schedules():
    cfg = Config().train
    cfg.warmup_steps, cfg.lr = 10, 1.0
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(39, cfg) == pytest.approx(0.5)  # sqrt(10/40)
    cfg.schedule, cfg.max_steps, cfg.min_lr = "cosine", 110, 0.0
    assert lr_at(59, cfg) == pytest.approx(0.5)
    assert lr_at(109, cfg) == pytest.approx(0.0, abs=1e-12)
    cfg.schedule = "linear"
    assert lr_at(59, cfg) == pytest.approx(0.5)
    assert lr_at(84, cfg) == pytest.approx(0.25)
    # over a time budget: the same shape by the fraction of max_minutes spent
    cfg.max_steps, cfg.max_minutes = 0, 10.0
    assert lr_at(59, cfg, elapsed_s=150.0) == pytest.approx(0.75)
    assert lr_at(59, cfg, elapsed_s=600.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, cfg, elapsed_s=300.0) == pytest.approx(0.6)  # the warmup ramp first
    # both budgets: whichever ends first
    cfg.max_steps = 110
    assert lr_at(84, cfg, elapsed_s=60.0) == pytest.approx(0.25)
    assert lr_at(19, cfg, elapsed_s=450.0) == pytest.approx(0.25)
    # warmup-stable-decay: the peak until the last fifth, then linear to the floor
    cfg.max_steps, cfg.decay_fraction = 0, 0.2
    assert lr_at(59, cfg, elapsed_s=470.0) == pytest.approx(1.0)
    assert lr_at(59, cfg, elapsed_s=540.0) == pytest.approx(0.5)
    cfg.schedule = "cosine"
    assert lr_at(59, cfg, elapsed_s=540.0) == pytest.approx(0.5)
    assert lr_at(59, cfg, elapsed_s=600.0) == pytest.approx(0.0, abs=1e-12)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    common = dict(max_steps=8, valid_every=4, log_every=1, valid_max_inputs=8)
    full = write_config(tmp_path / "full.yaml", tiny_data, tmp_path / "full", **common)
    assert main(["train", str(full)]) == 0
    part = write_config(tmp_path / "part.yaml", tiny_data, tmp_path / "part", **common)
    assert main(["train", str(part), "train.max_steps=4"]) == 0
    # refusing to overwrite a trained run without --resume
    assert main(["train", str(part), "train.max_steps=4"]) == 2
    # a run directory copied elsewhere resumes where it is now, leaving the original alone
    shutil.copytree(tmp_path / "part", tmp_path / "moved")
    assert main(["train", str(tmp_path / "moved"), "--resume", "train.max_steps=8"]) == 0
    assert checkpoint.resolve(tmp_path / "part", "last").name == "step-0000004"
    assert Config.load(tmp_path / "moved" / "config.yaml").train.run_dir == str(tmp_path / "moved")
    losses = lambda d: [(r["step"], r["loss"]) for r in _records(d) if "loss" in r]
    assert losses(tmp_path / "full") == losses(tmp_path / "moved")
    a = load_file(str(checkpoint.resolve(tmp_path / "full", "last") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tmp_path / "moved", "last") / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_train(cfg: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "encdec.cli", "train", str(cfg)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_two_process_ddp(tiny_data, tmp_path):
    cfg = write_config(tmp_path / "ddp.yaml", tiny_data, tmp_path / "ddp", max_steps=20,
                       valid_every=10, log_every=5)
    proc = _torchrun_train(cfg)
    assert "2 process(es)" in proc.stdout + proc.stderr
    records = _records(tmp_path / "ddp")
    assert [r["step"] for r in records if "valid_loss" in r] == [10, 20]
    tr = Translator.from_run(tmp_path / "ddp", "last")
    assert len(tr.translate(["abc", "de"])) == 2


def test_two_process_ddp_through_the_ctc_warmup(tiny_speech_data, tmp_path):
    """Speech DDP with train.ctc_warmup_steps: the warm-up's updates leave the decoder's
    parameters without gradients, which DDP must be told to expect, and the joint updates
    after it train every parameter."""
    cfg = write_speech_config(tmp_path / "ddp.yaml", tiny_speech_data, tmp_path / "ddp",
                              max_steps=4, valid_every=4, log_every=1, ctc_warmup_steps=2)
    proc = _torchrun_train(cfg)
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert [r["step"] for r in _records(tmp_path / "ddp") if "valid_loss" in r] == [4]


def test_ddp_with_accumulation_equals_one_process(tiny_data, tmp_path):
    """2 processes x 2 accumulated batches = 1 process x 4 batches over the same global batches
    (rank r takes batches r, r + 2, ... of the epoch; one process takes them in order)."""
    # Attention key biases get gradients that are zero but for rounding, which Adam with a tiny
    # eps would turn into full-size steps; eps 1e-6 keeps rounding noise from deciding them.
    common = dict(max_steps=5, valid_every=5, log_every=1, valid_max_inputs=4, max_tokens=150,
                  eps=1e-6)
    one = write_config(tmp_path / "one.yaml", tiny_data, tmp_path / "one", accum_steps=4, **common)
    assert main(["train", str(one)]) == 0
    two = write_config(tmp_path / "two.yaml", tiny_data, tmp_path / "two", accum_steps=2, **common)
    _torchrun_train(two)
    a = load_file(str(checkpoint.resolve(tmp_path / "one", "last") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tmp_path / "two", "last") / "model.safetensors"))
    assert checkpoint.resolve(tmp_path / "two", "last").name == "step-0000005"
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a
              if not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5)}  # summation order only
    assert not differ, differ
    info_one = json.loads((checkpoint.resolve(tmp_path / "one", "last") / "trainer.json").read_text())
    info_two = json.loads((checkpoint.resolve(tmp_path / "two", "last") / "trainer.json").read_text())
    assert info_one["tokens_seen"] == info_two["tokens_seen"]


def test_two_nodes_rendezvous_rank_zero_writes_and_the_epoch_is_trained_once(tiny_data, tmp_path):
    """`torchrun --nnodes 2` on one machine: two launchers (one per "node", each in its own
    working directory with a relative train.run_dir) meet at a c10d rendezvous endpoint. Only
    rank 0 writes a run directory, and one epoch over the two ranks sees exactly the target
    tokens of one epoch trained by one process (no batch dropped or repeated)."""
    common = dict(max_steps=0, max_epochs=1, valid_every=1000, log_every=1, valid_max_inputs=4,
                  max_tokens=150)
    one = write_config(tmp_path / "one.yaml", tiny_data, tmp_path / "one", **common)
    assert main(["train", str(one)]) == 0
    cfg = write_config(tmp_path / "nodes.yaml", tiny_data, Path("run"), **common)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    nodes = []
    for node in range(2):
        (tmp_path / f"node{node}").mkdir()
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "encdec-test", "-m", "encdec.cli", "train",
             str(cfg)], cwd=tmp_path / f"node{node}", env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in nodes]
    assert all(proc.returncode == 0 for proc in nodes), "\n".join(o[-3000:] for o in outputs)
    written = [tmp_path / f"node{n}" / "run" for n in range(2)
               if (tmp_path / f"node{n}" / "run").exists()]
    assert len(written) == 1, written  # rank 0's node only
    assert (written[0] / "checkpoints" / "last").exists()
    assert "2 process(es)" in "".join(outputs)
    last = json.loads((checkpoint.resolve(written[0], "last") / "trainer.json").read_text())
    ref = json.loads((checkpoint.resolve(tmp_path / "one", "last") / "trainer.json").read_text())
    assert last["epoch"] == ref["epoch"] == 0 and last["batch_in_epoch"] > 0
    assert last["tokens_seen"] == ref["tokens_seen"]


def _trainer(tiny_data, tmp_path, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run", **train)
    cfg = Config.load(cfg_path, ["model.dropout=0.0"])
    return Trainer(cfg, log=lambda *a: None)


def test_gradient_accumulation_equals_one_big_batch(tiny_data, tmp_path):
    import numpy as np

    from encdec.data.dataset import BinarizedSplit, collate

    split = BinarizedSplit(tiny_data, "train")
    t1 = _trainer(tiny_data, tmp_path / "a")
    t2 = _trainer(tiny_data, tmp_path / "b")
    idx = np.arange(12)
    for t in (t1, t2):  # keep the gradients to compare them (Adam would amplify rounding noise)
        t.optimizer.step = lambda: None
        t.optimizer.zero_grad = lambda set_to_none=True: None
    loss1 = t1._train_step([collate(split, idx[:5]), collate(split, idx[5:])])[0]
    loss2 = t2._train_step([collate(split, idx)])[0]
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for (name, p1), p2 in zip(t1.model.named_parameters(), t2.model.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_early_stopping_and_time_budget(tiny_data, tmp_path):
    # With a vanishing learning rate the dev metric cannot improve: patience 1 stops at the
    # second validation.
    state = _trainer(tiny_data, tmp_path / "p", lr=1e-12, valid_every=3, patience=1,
                     max_steps=50, valid_max_inputs=5).fit()
    assert state["step"] == 6 and state["bad_validations"] == 1
    state = _trainer(tiny_data, tmp_path / "m", max_minutes=1e-6, max_steps=50).fit()
    assert state["step"] <= 1  # the budget is checked before every step


def _losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_resume_equals_uninterrupted(tiny_data, tmp_path, sig):
    import signal

    common = dict(valid_every=1000, log_every=1, valid_max_inputs=4)
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "part", max_steps=100_000,
                       **common)
    proc = run_in_background(["train", str(cfg)])
    wait_for_step(proc, tmp_path / "part", 5)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert f"encdec train {tmp_path / 'part'} --resume" in err and sig in err
    stopped = int(checkpoint.resolve(tmp_path / "part", "last").name.split("-")[1])
    assert stopped >= 5 and [s for s, _ in _losses(tmp_path / "part")] == list(range(1, stopped + 1))
    assert main(["train", str(tmp_path / "part"), "--resume", f"train.max_steps={stopped + 3}"]) == 0
    full = write_config(tmp_path / "f.yaml", tiny_data, tmp_path / "full", max_steps=stopped + 3,
                        **common)
    assert main(["train", str(full)]) == 0
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = load_file(str(checkpoint.resolve(tmp_path / "full", "last") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tmp_path / "part", "last") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_killed_run_resumes_without_repeating_metrics(tiny_data, tmp_path):
    import signal

    common = dict(valid_every=4, log_every=3, valid_max_inputs=4)
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "part", max_steps=100_000,
                       **common)
    proc = run_in_background(["train", str(cfg)])
    wait_for_step(proc, tmp_path / "part", 14)
    proc.send_signal(signal.SIGKILL)  # no chance to save: lines after the checkpoint remain
    proc.communicate(timeout=60)
    saved = int(checkpoint.resolve(tmp_path / "part", "last").name.split("-")[1])
    end = saved + 7
    assert main(["train", str(tmp_path / "part"), "--resume", f"train.max_steps={end}"]) == 0
    full = write_config(tmp_path / "f.yaml", tiny_data, tmp_path / "full", max_steps=end, **common)
    assert main(["train", str(full)]) == 0
    steps = [(r["step"], "loss" in r) for r in _records(tmp_path / "part")]
    assert len(steps) == len(set(steps))  # nothing repeated
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    valid = lambda d: [(r["step"], r["valid_loss"]) for r in _records(d) if "valid_loss" in r]
    assert valid(tmp_path / "part") == valid(tmp_path / "full")


KILL_INSIDE_SAVE = r"""
import sys, time
from pathlib import Path
import encdec.checkpoint as ck
from encdec.config import Config
from encdec.train import Trainer

run = Path(sys.argv[1])

def half_written(tensors, filename, **kw):  # write part of the file, then hang until killed
    Path(filename).write_bytes(b"\x00" * 1000)
    (run / "inside-save").touch()
    time.sleep(600)

ck.save_file = half_written
cfg = Config.load(run / "config.yaml", ["train.max_steps=610", "train.valid_every=10",
                                        f"train.run_dir={run}"])
Trainer(cfg, resume=True, log=lambda *a: None).fit()
"""


def test_a_write_killed_inside_save_checkpoint_keeps_the_last_good_one(tiny_run, tmp_path):
    import shutil
    import signal
    import time

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    good = checkpoint.resolve(run, "last")
    proc = subprocess.Popen([sys.executable, "-c", KILL_INSIDE_SAVE, str(run)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "inside-save").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run / "checkpoints" / ".tmp-step-0000610" / "model.safetensors").stat().st_size == 1000
    assert checkpoint.resolve(run, "last") == good and checkpoint.resolve(run, "best").exists()
    before = Translator.from_run(tiny_run, "last").translate(["abc", "hgfe"])
    assert Translator.from_run(run, "last").translate(["abc", "hgfe"]) == before
    cfg = Config.load(run / "config.yaml", ["train.max_steps=610", "train.valid_every=10",
                                            f"train.run_dir={run}"])
    state = Trainer(cfg, resume=True, log=lambda *a: None).fit()
    assert state["step"] == 610 and checkpoint.resolve(run, "last").name == "step-0000610"
    assert not (run / "checkpoints" / ".tmp-step-0000610").exists()


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_last_checkpoint(
        tiny_run, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    good = checkpoint.resolve(run, "last")

    def full_disk(tensors, filename, **kw):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code = main(["train", str(run), "--resume", "train.max_steps=610", "train.valid_every=10",
                 f"train.run_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-0000610'}" in err
    assert "No space left on device" in err and "MiB free" in err and "Traceback" not in err
    assert checkpoint.resolve(run, "last") == good
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == []
    Translator.from_run(run, "last")


def test_checkpoint_files_and_directories_are_flushed_before_the_rename(tiny_run, tmp_path,
                                                                      monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    events = []
    monkeypatch.setattr(checkpoint, "fsync_file", lambda p: events.append(("file", Path(p).name)))
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda p: events.append(("dir", Path(p).name)))
    real_replace = os.replace
    monkeypatch.setattr(checkpoint.os, "replace",
                        lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    tr = Translator.from_run(run, "last")
    from encdec.train import make_optimizer
    checkpoint.save_checkpoint(run, 700, tr.model, make_optimizer(tr.model, tr.cfg.train), {},
                               {"rng.0": torch.get_rng_state()}, is_best=False, keep=3)
    rename = events.index(("rename", "step-0000700"))
    flushed = {name for kind, name in events[:rename] if kind == "file"}
    assert flushed == {"model.safetensors", "trainer.safetensors", "trainer.json"}
    assert ("dir", ".tmp-step-0000700") in events[:rename]
    assert ("dir", "checkpoints") in events[rename:]


def test_max_epochs_trains_whole_epochs_and_not_a_step_more(tiny_data, tmp_path):
    from encdec.data.dataset import BinarizedSplit, token_batches

    split = BinarizedSplit(tiny_data, "train")
    per_epoch = len(token_batches(split.src_lens, split.tgt_lens, 400, seed=1, epoch=0))
    state = _trainer(tiny_data, tmp_path / "e1", max_steps=0, max_epochs=1, valid_every=1000,
                     valid_max_inputs=4).fit()
    assert state["step"] == per_epoch
    state = _trainer(tiny_data, tmp_path / "e2", max_steps=0, max_epochs=2, valid_every=1000,
                     valid_max_inputs=4).fit()
    second = len(token_batches(split.src_lens, split.tgt_lens, 400, seed=1, epoch=1))
    assert state["step"] == per_epoch + second


def test_evaluation_files_name_checkpoint_limit_and_data(tiny_run, tiny_data, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    assert main(["evaluate", str(run), "--beam", "2"]) == 0
    assert main(["evaluate", str(run), "--beam", "2", "--checkpoint", "last"]) == 0
    assert main(["evaluate", str(run), "--beam", "2", "--limit", "5"]) == 0
    assert main(["evaluate", str(run), "--beam", "2", "--data", str(tiny_data)]) == 0
    assert main(["evaluate", str(run), "--beam", "2", "--length-penalty", "0.6"]) == 0
    names = sorted(p.name for p in (run / "eval").glob("*.json"))
    assert names == ["test-beam2-first5.json", "test-beam2-last.json", "test-beam2-lp0.6.json",
                     "test-beam2.json"]
    assert json.loads((run / "eval" / "test-beam2-first5.json").read_text())["inputs"] == 5
    assert json.loads((run / "eval" / "test-beam2.json").read_text())["inputs"] == 40
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    assert main(["evaluate", str(run), "--beam", "2", "--data", str(other)]) == 0
    assert (run / "eval" / "test-beam2-data-other-data.json").exists()


def test_cli_refuses_more_outputs_than_greedy_gives(tiny_run, capsys):
    assert main(["translate", str(tiny_run), "--beam", "1", "--nbest", "2"]) == 2
    assert "decode.nbest=2 needs beam search" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--method", "greedy", "--limit", "2"]) == 0


def test_a_time_budgeted_schedule_decays_with_the_clock(tiny_data, tmp_path):
    """linear over max_minutes: each step's logged rate lies between the rates at the run's
    elapsed time before and after that step (the schedule's clock is kept in whole ms), and
    the run ends near the floor."""
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run", max_steps=0,
                       max_minutes=0.05, schedule="linear", warmup_steps=1, min_lr=0.0,
                       log_every=1, valid_every=100000)
    assert main(["train", str(cfg)]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if "tokens_per_s" in x]
    assert len(records) > 5
    budget, peak = 0.05 * 60, 3e-3
    for before, r in zip(records, records[1:]):
        assert peak * (1 - r["elapsed_s"] / budget) - 1e-9 <= r["lr"] <= \
            peak * (1 - (before["elapsed_s"] - 0.001) / budget) + 1e-9
    assert records[-1]["lr"] < 0.25 * peak


def test_weight_average_is_what_validation_and_checkpoints_use(tiny_data, tiny_run, tmp_path):
    """train.ema_decay: model.safetensors holds the average of the raw weights after each step,
    with the ramped decay; the raw weights ride in trainer.safetensors; validation scores the
    average; and a resumed run equals an uninterrupted one, average and raw weights alike."""
    decay = 0.5  # the ramp min(decay, (1 + n) / (10 + n)) is below it for the first 8 updates
    common = dict(max_steps=12, valid_every=1, log_every=1, valid_max_inputs=8, keep_checkpoints=20)
    full = write_config(tmp_path / "full.yaml", tiny_data, tmp_path / "full", **common)
    assert main(["train", str(full), f"train.ema_decay={decay}"]) == 0
    steps = sorted((tmp_path / "full" / "checkpoints").glob("step-*"))
    assert len(steps) == 12
    expected = None
    for n, ckpt in enumerate(steps):
        tensors, info = checkpoint.load_trainer_state(ckpt)
        raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}
        if expected is None:
            expected = {k: v.clone() for k, v in raw.items()}
        else:
            d = min(decay, (1 + n) / (10 + n))
            expected = {k: d * expected[k] + (1 - d) * raw[k] for k in raw}
        saved = load_file(str(ckpt / "model.safetensors"))
        assert set(saved) <= set(expected) and int(tensors["ema.n_averaged"]) == n + 1
        for key in saved:
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # an average, not a copy

    # validation scores the average: the dev loss of the saved weights, recomputed
    cfg = Config.load(tmp_path / "full" / "config.yaml")
    trainer = Trainer(cfg, resume=True, log=lambda *a: None)
    assert trainer.ema is not None
    valid = [r for r in _records(tmp_path / "full") if "valid_loss" in r]
    assert trainer.validate()["valid_loss"] == pytest.approx(valid[-1]["valid_loss"], rel=1e-6)
    checkpoint.load_weights(trainer.model, steps[-1])  # the average as the trained weights
    trainer.ema = None
    assert trainer.validate()["valid_loss"] == pytest.approx(valid[-1]["valid_loss"], rel=1e-6)
    # `encdec average --raw --last 1` takes the trained weights out as a checkpoint of their own
    assert main(["average", str(tmp_path / "full"), "--last", "1", "--raw"]) == 0
    checkpoint.load_weights(trainer.model, tmp_path / "full" / "checkpoints" / "raw-avg-last1")
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, raw[key], rtol=0, atol=0)
    assert trainer.validate()["valid_loss"] != pytest.approx(valid[-1]["valid_loss"], rel=1e-6)
    with pytest.raises(checkpoint.CheckpointError, match="without train.ema_decay"):
        checkpoint.raw_weights(checkpoint.resolve(tiny_run, "last"))

    part = write_config(tmp_path / "part.yaml", tiny_data, tmp_path / "part", **common)
    assert main(["train", str(part), f"train.ema_decay={decay}", "train.max_steps=5"]) == 0
    assert main(["train", str(tmp_path / "part"), "--resume", "train.max_steps=12"]) == 0
    losses = lambda d: [(r["step"], r.get("loss"), r.get("valid_loss")) for r in _records(d)]
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    for name in ("model.safetensors", "trainer.safetensors"):
        a = load_file(str(checkpoint.resolve(tmp_path / "full", "last") / name))
        b = load_file(str(checkpoint.resolve(tmp_path / "part", "last") / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_closed_pipe_ends_the_cli_quietly(tiny_run, tmp_path):
    """`encdec translate ... | head -1`: the reader goes away before the output is written;
    no traceback, the SIGPIPE exit status."""
    (tmp_path / "in.txt").write_text("abc\n" * 40000)  # outputs beyond a pipe's 64 KiB buffer
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(f"{sys.executable} -m encdec.cli translate {tiny_run} --method greedy "
                         f"-i {tmp_path / 'in.txt'} | true; exit ${{PIPESTATUS[0]}}", shell=True,
                         capture_output=True, text=True, env=env, executable="/bin/bash")
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode == 141
