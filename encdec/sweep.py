"""`encdec sweep CONFIG --grid KEY=V1,V2 ... --seeds 1,2,3`: the best recipe for a budget.

Trains every combination of the grid's values, once per seed, for the same budget (wall-clock
minutes: what a user of this machine gets; or optimizer steps: the same work whatever the
machine's load), evaluates each run on a split, and writes one table:

* ``runs.csv``   one line per run: its setting, seed, steps, epochs, minutes, test scores
  (of the best checkpoint, and of the average of the last N with ``--average N``);
* ``results.md`` one line per setting, best first: the mean over the seeds with the range,
  and every seed's figure, so a lucky run shows as one;
* ``plot.png``   every run's dev curve against training minutes, one colour per setting.

``jobs`` > 1 (``--jobs 2``) trains that many runs at once, each in a process of its own.

Every run keeps its own directory (``OUT/SETTING/seed-N``, with its config and curve). The
sweep can be stopped and started again: a finished run is read back, not trained again, and a
run stopped half way (Ctrl-C saves a checkpoint) continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from pathlib import Path

from encdec.config import Config, ConfigError, apply_override
from encdec.files import atomic_write_text
from encdec.workers import run_tasks, threads_per_job

LOWER_IS_BETTER = {"wer", "per", "cer"}


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=1e-3,2e-3", "augment.vtlp=[0.9,1.1],[0.8,1.2]"]`` -> keys with their values
    (commas inside brackets belong to the value)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,...")
        parts, depth, cur = [], 0, ""
        for ch in values:
            depth += (ch in "[(") - (ch in "])")
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        if any(not p.strip() for p in parts):
            raise ConfigError(f"--grid {item!r}: an empty value")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice")
        grid.append((key, [p.strip() for p in parts]))
    return grid


def settings(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in the order given (the first key slowest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def setting_name(setting: dict[str, str]) -> str:
    """A readable directory name: ``lr-0.002_schedule-cosine`` (the keys' last parts, unless two
    share one)."""
    if not setting:
        return "base"
    short = [k.rsplit(".", 1)[-1] for k in setting]
    names = short if len(set(short)) == len(short) else [k.replace(".", "-") for k in setting]
    clean = lambda v: "".join(c if c.isalnum() or c in ".-" else "-" for c in v).strip("-")  # noqa: E731
    return "_".join(f"{n}-{clean(v)}" for n, v in zip(names, setting.values()))


def run_sweep(config: str, out_dir: str | Path, grid: list[tuple[str, list[str]]],
              seeds: list[int], *, minutes: float | None = None, steps: int | None = None,
              overrides: list[str] | None = None, average: int = 0, split: str = "test",
              decode: dict | None = None, jobs: int = 1, log=print) -> list[dict]:
    """Train and evaluate every setting x seed (skipping finished runs); write the table.

    ``jobs`` > 1 trains that many runs at once, each in its own process on
    cores / ``jobs`` threads (unless the config sets train.num_threads): on a 2-core CPU two
    one-thread runs side by side do more work in all than one two-thread run."""
    import yaml

    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds}: give distinct seeds")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be at least 1")
    out = Path(out_dir)
    base = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    for item in overrides or []:
        apply_override(base, item)
    decode = {k: v for k, v in (decode or {}).items() if v is not None}
    threads = threads_per_job(base, jobs)
    combos = settings(grid)
    rows: dict[tuple[str, int], dict] = {}
    pending = []  # (name, seed, setting, raw config, run directory)
    for setting in combos:
        name = setting_name(setting)
        for seed in seeds:
            run_dir = out / name / f"seed-{seed}"
            done = run_dir / "sweep.json"
            if done.exists():
                rows[name, seed] = json.loads(done.read_text(encoding="utf-8"))
                log(f"== {name}, seed {seed}: finished earlier ({done})")
                continue
            raw = json.loads(json.dumps(base))  # a deep copy
            for key, value in setting.items():
                apply_override(raw, f"{key}={value}")
            t = raw.setdefault("train", {})
            t.update(run_dir=str(run_dir), seed=seed)
            if threads:
                t["num_threads"] = threads
            if minutes is not None:
                t["max_minutes"] = minutes
            if steps is not None:  # a step budget alone, unless minutes are given too
                t["max_steps"] = steps
                t["max_minutes"] = minutes or 0
            if average:
                t["keep_checkpoints"] = max(int(t.get("keep_checkpoints", 3)), average)
            cfg = Config.from_dict(raw, source=f"{config} [{name}, seed {seed}]")
            if not (cfg.train.max_minutes or cfg.train.max_steps or cfg.train.max_epochs):
                raise ConfigError(f"{config}: no budget; give --minutes or --steps")
            pending.append((name, seed, setting, raw, run_dir))

    def started(i) -> None:
        name, seed, _, _, run_dir = pending[i]
        resume = (run_dir / "checkpoints" / "last").exists()
        log(f"== {name}, seed {seed}: {'continuing' if resume else 'training'} ({run_dir})")

    def finished(i, row) -> None:
        rows[pending[i][:2]] = row
        log("   " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "decode"))

    tasks = [(raw, f"{config} [{name}, seed {seed}]", {"setting": name, **setting, "seed": seed},
              split, decode, average, threads) for name, seed, setting, raw, _ in pending]
    run_tasks(train_and_score, tasks, jobs, started, finished)
    ordered = [rows[setting_name(s), seed] for s in combos for seed in seeds]
    write_tables(out, ordered, [k for k, _ in grid], minutes, steps, split, average)
    return ordered


def train_and_score(raw: dict, source: str, row: dict, split: str, decode: dict, average: int,
                    threads: int = 0) -> dict:
    """One run of a sweep: train (or continue) the config ``raw``, score it on ``split`` (and
    the average of its last ``average`` checkpoints), record it in RUN/sweep.json; ``row``
    holds the run's setting and seed. ``threads``: torch's threads in this process."""
    import torch

    from encdec.checkpoint import average_checkpoints
    from encdec.evaluate import evaluate
    from encdec.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = Config.from_dict(raw, source=source)
    run_dir = Path(cfg.train.run_dir)
    resume = (run_dir / "checkpoints" / "last").exists()
    state = train(cfg, resume=resume, log=lambda *a: None, progress=False)
    row = {**row, "steps": state["step"], "epochs": state["epoch"],
           "train_min": round(state["elapsed"] / 60, 1)}
    result = evaluate(run_dir, split=split, **decode)
    row.update(metric=result["metric"], **_scores(result, split))
    if average:
        average_checkpoints(run_dir, average)  # replaces an earlier average only
        avg = evaluate(run_dir, split=split, checkpoint_name=f"avg-last{average}", **decode)
        row.update(_scores(avg, f"{split}_avg{average}"))
    row["decode"] = {k: v for k, v in result["decode"].items()
                     if k in ("method", "beam_size", "length_penalty")}
    atomic_write_text(run_dir / "sweep.json", json.dumps(row, indent=2) + "\n")
    return row


def _scores(result: dict, prefix: str) -> dict:
    return {f"{prefix}_{k}": round(v, 2) for k, v in result["scores"].items()
            if isinstance(v, float)}


def _headline(rows: list[dict], split: str) -> str:
    """The score the table ranks by: WER for G2P and speech recognition, BLEU for text."""
    for key in ("wer", "bleu"):
        if f"{split}_{key}" in rows[0]:
            return key
    raise ConfigError(f"no {split} WER or BLEU in the sweep's results")


def write_tables(out: Path, rows: list[dict], keys: list[str],
                 minutes: float | None, steps: int | None, split: str, average: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "decode"))
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)

    metric = _headline(rows, split)
    lower = metric in LOWER_IS_BETTER
    columns = [f"{split}_{metric}"] + ([f"{split}_avg{average}_{metric}"] if average else [])
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)

    def summary(runs: list[dict], col: str) -> tuple[float, str]:
        vals = [r[col] for r in runs]
        mean = statistics.fmean(vals)
        spread = f" ({min(vals):.2f}–{max(vals):.2f})" if len(vals) > 1 else ""
        return mean, f"{mean:.2f}{spread}"

    ranked = sorted(by_setting.items(), key=lambda kv: summary(kv[1], columns[0])[0] *
                    (1 if lower else -1))
    budget = " and ".join(([f"{minutes:g} min"] if minutes else []) +
                          ([f"{steps} steps"] if steps else [])) or "the config's budget"
    decode = rows[0].get("decode", {})
    how = decode.get("method", "")
    how += f" {decode['beam_size']}" if how == "beam" else ""
    head = ["setting", *keys, "seeds", "steps", "minutes",
            *(f"{c.replace('_', ' ')} mean (range)" for c in columns), f"per seed ({columns[0]})"]
    lines = [f"# sweep: {budget} per run, {split} split, {how}; "
             f"{'lower' if lower else 'higher'} {metric.upper()} is better, best first", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in ranked:
        cells = [name, *(str(runs[0].get(k, "")) for k in keys), str(len(runs)),
                 f"{statistics.fmean(r['steps'] for r in runs):.0f}",
                 f"{statistics.fmean(r['train_min'] for r in runs):.1f}",
                 *(summary(runs, c)[1] for c in columns),
                 ", ".join(f"{r[columns[0]]:.2f}" for r in sorted(runs, key=lambda r: r["seed"]))]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(out, rows, metric, [name for name, _ in ranked])


def _plot(out: Path, rows: list[dict], metric: str, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(order):
        for j, r in enumerate(x for x in rows if x["setting"] == name):
            path = out / name / f"seed-{r['seed']}" / "metrics.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()]
            pts = [(rec["elapsed_s"] / 60, rec[f"valid_{metric}"]) for rec in records
                   if f"valid_{metric}" in rec]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                    color=colours[i % len(colours)], label=name if j == 0 else None)
    ax.set_xlabel("training minutes")
    ax.set_ylabel(f"dev {metric.upper()} (greedy)")
    ax.set_title("sweep: dev curves, one colour per setting")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=100)
    plt.close(fig)
