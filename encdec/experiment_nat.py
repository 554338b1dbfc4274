"""`encdec experiment nat`: non-autoregressive decoding is faster but worse, and distillation
narrows the gap (Gu et al., 2018; Kim & Rush, 2016) — checked in one command.

Three models of one size train for the same budget: the autoregressive base config (AT), and a
non-autoregressive one (``--nat-config``, Mask-Predict) on the original targets and on targets
distilled from the AT model (beam 5 over the training sources). Each decoder — AT beam 5, AT
greedy, each NAT at 1/4/10 passes — is scored on the test split and timed at batch 64
(inputs/s over the split) and batch 1 (ms per input over the first inputs), in turn in one
process, so the ratios to AT beam 5 compare like with like.

The multi-modality problem made visible: where an input has several references of the same
length (CMUdict's pronunciation variants), an output that is none of them but takes, position
by position, tokens of two of them — some that only one has and some that only the other has —
mixes two valid outputs. Those are counted per decoder: a NAT model predicts every position
independently, so it can; distillation gives it one target per input and should make it rarer.
Its best-known symptom is counted too, on every input: an output with a token twice in a row
where no reference of that input has it twice in a row (two positions that each chose the same
token from a different mode), and the share of output tokens that are such repeats (which, unlike
the count of outputs, does not saturate on verse-long outputs).

``teacher`` (``--from RUN``) takes a trained autoregressive run as the AT model and teacher
instead of training one. The command can be started again after a stop: a finished run is read
back, a half-trained one continues from its last checkpoint (refused, naming the settings, when
it was started with others: see ``encdec.experiments.check_continuation``), and the distilled
targets are kept as long as the teacher has not changed.
"""

from __future__ import annotations

import csv
import json
import time
from itertools import combinations
from pathlib import Path

from encdec.config import Config, apply_override
from encdec.files import atomic_write_text

PASSES = (1, 4, 10)


def mixes_references(hyp: list[str], refs: list[list[str]]) -> bool:
    """Whether ``hyp`` is none of ``refs`` but, position by position, takes every token from one
    of two references of its length, at least one token that only the first has and one that
    only the second has."""
    if hyp in refs:
        return False
    same = [r for r in refs if len(r) == len(hyp)]
    for a, b in combinations(same, 2):
        if all(h in (x, y) for h, x, y in zip(hyp, a, b)) and \
                any(h == x != y for h, x, y in zip(hyp, a, b)) and \
                any(h == y != x for h, x, y in zip(hyp, a, b)):
            return True
    return False


def _repeats(hyp: list[str], refs: list[list[str]]) -> int:
    """How many tokens of ``hyp`` repeat the one before where no reference of it has that
    token twice in a row."""
    doubled = {a for r in refs for a, b in zip(r, r[1:]) if a == b}
    return sum(a == b and a not in doubled for a, b in zip(hyp, hyp[1:]))


def repeats_token(hyp: list[str], refs: list[list[str]]) -> bool:
    """Whether ``hyp`` has a token twice in a row that no reference has twice in a row."""
    return _repeats(hyp, refs) > 0


def count_repeats(hyps: list[str], refs: list[list[str]]) -> int:
    """Outputs with a token repeated in a row where none of their references repeats it."""
    return sum(repeats_token(h.split(), [r.split() for r in rs]) for h, rs in zip(hyps, refs))


def repeated_token_share(hyps: list[str], refs: list[list[str]]) -> float:
    """Percent of output tokens that repeat the token before them where no reference of that
    input has that token twice in a row. Unlike ``count_repeats`` it does not saturate on long
    outputs (a verse-long NAT output nearly always repeats some token once)."""
    repeated = total = 0
    for hyp, rs in zip(hyps, refs):
        toks = hyp.split()
        total += len(toks)
        repeated += _repeats(toks, [r.split() for r in rs])
    return 100.0 * repeated / max(total, 1)


def count_mixed(hyps: list[str], refs: list[list[str]]) -> tuple[int, int]:
    """(outputs that mix two references, inputs where that is possible: two distinct
    references of one length)."""
    mixed = possible = 0
    for hyp, rs in zip(hyps, refs):
        toks = [r.split() for r in dict.fromkeys(rs)]
        lengths = [len(t) for t in toks]
        if len(lengths) == len(set(lengths)):
            continue
        possible += 1
        mixed += mixes_references(hyp.split(), toks)
    return mixed, possible


