"""`encdec distill`: sequence-level knowledge distillation (Kim & Rush, 2016).

A teacher run translates the sources of one split of its own data directory (beam search by
default); the outputs replace that split's targets in a copy of the directory. Everything else
— tokenizers, vocabularies, the other splits and every split's evaluation references — is
copied unchanged, so a student (a non-autoregressive model, say) trains on the new directory
with no other change and is still scored against the real references.

Speech translation (Liu et al., 2019, "End-to-end speech translation with knowledge
distillation"): ``distill_transcripts`` lets a text translation run translate the source-language
transcripts of a speech translation data directory (bible-speech-es); its outputs become that
split's targets, so the end-to-end model learns what the cascade's second stage would write.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from encdec.data.assets import load_assets
from encdec.data.corpus import DataError, read_lines
from encdec.data.prepare import (_write_binarized, check_replaceable, load_meta, new_tmp_dir,
                                 swap_into_place)
from encdec.files import atomic_write_text
from encdec.metrics import text_scores
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
    outputs, seconds, decode = _translate_all(tr, teacher_run, sources,
                                              f"{len(sources)} {split} sources", log,
                                              decode_overrides)

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
            "decode": decode, "from": str(data_dir),
            "kept_original_for_empty_output": kept_original})
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    changed = meta["distilled"]["targets_changed"]
    log(f"{len(targets)} {split} targets in {seconds:.0f} s ({len(targets) / max(seconds, 1e-9):.0f}"
        f" lines/s); {changed} differ from the original targets, {kept_original} empty outputs "
        f"kept the original -> {out}\ntrain a student on it with data.dir={out}")
    return out


def _translate_all(tr: Translator, teacher_run, sources: list[str], what: str, log,
                   decode_overrides: dict) -> tuple[list[str], float, dict]:
    """The teacher's outputs for ``sources`` (under a progress bar), the seconds they took, and
    the decoding settings as meta.json records them."""
    from tqdm import tqdm

    cfg = tr.decode_config(**decode_overrides)
    how = f"beam {cfg.beam_size}" if cfg.method == "beam" else cfg.method
    log(f"distilling {what} with {teacher_run} ({tr.checkpoint_dir.name}, {how})")
    start = time.perf_counter()
    with tqdm(total=len(sources), unit="line", file=sys.stderr) as bar:
        outputs = tr.translate(sources, progress=bar.update, **decode_overrides)
    return outputs, time.perf_counter() - start, {
        "method": cfg.method, "beam_size": cfg.beam_size, "length_penalty": cfg.length_penalty}


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


def _same_target_tokens(teacher_data: Path, data_dir: Path) -> bool:
    """Whether two data directories share the target tokenizer and vocabulary byte for byte."""
    if (teacher_data / "tgt.vocab").read_bytes() != (data_dir / "tgt.vocab").read_bytes():
        return False
    a = load_meta(teacher_data).get("tgt_tokenizer") or {}
    b = load_meta(data_dir).get("tgt_tokenizer") or {}
    if a.get("kind") != b.get("kind"):
        return False
    if a.get("kind") == "sentencepiece":
        return (teacher_data / a["model"]).read_bytes() == (data_dir / b["model"]).read_bytes()
    return {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items()
                                                            if k != "model"}


def distill_transcripts(teacher_run: str | Path, data_dir: str | Path, split: str = "train",
                        out: str | Path | None = None, *, checkpoint_name: str = "best",
                        device: str = "cpu", log=print, force: bool = False,
                        **decode_overrides) -> Path:
    """Sequence-level distillation for speech translation: the text translation run
    ``teacher_run`` translates the transcripts of ``split`` of the speech translation data
    directory ``data_dir`` (each distinct transcript once); the outputs replace that split's
    targets in a copy written to ``out`` (default ``data_dir`` + -distilled). The original
    target stays in each entry as "reference"; the other splits, the audio (read through
    paths relative to ``out``), the tokenizers and the feature statistics are unchanged. The
    teacher must have been trained on the data's target vocabulary (prepare bible-speech-es
    with --targets-from the teacher's corpus)."""
    from encdec.data.utterances import audio_file, read_manifest

    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if meta.get("modality") != "speech" or not meta.get("transcript_tokenizer"):
        raise DataError(f"{data_dir}: not a speech translation data directory with "
                        "source-language transcripts (e.g. `encdec prepare bible-speech-es`); "
                        "distill a text run's own data with `encdec distill RUN` alone")
    tr = Translator.from_run(teacher_run, checkpoint_name, device)
    if tr.assets.speech:
        raise DataError(f"{teacher_run} is a speech run; the teacher of --data is a text "
                        "translation run that reads the transcripts")
    teacher_data = Path(teacher_run) / "data"
    if not _same_target_tokens(teacher_data, data_dir):
        raise DataError(f"{data_dir} has another target tokenizer or vocabulary than "
                        f"{teacher_run} ({tr.cfg.data.dir}): prepare it with "
                        f"`encdec prepare bible-speech-es --targets-from {tr.cfg.data.dir}`")
    out = Path(out or f"{data_dir}-distilled")
    if out.resolve() == data_dir.resolve():
        raise DataError(f"--out {out} is the data directory itself; choose another")
    check_replaceable(out, force)  # before decoding, not after
    names = sorted(p.name[: -len(".manifest.jsonl")] for p in data_dir.glob("*.manifest.jsonl"))
    manifests = {name: read_manifest(data_dir, name) for name in names}
    if split not in manifests:
        raise DataError(f"{data_dir}: no split {split!r} ({split}.manifest.jsonl is missing)")
    entries = manifests[split]
    missing = next((e for e in entries if not str(e.get("transcript") or "").strip()), None)
    if missing is not None:
        raise DataError(f"{data_dir}/{split}.manifest.jsonl: utterance "
                        f"{missing.get('id', missing['audio'])!r} has no transcript to translate")
    sources = list(dict.fromkeys(e["transcript"] for e in entries))  # each verse once
    translations, seconds, decode = _translate_all(
        tr, teacher_run, sources,
        f"{len(sources)} distinct transcripts of {len(entries)} {split} utterances", log,
        decode_overrides)
    outputs = dict(zip(sources, translations))

    assets = load_assets(data_dir)
    kept_original = changed = 0
    ids = []
    for entry in entries:
        original, output = entry["text"], outputs[entry["transcript"]]
        pieces = assets.tgt_tokenizer.encode(output)
        if not pieces:  # a student cannot learn an empty target
            output, pieces = original, assets.tgt_tokenizer.encode(original)
            kept_original += 1
        changed += output != original
        entry["text"], entry["reference"] = output, original
        ids.append(assets.tgt_vocab.encode(pieces))
    # how far the new targets are from the references (sacreBLEU, as `encdec evaluate`)
    agree = text_scores([e["text"] for e in entries], [[e["reference"]] for e in entries])
    length = sum(len(e["text"]) for e in entries) / max(1, sum(len(e["reference"])
                                                                for e in entries))

    tmp = new_tmp_dir(out)  # beside out: the audio paths are made relative to it
    try:
        shutil.copytree(data_dir, tmp, dirs_exist_ok=True)
        for name, m in manifests.items():
            lines = []
            for e in m:
                audio = audio_file(data_dir, e["audio"])
                if not Path(e["audio"]).is_absolute():
                    e["audio"] = os.path.relpath(audio.absolute(), out.absolute())
                lines.append(json.dumps(e, ensure_ascii=False) + "\n")
            atomic_write_text(tmp / f"{name}.manifest.jsonl", "".join(lines))
        _write_binarized(tmp, split, "tgt", ids)
        meta["distilled"] = {
            "teacher": str(teacher_run), "checkpoint": tr.checkpoint_dir.name, "split": split,
            "reads": "transcript", "decode": decode, "from": str(data_dir), "sources": len(sources),
            "kept_original_for_empty_output": kept_original, "targets_changed": changed,
            "against_references": {"bleu": round(agree["bleu"], 2), "chrf": round(agree["chrf"], 2),
                                   "length_ratio": round(length, 3),
                                   "bleu_signature": agree["bleu_signature"]}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{len(sources)} transcripts in {seconds:.0f} s ({len(sources) / max(seconds, 1e-9):.0f} "
        f"lines/s); {changed} of {len(entries)} {split} targets differ from the original, "
        f"{kept_original} empty outputs kept the original; against the originals BLEU "
        f"{agree['bleu']:.2f}, chrF {agree['chrf']:.2f}, {length:.2f}x their length in "
        f"characters -> {out}\n"
        f"train the end-to-end model on it with data.dir={out}")
    return out
