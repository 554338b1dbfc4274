"""The allocator setting for CPU training (encdec/host.py): freed buffers are reused."""

import json
import os
import subprocess
import sys

import pytest

from conftest import needs_system
from encdec import host

# Trains a small MLP (64 MiB activations, above glibc's largest dynamic mmap threshold) and counts the page faults per step once warm: without
# the setting, glibc returns the large buffers to the kernel on free and every step faults
# them in again page by page; with it, the buffers stay in the heap and are reused.
_PROBE = r"""
import json, resource, sys
import torch
from encdec.host import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] != "off" else False
if sys.argv[1] == "applied":
    print(json.dumps({"applied": applied}))
    sys.exit()
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 16))
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(16384, 16)
def step():
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in host._ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env={**base, **(env or {})})
    return json.loads(out.stdout)


@pytest.mark.skipif(host._glibc() is None, reason="glibc's mallopt only exists on Linux/glibc")
def test_freed_buffers_are_reused_without_page_faults():
    off = _probe("off")
    on = _probe("on")
    assert on["applied"] is True
    assert off["faults"] > 20000  # measured 50-70k per step: the buffers come back page by page
    assert on["faults"] * 10 < off["faults"]  # measured 0-2,500


@pytest.mark.skipif(host._glibc() is None, reason="glibc's mallopt only exists on Linux/glibc")
def test_user_allocator_settings_are_left_alone():
    got = _probe("applied", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert got["applied"] is False


def test_trainer_keeps_freed_memory_for_text_data_only(tiny_data, tiny_speech_data, tmp_path,
                                                       monkeypatch):
    """Audio batches change shape too much for a heap that keeps every freed block (an
    asr-small hour grew to 6.2 GB): the trainer asks for the setting on text data only."""
    from conftest import write_config, write_speech_config
    from encdec import train
    from encdec.cli import main

    calls = []
    monkeypatch.setattr(train, "retain_freed_memory", lambda: calls.append(1) or True)
    text = write_config(tmp_path / "text.yaml", tiny_data, tmp_path / "text", max_steps=1)
    assert main(["train", str(text)]) == 0
    assert calls == [1]
    speech = write_speech_config(tmp_path / "speech.yaml", tiny_speech_data, tmp_path / "speech",
                                 max_steps=1, valid_every=1)
    assert main(["train", str(speech)]) == 0
    assert calls == [1]


# Fills glibc's heap with 100 KB blocks (below the mmap threshold), frees every other one, so the
# free pages sit between live blocks where trimming the heap's top cannot reach them, and reads
# the resident memory before and after trim_heap().
_TRIM_PROBE = r"""
import json, sys
import torch
from encdec.host import resident_mb as rss_mb, trim_heap
blocks = [torch.ones(25_000) for _ in range(4_000)]  # 400 MB, every page touched
del blocks[::2]
before = rss_mb()
trimmed = trim_heap() if sys.argv[1] == "trim" else False
print(json.dumps({"trimmed": trimmed, "before": before, "after": rss_mb()}))
"""


def _trim_probe(mode: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in host._ENV}
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE, mode], capture_output=True,
                         text=True, check=True, env=base)
    return json.loads(out.stdout)


@pytest.mark.skipif(host._glibc() is None or not os.path.exists("/proc/self/statm"),
                    reason="malloc_trim and /proc/self/statm exist on Linux/glibc only")
def test_trim_heap_hands_back_the_pages_of_free_blocks_between_live_ones():
    kept = _trim_probe("keep")
    trimmed = _trim_probe("trim")
    assert trimmed["trimmed"] is True
    assert kept["before"] > 350 and trimmed["before"] > 350  # the 400 MB were resident
    assert kept["before"] - kept["after"] < 20  # freeing alone hands nothing back
    assert trimmed["before"] - trimmed["after"] > 150  # the ~200 MB of freed blocks


def test_trainer_trims_the_heap_between_steps_for_audio_data_only(tiny_data, tiny_speech_data,
                                                                  tmp_path, monkeypatch):
    from conftest import write_config, write_speech_config
    from encdec import train
    from encdec.cli import main

    calls = []
    monkeypatch.setattr(train, "trim_heap", lambda: calls.append(1) or True)
    text = write_config(tmp_path / "text.yaml", tiny_data, tmp_path / "text", max_steps=4)
    assert main(["train", str(text)]) == 0
    assert calls == []
    speech = write_speech_config(tmp_path / "speech.yaml", tiny_speech_data, tmp_path / "speech",
                                 max_steps=6, valid_every=6, trim_every=2)
    assert main(["train", str(speech)]) == 0
    assert len(calls) == 3 + 1  # after steps 2, 4 and 6, and after the validation at step 6
    # each logged step records the resident memory now beside the peak so far
    records = [json.loads(line) for line in
               (tmp_path / "speech" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert logged and all(0 < r["rss_mb"] <= r["max_rss_mb"] + 1 for r in logged)
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    assert abs(host.resident_mb() - now) < 50
    calls.clear()
    off = write_speech_config(tmp_path / "off.yaml", tiny_speech_data, tmp_path / "off",
                              max_steps=2, valid_every=2, trim_every=0)
    assert main(["train", str(off)]) == 0
    assert calls == []


# ---- the C allocator `encdec train` runs with (train.allocator) ---------------------------

_TCMALLOC = host.find_tcmalloc()
needs_tcmalloc = needs_system([] if _TCMALLOC else ["libtcmalloc-minimal4"],
                              "training on audio data with tcmalloc")

# Prints the allocator serving it, its pid, arguments and LD_PRELOAD, then asks to be re-run
# with tcmalloc and prints what the call returned (only where it did not re-execute).
_REEXEC_PROBE = r"""
import json, os, sys
from encdec import host
print(json.dumps({"allocator": host.allocator(), "pid": os.getpid(), "args": sys.argv[1:],
                  "preload": os.environ.get("LD_PRELOAD", "")}), flush=True)
