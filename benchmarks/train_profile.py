"""Where one training step's time goes: data, forward by module, loss, backward by operator,
optimizer, and what is left (Python and framework overhead).

    python benchmarks/train_profile.py [--config configs/g2p-small.yaml] [--warmup 10]
                                       [--steps 30] [--threads 2] [--set KEY=VALUE ...]
                                       [--replay]

The trainer's own step (``Trainer._train_step``) runs on the batches ``train_speed.py`` times
(seed 1, epoch 0, the config's token budget), ``--warmup`` steps untimed, then ``--steps``
steps under ``torch.profiler`` (CPU). Forward time per top-level module (embeddings, each
layer, final norms, the output projection the loss calls) is its wall time between forward
hooks (CPU execution is synchronous). Backward and optimizer times are the profiler's
``autograd::engine`` and ``Optimizer.*`` ranges; the rest of the step is the loss, gradient
clipping and overhead. The matrix-multiply share is the self time of aten::mm/addmm/bmm/linear and the
attention kernel over the whole step; the rest of the operators are listed by self time.
Collation (data) is timed separately, as the trainer runs it before each step. Kernel CPU time
and minor page faults per step (``getrusage`` over the second half of the warm-up, outside the
profiler) show what the allocator costs: compare with ``--set train.retain_freed_memory=false``.

``--replay`` asks how close the step's matrix products run to this CPU's speed for the same
products alone: the profiler records each aten::mm/addmm/bmm call's shapes, and every shape is
run again by itself (random operands, each transpose layout, the fastest median of 5 kept: a
floor). It prints the products' time in the step against that floor, their FLOPs (2 M N K) as
GFLOP/s both ways, and the tokens/s a step would reach if nothing but these products took
time. Attention kernels (SDPA forward and backward) are reported as measured in the step.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.config import Config  # noqa: E402
from encdec.data.dataset import BinarizedSplit, collate, token_batches  # noqa: E402
from encdec.train import Trainer  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def module_timers(model: torch.nn.Module, totals: dict) -> list:
    """Forward wall time per top-level part: embeddings, each encoder and decoder layer, the
    final norms and the output projection (called by the loss)."""
    handles = []
    parts = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            parts += [(f"{name}.{i}", layer) for i, layer in enumerate(child)]
        else:
            parts.append((name, child))
    for name, module in parts:
        starts: list[float] = []
        handles.append(module.register_forward_pre_hook(
            lambda m, a, s=starts: s.append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, n=name, s=starts: totals.__setitem__(
                n, totals[n] + time.perf_counter() - s.pop())))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/g2p-small.yaml")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--replay", action="store_true",
                    help="time the step's matrix products alone, shape by shape (a floor)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. train.retain_freed_memory=false")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.load(args.config, [f"train.num_threads={args.threads}", "train.device=cpu",
                                        f"train.run_dir={tmp}/run", *args.set])
        split = BinarizedSplit(cfg.data.dir, "train")
        order = token_batches(split.src_lens, split.tgt_lens, cfg.train.max_tokens, seed=1,
                              epoch=0)[: args.warmup + args.steps]
        data_s = []
        batches = []
        for idx in order:
            start = time.perf_counter()
            batches.append(collate(split, idx))
            data_s.append(time.perf_counter() - start)
        trainer = Trainer(cfg, log=lambda *a: None, progress=False)
        trainer.model.train()
        # Kernel time and page faults over the warm-up's second half, outside the profiler
        # (whose own event buffers fault in pages of their own).
        half = args.warmup // 2
        for i, b in enumerate(batches[: args.warmup]):
            if i == half:
                usage0 = resource.getrusage(resource.RUSAGE_SELF)
            trainer._train_step([b])
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        usage_steps = max(1, args.warmup - half)
        forward = defaultdict(float)
        handles = module_timers(trainer.model, forward)
        steps_s, tokens = [], 0
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.replay) as prof:
            for b in batches[args.warmup:]:
                start = time.perf_counter()
                tokens += trainer._train_step([b])[2]
                steps_s.append(time.perf_counter() - start)
        for h in handles:
            h.remove()
    n = len(steps_s)
    step_ms = 1000 * sum(steps_s) / n
    events = prof.key_averages()
    by_name = {e.key: e for e in events}

    backward = sum(e.cpu_time_total for e in events
                   if e.key.startswith("autograd::engine::evaluate_function")) / 1000 / n
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.")) / 1000 / n
    modules_ms = {k: 1000 * v / n for k, v in forward.items()}
    model_fwd = sum(modules_ms.values())
    matmul = sum(by_name[k].self_cpu_time_total for k in MATMUL if k in by_name) / 1000 / n
    print(f"{args.config}: {cfg.model.enc_layers}+{cfg.model.dec_layers} x {cfg.model.d_model}, "
          f"{tokens / n:.0f} target tokens/step, {args.threads} threads, torch "
          f"{torch.__version__}; steps {args.warmup}-{args.warmup + n}, per step (mean of {n})")
    print("| part | ms/step | share |\n|---|---:|---:|")
    rows = [("data: collate (before the step)", 1000 * statistics.mean(data_s))]
    rows += [(f"forward: {k}", v) for k, v in modules_ms.items()]
    rows.append(("backward (autograd engine)", backward))
    rows.append(("optimizer (AdamW step, zero_grad)", optimizer))
    rows.append(("the rest: loss, gradient clipping, Python and framework overhead",
                 step_ms - model_fwd - backward - optimizer))
    for name, value in rows:
        print(f"| {name} | {value:.1f} | {100 * value / step_ms:.0f} % |")
    print(f"| **step** (wall) | {step_ms:.1f} | 100 % |")
    print(f"matrix multiplies (mm/addmm/bmm, attention kernels; self time): {matmul:.1f} ms/step = "
          f"{100 * matmul / step_ms:.0f} % of the step")
    print(f"kernel (system) CPU time {1000 * (usage1.ru_stime - usage0.ru_stime) / usage_steps:.1f} "
          f"ms/step, {(usage1.ru_minflt - usage0.ru_minflt) / usage_steps:,.0f} minor page "
          f"faults/step (warm-up steps {half}-{args.warmup}, without the profiler; "
          f"train.retain_freed_memory={cfg.train.retain_freed_memory})")
    print("top operators by self CPU time (ms/step):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.key:<60} {e.self_cpu_time_total / 1000 / n:7.2f}  x{e.count // n}")
    if args.replay:
        attention = sum(by_name[k].self_cpu_time_total for k in MATMUL[3:] if k in by_name)
        replay_products(prof, n, step_ms, tokens / n, attention / 1000 / n)


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def _operands(op: str, shapes: list, layout: tuple[bool, bool]):
    """Random operands for one recorded call; ``layout``: (first, second) stored transposed."""
    def make(shape, transposed):
        if not transposed:
            return torch.randn(shape)
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)

    if op == "aten::addmm":
        bias, a, b = shapes[:3]
        return (torch.randn(bias), make(a, layout[0]), make(b, layout[1]))
    a, b = shapes[:2]
    return (make(a, layout[0]), make(b, layout[1]))


def _flops(op: str, shapes: list) -> float:
    a, b = (shapes[1], shapes[2]) if op == "aten::addmm" else (shapes[0], shapes[1])
    batch = a[0] if op == "aten::bmm" else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def replay_products(prof, n: int, step_ms: float, tokens: float, attention_ms: float) -> None:
    fns = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::bmm": torch.bmm}
    in_step = floor = flops = 0.0
    calls = 0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in PRODUCTS or not e.input_shapes or any(not s for s in e.input_shapes[:2]):
            continue
        shapes = [list(s) for s in e.input_shapes]
        per_step = e.count / n
        best = float("inf")
        for layout in ((False, False), (False, True), (True, False), (True, True)):
            args = _operands(e.key, shapes, layout)
            fns[e.key](*args)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                fns[e.key](*args)
                times.append(time.perf_counter() - start)
            best = min(best, statistics.median(times))
        in_step += e.self_cpu_time_total / 1000 / n
        floor += 1000 * best * per_step
        flops += _flops(e.key, shapes) * per_step
        calls += per_step
    print(f"matrix products replayed alone ({calls:.0f} calls/step, {flops / 1e9:.1f} GFLOP/step): "
          f"{in_step:.1f} ms/step in the step ({flops / in_step / 1e6:.0f} GFLOP/s) vs "
          f"{floor:.1f} ms alone at the fastest layout ({flops / floor / 1e6:.0f} GFLOP/s): "
          f"the step runs them at {100 * floor / in_step:.0f} % of their own speed")
    print(f"the step is {step_ms:.1f} ms: products alone {100 * floor / step_ms:.0f} %, attention "
          f"kernels {attention_ms:.1f} ms ({100 * attention_ms / step_ms:.0f} %); if nothing but "
          f"the products (at their floor) and the attention kernels took time: "
          f"{1000 * tokens / (floor + attention_ms):,.0f} target tokens/s (this run under the "
          f"profiler: {1000 * tokens / step_ms:,.0f})")


if __name__ == "__main__":
    main()