def _load(path: str | Path, overrides: list[str]) -> dict:
    import yaml

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for item in overrides:
        apply_override(raw, item)
    return raw


def run_nat_experiment(out_dir: str | Path, *, base_config: str = "configs/g2p-small.yaml",
                       nat_config: str = "configs/g2p-nat.yaml", minutes: float | None = None,
                       steps: int | None = None, overrides: list[str] | None = None,
                       teacher: str | Path | None = None, latency_inputs: int = 200,
                       log=print) -> list[dict]:
    from encdec import checkpoint
    from encdec.config import ConfigError
    from encdec.data.dataset import read_eval
    from encdec.distill import distill
    from encdec.experiments import check_continuation
    from encdec.metrics import score
    from encdec.train import train
    from encdec.translate import Translator

    out = Path(out_dir)
    overrides = overrides or []
    if teacher is not None:
        if not (Path(teacher) / "config.yaml").exists():
            raise ConfigError(f"--from {teacher}: not a run directory (no config.yaml)")
        if not (Path(teacher) / "checkpoints" / "last").exists():
            raise ConfigError(f"--from {teacher}: the run has no checkpoint yet")
        at_raw = _load(Path(teacher) / "config.yaml", [])
    else:
        at_raw = _load(base_config, overrides)
    nat_raw = _load(nat_config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Config.from_dict(at_raw).data.dir
    nat_raw.setdefault("data", {})["dir"] = data_dir
    if minutes is None and steps is None:
        minutes = 50.0 / 3
    budget = " and ".join(([f"{minutes:g} min"] if minutes else []) +
                          ([f"{steps} steps"] if steps else []))

    kd_dir = out / "data-distilled"

    def budgeted(raw: dict, run_dir: Path, label: str, **data) -> tuple[dict, Path, str]:
        raw = json.loads(json.dumps(raw))
        raw.setdefault("data", {}).update(data)
        t = raw.setdefault("train", {})
        t["run_dir"] = str(run_dir)
        t["max_minutes"] = minutes or 0
        if steps:
            t["max_steps"] = steps
        return raw, run_dir, label

    runs = {"NAT": budgeted(nat_raw, out / "nat-raw", "NAT, original targets"),
            "NAT distilled": budgeted(nat_raw, out / "nat-distilled", "NAT, distilled targets",
                                      dir=str(kd_dir))}
    if teacher is None:
        runs = {"AT": budgeted(at_raw, out / "at", "AT"), **runs}
    for raw, run_dir, label in runs.values():  # before training anything
        if (run_dir / "checkpoints" / "last").exists():
            check_continuation(run_dir, raw, f"nat/{label}")

    def fit(raw: dict, run_dir: Path, label: str) -> dict:
        cfg = Config.from_dict(raw, source=f"nat/{label}")
        resume = (run_dir / "checkpoints" / "last").exists()
        log(f"== nat: {'continuing' if resume else 'training'} {label} ({budget}) -> {run_dir}")
        state = train(cfg, resume=resume, log=lambda *a: None, progress=False)
        return {"steps": state["step"], "train_min": round(state["elapsed"] / 60, 1)}

    if teacher is None:
        at_dir = out / "at"
        trained = {"AT": fit(*runs["AT"])}
    else:
        at_dir = Path(teacher)
        state = checkpoint.trainer_info(checkpoint.resolve(at_dir, "last"))
        log(f"== nat: the AT model is {at_dir} (step {state['step']})")
        trained = {"AT": {"steps": state["step"], "train_min": round(state["elapsed"] / 60, 1)}}
    stamp = {"teacher": str(at_dir), "step": trained["AT"]["steps"]}
    stamp_file = out / "distilled-from.json"
    if (kd_dir / "meta.json").exists() and stamp_file.exists() and \
            json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
        log(f"== nat: the training targets distilled earlier by the same AT model: {kd_dir}")
    else:
        if (out / "nat-distilled" / "checkpoints" / "last").exists():
            raise ConfigError(f"{out / 'nat-distilled'} was trained on targets distilled by "
                              f"another AT model than {at_dir} at step {stamp['step']}; remove it "
                              "(or give another --out) to train it again on new targets")
        log(f"== nat: distilling the training targets with the AT model (beam 5) -> {kd_dir}")
        distill(at_dir, "train", kd_dir, log=lambda *a: None, method="beam", beam_size=5)
        atomic_write_text(stamp_file, json.dumps(stamp) + "\n")
    trained["NAT"] = fit(*runs["NAT"])
    trained["NAT distilled"] = fit(*runs["NAT distilled"])

    entries = read_eval(data_dir, "test")
    sources, refs = [e["src"] for e in entries], [e["refs"] for e in entries]
    metric = Translator.from_run(at_dir).assets.meta["metric"]
    decoders = [("AT beam 5", "AT", at_dir, {"method": "beam", "beam_size": 5}),
                ("AT greedy", "AT", at_dir, {"method": "greedy"})]
    for name, run in (("NAT", "nat-raw"), ("NAT distilled", "nat-distilled")):
        decoders += [(f"{name}, {k} pass{'es' if k > 1 else ''}", name, out / run,
                      {"iterations": k}) for k in PASSES]
    rows = []
    for label, model, run_dir, how in decoders:
        tr = Translator.from_run(run_dir)
        tr.translate(sources[:64], **how)  # warm-up, not timed
        start = time.perf_counter()
        hyps = tr.translate(sources, batch_size=64, **how)
        batch_s = time.perf_counter() - start
        few = sources[:latency_inputs]
        start = time.perf_counter()
        tr.translate(few, batch_size=1, **how)
        single_s = time.perf_counter() - start
        scores = score(metric, hyps, refs)
        mixed, possible = count_mixed(hyps, refs)
        cfg = tr.decode_config(**how)
        row = {"decoder": label, "steps": trained[model]["steps"],
               "train_min": trained[model]["train_min"],
               "length_beam": cfg.length_beam if cfg.method == "nat" else "",
               "inputs_per_s_b64": round(len(sources) / batch_s, 1),
               "ms_per_input_b1": round(1000 * single_s / max(len(few), 1), 2),
               **{f"test_{k}": round(v, 2) for k, v in scores.items() if isinstance(v, float)},
               "mixed_outputs": mixed, "mixable_inputs": possible,
               "repeat_outputs": count_repeats(hyps, refs),
               "repeated_tokens_pct": round(repeated_token_share(hyps, refs), 2)}
        (out / f"{label.replace(' ', '-').replace(',', '')}.hyp").write_text(
            "".join(h + "\n" for h in hyps), encoding="utf-8")
        rows.append(row)
        log("   " + ", ".join(f"{k} {v}" for k, v in row.items()))
    _write(out, rows, budget, metric, len(sources), len(few))
    return rows


def _write(out: Path, rows: list[dict], budget: str, metric: str, n: int, n_single: int) -> None:
    fields = list(rows[0])
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    key = "test_wer" if "test_wer" in rows[0] else "test_bleu"
    ref = rows[0]
    lines = [f"# experiment `nat` ({budget} per model; test split, {n} inputs)", "",
             f"| decoder | steps | {key.split('_')[1].upper()} | inputs/s, batch 64 | vs AT beam 5 "
             f"| ms/input, batch 1 (first {n_single}) | vs AT beam 5 | outputs mixing two "
             f"references | outputs repeating a token (of {n}) | tokens repeating the one before |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["decoder"] + (f" (length beam {r['length_beam']})" if r["length_beam"] else "")
        lines.append(
            f"| {name} | {r['steps']} | {r[key]:.2f} | {r['inputs_per_s_b64']:,.0f} "
            f"| {r['inputs_per_s_b64'] / ref['inputs_per_s_b64']:.2f}× "
            f"| {r['ms_per_input_b1']:.1f} | {ref['ms_per_input_b1'] / r['ms_per_input_b1']:.2f}× "
            f"| {r['mixed_outputs']} of {r['mixable_inputs']} | {r['repeat_outputs']} "
            f"| {r['repeated_tokens_pct']:.2f} % |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["inputs_per_s_b64"], r[key])
        ax.annotate(r["decoder"], (r["inputs_per_s_b64"], r[key]), fontsize=7)
    ax.set_xlabel("inputs/s, batch 64")
    ax.set_ylabel(f"test {key.split('_')[1].upper()}")
    ax.set_title("nat: speed against quality")
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=100)
    plt.close(fig)
