"""Peak memory and step time of CPU training under each C allocator (glibc's malloc, tcmalloc).

    python benchmarks/allocator_memory.py [--config configs/asr-small.yaml] [--steps 120]
                                          [--warmup 10] [--repeats 2]
                                          [--allocators system,tcmalloc] [overrides...]

A C allocator is fixed when a process starts, so every run is a fresh process (this script
with ``--child``): ``system`` with the environment as it is, ``tcmalloc`` with the library
``encdec.host.find_tcmalloc`` finds in ``LD_PRELOAD``, as ``encdec train`` does for audio data
(``train.allocator``). Runs alternate (system, tcmalloc, tcmalloc, system, ...).

Each run builds the trainer for the config (a temporary run directory) and takes ``--steps``
optimizer steps on the config's own batches from the start of epoch 0, with the trainer's own
calls: ``_next_batches`` (collation and augmentation), ``_train_step``, and under glibc
``trim_heap`` every ``train.trim_every`` steps, as ``Trainer.fit`` does. Then one validation
(``Trainer.validate``: dev loss, greedy and CTC decoding). By default augmentation starts at
step 0 and the CTC warm-up is off (``augment.start_step=0 train.ctc_warmup_steps=0``, before
the overrides), so every step is a full step of the preset's later hour.

Printed per run and as medians: the peak resident memory (VmHWM) of the training steps and of
the validation (the high-water mark is reset between the two), the median seconds per step
after ``--warmup`` steps (the step alone, without collation), minor page faults per step, and
the wall time of the steps with collation and trimming. Linux only (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL_STEPS = ["augment.start_step=0", "train.ctc_warmup_steps=0"]


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> None:
    from encdec.config import Config
    from encdec.host import allocator, trim_heap
    from encdec.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.load(args.config, [f"train.run_dir={tmp}/run", "train.max_minutes=0"]
                          + FULL_STEPS + args.overrides)
        trainer = Trainer(cfg, log=lambda *a, **k: None, progress=False)
        trainer._batches = trainer._epoch_batches(0)
        trainer.model.train()
        every = trainer._trim_every
        step_s, faults = [], []
        _reset_hwm()
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            batches = trainer._next_batches()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            trainer._train_step(batches)
            step_s.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if every and i % every == 0:
                trim_heap()
        wall = time.perf_counter() - start
        train_peak = _hwm_mb()
        if every:
            trim_heap()
        _reset_hwm()
        trainer.validate()
        valid_peak = _hwm_mb()
        timed = step_s[args.warmup:]
        print(json.dumps({"allocator": allocator(), "train_peak_mb": train_peak,
                          "valid_peak_mb": valid_peak, "step_s": statistics.median(timed),
                          "faults_per_step": statistics.median(faults[args.warmup:]),
                          "wall_s": wall, "trim_every": every}))


def run_one(name: str, args) -> dict:
    env = dict(os.environ)
    if name == "tcmalloc":
        from encdec.host import find_tcmalloc

        lib = find_tcmalloc()
        if lib is None:
            sys.exit("no tcmalloc installed (Debian: libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--steps",
           str(args.steps), "--warmup", str(args.warmup), *args.overrides]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        sys.exit(f"{name} run failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if result["allocator"] != name:
        sys.exit(f"asked for {name}, the run had {result['allocator']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/asr-small.yaml")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--allocators", default="system,tcmalloc")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = ap.parse_args()
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")
    if args.child:
        return child(args)
    names = args.allocators.split(",")
    results: dict[str, list[dict]] = {n: [] for n in names}
    print(f"{args.config} {' '.join(FULL_STEPS + args.overrides)}: {args.steps} steps "
          f"({args.warmup} untimed), then one validation; {args.repeats} runs each", flush=True)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            res = run_one(name, args)
            results[name].append(res)
            print(f"  run {r + 1} {name:<9} training peak {res['train_peak_mb']:7,.0f} MB, "
                  f"validation peak {res['valid_peak_mb']:7,.0f} MB, {res['step_s']:.3f} s/step, "
                  f"{res['faults_per_step']:,.0f} page faults/step, {res['wall_s']:.1f} s",
                  flush=True)
    print("\nmedians:")
    base = None
    for name in names:
        rs = results[name]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("train_peak_mb", "valid_peak_mb", "step_s", "faults_per_step", "wall_s")}
        base = base or med
        print(f"  {name:<9} training peak {med['train_peak_mb']:7,.0f} MB "
              f"({med['train_peak_mb'] / base['train_peak_mb']:.2f}x), validation peak "
              f"{med['valid_peak_mb']:7,.0f} MB, {med['step_s']:.3f} s/step "
              f"({med['step_s'] / base['step_s']:.2f}x), {med['faults_per_step']:,.0f} page "
              f"faults/step, wall {med['wall_s']:.1f} s ({med['wall_s'] / base['wall_s']:.2f}x)")


if __name__ == "__main__":
    main()
