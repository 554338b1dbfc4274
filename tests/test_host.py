"""The allocator setting for CPU training (encdec/host.py): freed buffers are reused."""

import json
import os
import subprocess
import sys

import pytest

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