print(json.dumps({"returned": host.reexec_with_tcmalloc()}), flush=True)
"""


def _run_probe(tmp_path, env: dict) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(_REEXEC_PROBE)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host.REEXEC_MARK)}
    out = subprocess.run([sys.executable, str(script), "a b", "--c"], capture_output=True,
                         text=True, check=True, env={**base, **env})
    return [json.loads(line) for line in out.stdout.splitlines()]


@needs_tcmalloc
def test_allocator_names_what_serves_the_process(tmp_path):
    plain = _run_probe(tmp_path, {host.REEXEC_MARK: "1"})  # the mark: no re-execution
    assert plain[0]["allocator"] == "system"
    assert plain[1]["returned"].startswith("re-executed once already")
    preloaded = _run_probe(tmp_path, {"LD_PRELOAD": _TCMALLOC})
    assert preloaded[0]["allocator"] == "tcmalloc"
    assert preloaded[1]["returned"] == "tcmalloc already serves this process"


@needs_tcmalloc
def test_reexec_with_tcmalloc_keeps_the_process_its_arguments_and_preloads(tmp_path):
    lines = _run_probe(tmp_path, {"LD_PRELOAD": "libm.so.6"})
    first, second, last = lines  # the probe ran twice: before and after the re-execution
    assert first["allocator"] == "system" and second["allocator"] == "tcmalloc"
    assert first["pid"] == second["pid"]  # replaced in place, not a child process
    assert first["args"] == second["args"] == ["a b", "--c"]
    assert second["preload"] == f"{_TCMALLOC}:libm.so.6"  # the user's preloads stay
    assert last["returned"] == "tcmalloc already serves this process"


def test_reexec_reports_a_missing_tcmalloc_without_replacing_the_process(monkeypatch):
    monkeypatch.setattr(host, "find_tcmalloc", lambda: None)
    monkeypatch.delenv(host.REEXEC_MARK, raising=False)
    if host.allocator() != "system":
        pytest.skip("this test process runs with another allocator")
    assert host.reexec_with_tcmalloc() == "no tcmalloc installed (Debian: libtcmalloc-minimal4)"


def test_tcmalloc_is_wanted_for_audio_data_on_the_cpu(tiny_data, tiny_speech_data, tmp_path,
                                                      monkeypatch):
    from conftest import write_config, write_speech_config
    from encdec.config import Config
    from encdec.train import wants_tcmalloc

    monkeypatch.setattr("encdec.train.allocator", lambda: "system")
    text = write_config(tmp_path / "text.yaml", tiny_data, tmp_path / "text")
    speech = write_speech_config(tmp_path / "speech.yaml", tiny_speech_data, tmp_path / "speech")
    assert wants_tcmalloc(Config.load(speech, ["train.device=cpu"]))
    assert not wants_tcmalloc(Config.load(text, ["train.device=cpu"]))
    assert wants_tcmalloc(Config.load(text, ["train.allocator=tcmalloc"]))
    assert not wants_tcmalloc(Config.load(speech, ["train.allocator=system"]))
    assert not wants_tcmalloc(Config.load(speech, ["train.device=cuda"]))
    monkeypatch.setattr("encdec.train.allocator", lambda: "tcmalloc")  # already there
    assert not wants_tcmalloc(Config.load(speech, ["train.device=cpu"]))
    with pytest.raises(Exception, match="train.allocator='jemalloc': must be auto, tcmalloc or"):
        Config.load(speech, ["train.allocator=jemalloc"])


def test_train_says_when_it_cannot_have_tcmalloc(tiny_data, tiny_speech_data, tmp_path,
                                                 monkeypatch, capsys):
    import argparse

    from conftest import write_config, write_speech_config
    from encdec import cli
    from encdec.config import ConfigError

    monkeypatch.setattr("encdec.train.allocator", lambda: "system")
    monkeypatch.setattr(host, "reexec_with_tcmalloc", lambda: "no tcmalloc installed (Debian: "
                                                              "libtcmalloc-minimal4)")
    speech = write_speech_config(tmp_path / "speech.yaml", tiny_speech_data, tmp_path / "speech",
                                 max_steps=1, valid_every=1, device="cpu")

    def train(config, *overrides):
        cli._train(argparse.Namespace(config=str(config), overrides=list(overrides),
                                      resume=False, own_process=True))

    train(speech)  # auto: trains with glibc's malloc, and says so on stderr
    assert "training with the C library's malloc (no tcmalloc installed" in capsys.readouterr().err
    assert (tmp_path / "speech" / "checkpoints" / "last").exists()
    with pytest.raises(ConfigError, match="train.allocator=tcmalloc: no tcmalloc installed"):
        train(speech, "train.allocator=tcmalloc", f"train.run_dir={tmp_path / 'asked'}")
    text = write_config(tmp_path / "text.yaml", tiny_data, tmp_path / "text", max_steps=1,
                        device="cpu")
    train(text)  # text data: nothing to say
    assert "malloc" not in capsys.readouterr().err


@needs_tcmalloc
def test_encdec_train_runs_audio_data_with_tcmalloc(tiny_data, tiny_speech_data, tmp_path):
    from conftest import write_config, write_speech_config

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host.REEXEC_MARK)}

    def train(config, *overrides) -> str:
        out = subprocess.run([sys.executable, "-m", "encdec.cli", "train", str(config),
                              "train.device=cpu", *overrides], capture_output=True, text=True,
                             env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout + out.stderr

    speech = write_speech_config(tmp_path / "speech.yaml", tiny_speech_data, tmp_path / "speech",
                                 max_steps=2, valid_every=2)
    assert "device cpu, allocator tcmalloc" in train(speech)
    assert "device cpu, allocator system" in train(speech, "train.allocator=system",
                                                   f"train.run_dir={tmp_path / 'system'}")
    text = write_config(tmp_path / "text.yaml", tiny_data, tmp_path / "text", max_steps=2)
    assert "device cpu, allocator system" in train(text)
