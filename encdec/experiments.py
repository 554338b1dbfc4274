"""`encdec experiment NAME`: claims about sequence models, checked on real data in one command.

Each experiment trains a few variants of a base config (``configs/g2p-small.yaml`` on the
``g2p-cmudict`` recipe by default) for the same budget with the same seed, evaluates each on
the test split, and writes ``results.csv``, ``results.md`` and ``plot.png`` (dev metric against
training time or steps; for ``sampling`` also the error rate by output position). The budget is
either wall-clock minutes per variant (``--minutes``: what a user with this machine gets, but
it moves with the machine's load) or optimizer steps (``--steps``: the same work for each
variant, and a rerun on the same machine and thread count gives the same numbers). With
``--seeds 1,2,3`` every variant trains once per seed and the table gives each variant's mean
and range; ``--jobs N`` trains N models at once, each in its own process.

The same command started again continues where it stopped, so a budget longer than one
sitting (the claims at convergence) can be trained in parts: a finished model is read back and
scored, a half-trained one continues from its last checkpoint (exact resume: the same model an
uninterrupted run trains). A model started with other settings than the command now gives is
refused, naming them; only the budget may grow (``--steps``, ``--minutes``), and not under a
schedule that decays over the budget.

* ``depth``    deep-thin (2L layers) vs shallow-wide (2L/3 layers) at the base's parameter count
* ``norm``     post-LN vs pre-LN vs pre-BatchNorm (statistics over real positions)
* ``sampling`` teacher forcing vs scheduled sampling (inverse-sigmoid, two-pass); with
  ``from_run`` (``--from RUN``) both continue a trained run for ``steps`` more steps, the
  schedule starting from zero at its last step: scheduled sampling from a trained model
* ``rnn``      the Transformer vs an LSTM with attention of the same parameter count
* ``nat``      AT beam/greedy vs NAT on original and distilled targets, speed at batch 1 and 64,
  and NAT outputs that mix two references or repeat a token (``encdec/experiment_nat.py``);
  ``--from RUN`` takes a trained AT run instead of training one
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from encdec.config import Config, apply_override


def count_parameters(cfg: Config, src_vocab: int, tgt_vocab: int) -> int:
    from encdec.models import build_model

    model = build_model(cfg.model, src_vocab, tgt_vocab)
    return sum(p.numel() for p in model.parameters())


def match_width(raw: dict, target: int, src_vocab: int, tgt_vocab: int, step: int) -> dict:
    """``raw`` with the d_model (and ffn_dim = 4 d_model) whose parameter count is closest to
    ``target``; d_model runs over multiples of ``step``."""
    best = None
    for d in range(step, 2049, step):
        trial = json.loads(json.dumps(raw))
        trial["model"].update(d_model=d, ffn_dim=4 * d)
        n = count_parameters(Config.from_dict(trial), src_vocab, tgt_vocab)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (trial, n)
        if n > target:
            break
    return best[0]


SS_MAX_PROB = 0.25


def inverse_sigmoid_k(step: float, max_prob: float) -> float:
    """The inverse-sigmoid ``k`` whose sampling probability 1 - k / (k + exp(step / k)) reaches
    ``max_prob`` at ``step``: the root of step = k ln(k p / (1 - p)), by bisection."""
    ratio = max_prob / (1.0 - max_prob)
    lo, hi = max(2.0, 1.0 / ratio), 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid * math.log(mid * ratio) < step else (lo, mid)
    return lo


def _variants(name: str, base: dict, src_vocab: int, tgt_vocab: int,
              steps: int | None = None, start_step: int = 0) -> dict[str, dict]:
    m = base["model"]
    base_params = count_parameters(Config.from_dict(base), src_vocab, tgt_vocab)
    layers = max(m.get("enc_layers", 3), 1)
    heads = m.get("n_heads", 4)

    def variant(**sections) -> dict:
        raw = json.loads(json.dumps(base))
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw

    if name == "depth":
        deep, wide = 2 * layers, max(1, (2 * layers) // 3)
        return {
            f"deep-thin {deep}+{deep}": match_width(
                variant(model={"enc_layers": deep, "dec_layers": deep}), base_params,
                src_vocab, tgt_vocab, 2 * heads),
            f"shallow-wide {wide}+{wide}": match_width(
                variant(model={"enc_layers": wide, "dec_layers": wide}), base_params,
                src_vocab, tgt_vocab, 2 * heads),
        }
    if name == "norm":
        return {"post-LN": variant(model={"norm": "post", "norm_type": "layernorm"}),
                "pre-LN": variant(model={"norm": "pre", "norm_type": "layernorm"}),
                "pre-BatchNorm": variant(model={"norm": "pre", "norm_type": "batchnorm"})}
    if name == "sampling":
        # With a step budget the schedule is scaled to it: sampling reaches its cap 40 % in
        # (40 % into the continuation of a trained run, whose step start_step is the
        # schedule's zero).
        k = inverse_sigmoid_k(0.4 * steps, SS_MAX_PROB) if steps else 300.0
        return {"teacher forcing": variant(train={"scheduled_sampling": "off"}),
                "scheduled sampling": variant(train={"scheduled_sampling": "inverse_sigmoid",
                                                     "ss_k": round(k, 1),
                                                     "ss_max_prob": SS_MAX_PROB,
                                                     "ss_start_step": start_step})}
    if name == "rnn":
        lstm = variant(model={"arch": "lstm", "enc_layers": 2, "dec_layers": 2,
                              "rnn_attention": "luong"})
        return {"transformer": variant(),
                "lstm": match_width(lstm, base_params, src_vocab, tgt_vocab, 2)}
    raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")


# name -> number of variants (models trained)
EXPERIMENTS = {"depth": 2, "norm": 3, "sampling": 2, "rnn": 2, "nat": 3}


def error_by_position(hyps: list[str], refs: list[list[str]], max_pos: int = 20) -> list[float]:
    """Per output position i: the share of outputs whose token i differs from token i of the
    closest reference (a missing token counts as wrong), over outputs whose reference has one."""
    from encdec.metrics import edit_distance

    wrong = [0] * max_pos
    total = [0] * max_pos
    for hyp, ref_list in zip(hyps, refs):
        h = hyp.split()
        ref = min((r.split() for r in ref_list), key=lambda r: edit_distance(h, r))
        for i in range(min(len(ref), max_pos)):
            total[i] += 1
            wrong[i] += i >= len(h) or h[i] != ref[i]
    return [100.0 * w / t if t else float("nan") for w, t in zip(wrong, total)]


def _last_step(run: Path) -> int:
    from encdec import checkpoint

    return int(checkpoint.trainer_info(checkpoint.resolve(run, "last"))["step"])


def _continued_copy(run: Path, dest: Path) -> None:
    """Copy the run directory ``run`` with its last checkpoint only, to continue it in
    ``dest`` (a copy left by an interrupted experiment is kept, and continued)."""
    import shutil

    from encdec import checkpoint

    last = checkpoint.resolve(run, "last")
    if not (dest / "checkpoints" / "last").exists():
        keep = {last.name, "last"}
        shutil.copytree(run, dest, dirs_exist_ok=True, ignore=lambda d, names: [
            n for n in names if Path(d) == run / "checkpoints" and n not in keep] + [
            n for n in names if Path(d) == run and n == "eval"])
        (dest / "checkpoints" / "best").write_text(last.name + "\n", encoding="utf-8")


# What may differ between a model's first start and its continuation: the budget (and the
# validation interval derived from it), the thread count, where the run lives.
_BUDGET_KEYS = {("train", "max_steps"), ("train", "max_minutes"), ("train", "valid_every")}
_FREE_KEYS = {("train", "num_threads"), ("train", "run_dir")}


def check_continuation(run_dir: Path, raw: dict, source: str) -> None:
    """Refuse to continue the run in ``run_dir`` with the config ``raw`` when they differ in
    anything but the budget, or in the budget while the learning rate decays over it (the
    continuation would not be the model either budget trains). ConfigError names the settings."""
    from encdec.config import ConfigError

    before = Config.load(run_dir / "config.yaml").to_dict()
    now = Config.from_dict(raw, source=source).to_dict()
    changed = [(section, key) for section in now for key in now[section]
               if (section, key) not in _FREE_KEYS
               and before.get(section, {}).get(key) != now[section][key]]
    settings = [c for c in changed if c not in _BUDGET_KEYS]
    decays = now["train"]["schedule"] in ("cosine", "linear")
    if settings or (changed and decays):
        diff = "; ".join(f"{s}.{k}: {before.get(s, {}).get(k)!r} then, {now[s][k]!r} now"
                         for s, k in settings or changed)
        why = ("the continuation would be another model" if settings else
               f"train.schedule={now['train']['schedule']} decays the learning rate over the "
               "budget, so the budget cannot change")
        raise ConfigError(f"{run_dir} was started with other settings ({diff}): {why}. Start "
                          "it again with the options it was started with, or give another --out")


def run_experiment(name: str, out_dir: str | Path, *, base_config: str = "configs/g2p-small.yaml",
                   minutes: float | None = None, steps: int | None = None,
                   overrides: list[str] | None = None, nat_config: str = "configs/g2p-nat.yaml",
                   from_run: str | Path | None = None, seeds: list[int] | None = None,
                   jobs: int = 1, log=print) -> list[dict]:
    """``from_run`` (experiment sampling, with ``steps``): every variant continues a copy
    of that trained run for ``steps`` more steps and is scored at its last checkpoint.
    (Experiment nat: the trained autoregressive run that is the AT model and the teacher.)

    ``seeds``: train every variant once per seed (in OUT/VARIANT/seed-N), and report each
    variant's mean and range; without it, once with the config's seed (in OUT/VARIANT).
    ``jobs`` > 1 trains that many models at once, each in its own process on cores / ``jobs``
    threads (unless the config sets train.num_threads), as ``encdec sweep --jobs`` does."""
    import yaml

    from encdec.config import ConfigError

    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"--seeds {seeds}: give distinct seeds")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be at least 1")
    if from_run is not None and name != "nat":
        if name != "sampling":
            raise ConfigError(f"--from starts from a trained run, which only experiments "
                              f"sampling and nat do (experiment {name} changes the model itself)")
        if not steps or minutes:
            raise ConfigError("--from needs --steps N, the steps each variant trains on from "
                              "the run's last checkpoint (and no --minutes)")
        if not (Path(from_run) / "config.yaml").exists():
            raise ConfigError(f"--from {from_run}: not a run directory (no config.yaml)")
        if seeds is not None and len(seeds) > 1:
            raise ConfigError("--from with several --seeds: a continued run resumes the trained "
                              "run's random state, so the seeds would train the same model")
        base_config = str(Path(from_run) / "config.yaml")

    if name == "nat":
        if seeds is not None or jobs > 1:
            raise ConfigError("experiment nat trains one seed, one model at a time "
                              "(no --seeds or --jobs)")
        from encdec.experiment_nat import run_nat_experiment

        return run_nat_experiment(out_dir, base_config=base_config, nat_config=nat_config,
                                  minutes=minutes, steps=steps, overrides=overrides,
                                  teacher=from_run, log=log)

    from encdec.data.prepare import load_meta

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(base_config).read_text(encoding="utf-8"))
    for item in overrides or []:
        apply_override(base, item)
    if minutes is None and steps is None:
        minutes = 50.0 / EXPERIMENTS[name]
    budget = " and ".join(([f"{minutes:g} min"] if minutes else []) +
                          ([f"{steps} steps"] if steps else []))
    meta = load_meta(Config.from_dict(base).data.dir)
    start = 0
    if from_run is not None:
        start = _last_step(Path(from_run))
        budget = f"{steps} steps from step {start} of {from_run}"
    variants = _variants(name, base, meta["src_vocab_size"], meta["tgt_vocab_size"], steps,
                         start_step=start)
    from encdec.workers import run_tasks, threads_per_job

    threads = threads_per_job(base, jobs)
    tasks = []  # (label, seed or None, raw config, step it continues from or None)
    for label, raw in variants.items():
        slug = label.replace(" ", "-").replace("+", "x")
        for seed in seeds or [None]:
            run = json.loads(json.dumps(raw))
            t = run.setdefault("train", {})
            t["run_dir"] = str(out / slug if seed is None else out / slug / f"seed-{seed}")
            if seed is not None:
                t["seed"] = seed
            if threads:
                t["num_threads"] = threads
            if minutes:
                t["max_minutes"] = minutes
            if steps:
                t["max_steps"] = start + steps
                t["valid_every"] = max(25, steps // 8)  # about eight points on the dev curve
                if not minutes:
                    t["max_minutes"] = 0
            run_dir = Path(t["run_dir"])
            resumed = None
            if (run_dir / "checkpoints" / "last").exists():
                resumed = _last_step(run_dir)
                if from_run is not None and resumed == start:
                    resumed = None  # a copy of the trained run that has not trained yet
                else:
                    check_continuation(run_dir, run, f"{name}/{label}")
            tasks.append((label, seed, run, resumed))

    def started(i) -> None:
        label, seed, raw, resumed = tasks[i]
        cfg = Config.from_dict(raw, source=f"{name}/{label}")
        params = count_parameters(cfg, meta["src_vocab_size"], meta["tgt_vocab_size"])
        log(f"== {name}: {label}{'' if seed is None else f', seed {seed}'} "
            f"({params / 1e6:.2f}M parameters, {budget}"
            f"{'' if resumed is None else f'; continuing from step {resumed}'})")

    def finished(i, row) -> None:
        log("   " + ", ".join(f"{k} {v}" for k, v in row.items() if not k.startswith("_")))

    rows = run_tasks(_train_variant, [
        (name, label, seed, raw, meta["src_vocab_size"], meta["tgt_vocab_size"], steps,
         from_run, threads) for label, seed, raw, _ in tasks], jobs, started, finished)
    refs = [json.loads(line)["refs"] for line in
            (Path(Config.from_dict(base).data.dir) / "test.eval.jsonl").read_text().splitlines()]
    metric = _key(meta["metric"]).upper()
    _write(name, out, rows, refs, budget, "steps" if steps else "training minutes", metric,
           seeds is not None)
    return rows


def _train_variant(name: str, label: str, seed: int | None, raw: dict, src_vocab: int,
                   tgt_vocab: int, steps: int | None, from_run, threads: int = 0) -> dict:
    """Train one variant (one seed) and score it on the test split, greedy: its table row,
    with its dev curve and test outputs under the keys ``_curve`` and ``_hyps``."""
    import torch

    from encdec.evaluate import evaluate
    from encdec.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = Config.from_dict(raw, source=f"{name}/{label}")
    params = count_parameters(cfg, src_vocab, tgt_vocab)
    if from_run is not None:
        _continued_copy(Path(from_run), Path(cfg.train.run_dir))
    # a model an earlier start of the experiment trained (in part) continues; one it finished
    # trains no further
    resume = (Path(cfg.train.run_dir) / "checkpoints" / "last").exists()
    state = train(cfg, resume=resume, log=lambda *a: None, progress=False)
    # a continued run is scored where it ended: its best dev checkpoint may predate the
    # continuation
    result = evaluate(cfg.train.run_dir, split="test", method="greedy",
                      checkpoint_name="last" if from_run is not None else "best")
    records = [json.loads(line) for line in
               (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    hyps = (Path(result["written_to"]).with_suffix(".hyp")).read_text(encoding="utf-8")
    return {"variant": label, **({} if seed is None else {"seed": seed}), "parameters": params,
            "layers": f"{cfg.model.enc_layers}+{cfg.model.dec_layers}",
            "d_model": cfg.model.d_model, "steps": state["step"],
            "train_min": round(state["elapsed"] / 60, 1),
            "train_tok_s": round(statistics.median(speeds)) if speeds else None,
            **{f"test_{k}": round(v, 2) for k, v in result["scores"].items()
               if isinstance(v, float)},
            "_curve": [(r["step"] if steps else r["elapsed_s"] / 60,
                        r.get(f"valid_{_key(result['metric'])}"))
                       for r in records if "valid_loss" in r],
            "_hyps": hyps.splitlines()}


def _key(metric: str) -> str:
    return "wer" if metric == "g2p" else "bleu"


def _write(name: str, out: Path, rows: list[dict], refs, budget: str, x_label: str,
           metric: str, per_seed: bool = False) -> None:
    """results.csv (a row per model trained), results.md (with seeds: a row per variant, the
    mean and range over its seeds, then each seed's figure) and plot.png."""
    fields = [k for k in rows[0] if not k.startswith("_")]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    seeds_note = ""
    if per_seed:
        tests = [k for k in fields if k.startswith("test_")]
        table_fields = ["variant", "parameters", "layers", "d_model", "seeds", "steps",
                        "train_min", "train_tok_s"] + [f"{k} mean (range)" for k in tests] + \
            [f"{tests[0]} per seed"]
        table = []
        for variant, runs in by_variant.items():
            row = {k: runs[0][k] for k in ("variant", "parameters", "layers", "d_model")}
            row["seeds"] = ", ".join(str(r["seed"]) for r in runs)
            lo, hi = min(r["steps"] for r in runs), max(r["steps"] for r in runs)
            row["steps"] = str(lo) if lo == hi else f"{lo}–{hi}"
            row["train_min"] = round(statistics.mean(r["train_min"] for r in runs), 1)
            speeds = [r["train_tok_s"] for r in runs if r["train_tok_s"] is not None]
            row["train_tok_s"] = round(statistics.median(speeds)) if speeds else None
            for k in tests:
                values = [r[k] for r in runs]
                row[f"{k} mean (range)"] = (f"{statistics.mean(values):.2f}" if len(values) == 1
                                            else f"{statistics.mean(values):.2f} "
                                                 f"({min(values):.2f}–{max(values):.2f})")
            row[f"{tests[0]} per seed"] = " / ".join(f"{r[tests[0]]:.2f}" for r in runs)
            table.append(row)
        seeds_note = f", {len(rows) // len(by_variant)} seeds"
    else:
        table_fields, table = fields, rows
    lines = [f"# experiment `{name}` ({budget} per variant{seeds_note}, test split, greedy)", "",
             "| " + " | ".join(table_fields) + " |", "|" + "---|" * len(table_fields)]
    lines += ["| " + " | ".join(str(r[k]) for k in table_fields) + " |" for r in table]
    positions = None
    if name == "sampling":  # per variant, the mean over its seeds
        positions = {}
        for variant, runs in by_variant.items():
            each = [error_by_position(r["_hyps"], refs) for r in runs]
            positions[variant] = [statistics.mean(e[i] for e in each) for i in range(len(each[0]))]
        lines += ["", "Error rate (%) by output position (1-based"
                  + (", mean over the seeds" if per_seed and len(rows) > len(by_variant) else "")
                  + "):", "",
                  "| variant | " + " | ".join(str(i + 1) for i in range(10)) + " |",
                  "|---|" + "---|" * 10]
        lines += [f"| {v} | " + " | ".join(f"{e:.1f}" for e in errs[:10]) + " |"
                  for v, errs in positions.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if positions else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for i, (variant, runs) in enumerate(by_variant.items()):
        for j, r in enumerate(runs):  # a variant's seeds in one colour, labelled once
            pts = [(t, v) for t, v in r["_curve"] if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}",
                    alpha=1.0 if j == 0 else 0.5, label=variant if j == 0 else None)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"dev {metric} (greedy)")
    ax.set_title(f"{name}: dev {metric} during training")
    ax.legend()
    if positions:
        ax = axes[0][1]
        for v, errs in positions.items():
            ax.plot(range(1, len(errs) + 1), errs, marker=".", label=v)
        ax.set_xlabel("output position")
        ax.set_ylabel("error rate (%)")
        ax.set_title("test errors by output position")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=100)
    plt.close(fig)


