"""`encdec distill`: sequence-level knowledge distillation (Kim & Rush, 2016).

A teacher run translates the sources of one split of its own data directory (beam search by
default); the outputs replace that split's targets in a copy of the directory. Everything else
— tokenizers, vocabularies, the other splits and every split's evaluation references — is
copied unchanged, so a student (a non-autoregressive model, say) trains on the new directory
with no other change and is still scored against the real references.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from encdec.data.assets import load_assets
from encdec.data.corpus import DataError, read_lines
from encdec.data.prepare import (_write_binarized, check_replaceable, load_meta, new_tmp_dir,
                                 swap_into_place)
from encdec.translate import Translator


def distill(teacher_run: str | Path, split: str = "train", out: str | Path | None = None, *,
            checkpoint_name: str = "best", device: str = "cpu", log=print, force: bool = False,
            **decode_overrides) -> Path:
    """Translate ``split`` with the teacher and write a data directory to ``out`` whose
    ``split`` targets are the outputs. ``out`` must not exist, or be an encdec data directory
    (replaced), or ``force`` is needed."""
    tr = Translator.from_run(teacher_run, checkpoint_name, device)
    data_dir = Path(tr.cfg.data.dir)
    meta = load_meta(data_dir)
    src_path = data_dir / f"{split}.src.txt"
    if not src_path.exists():
        raise DataError(f"{data_dir}: no split {split!r} ({src_path.name} is missing)")
    out = Path(out or f"{data_dir}-distilled")
    if out.resolve() == data_dir.resolve():
        raise DataError(f"--out {out} is the teacher's own data directory; choose another")
    check_replaceable(out, force)  # before hours of decoding, not after
    sources = read_lines(src_path)
    originals = read_lines(data_dir / f"{split}.tgt.txt")
    cfg = tr.decode_config(**decode_overrides)
    how = f"beam {cfg.beam_size}" if cfg.method == "beam" else cfg.method
    log(f"distilling {len(sources)} {split} sources with {teacher_run} "
        f"({tr.checkpoint_dir.name}, {how})")
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=len(sources), unit="line", file=sys.stderr) as bar:
        outputs = tr.translate(sources, progress=bar.update, **decode_overrides)
    seconds = time.perf_counter() - start

    assets = load_assets(data_dir)
    targets, kept_original = [], 0
    for output, original in zip(outputs, originals):
        if not assets.tgt_tokenizer.encode(output):  # a student cannot learn an empty target
            output = original
            kept_original += 1
        targets.append(output)

    tmp = new_tmp_dir(out)
    try:
        _write_distilled(data_dir, tmp, split, targets, originals, assets, meta, info={
            "teacher": str(teacher_run), "checkpoint": tr.checkpoint_dir.name, "split": split,
            "decode": {"method": cfg.method, "beam_size": cfg.beam_size,
                       "length_penalty": cfg.length_penalty},
            "from": str(data_dir), "kept_original_for_empty_output": kept_original})
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    changed = meta["distilled"]["targets_changed"]
    log(f"{len(targets)} {split} targets in {seconds:.0f} s ({len(targets) / max(seconds, 1e-9):.0f}"
        f" lines/s); {changed} differ from the original targets, {kept_original} empty outputs "
        f"kept the original -> {out}\ntrain a student on it with data.dir={out}")
    return out


def _write_distilled(data_dir: Path, tmp: Path, split: str, targets: list[str],
                     originals: list[str], assets, meta: dict, info: dict) -> None:
    shutil.copytree(data_dir, tmp, dirs_exist_ok=True)
    (tmp / f"{split}.tgt.txt").write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    ids = [assets.tgt_vocab.encode(assets.tgt_tokenizer.encode(t)) for t in targets]
    _write_binarized(tmp, split, "tgt", ids)
    meta["splits"][split]["tgt_tokens"] = int(sum(len(x) for x in ids))
    meta["distilled"] = dict(info, targets_changed=sum(1 for t, o in zip(targets, originals)
                                                       if t != o))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
