"""The `encdec` command: prepare, train, average, evaluate, translate, transcribe, speak,
pipeline, distill, export, experiment, sweep, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _prepare(args) -> None:
    from encdec.data.corpus import DataError, read_pairs
    from encdec.data.prepare import check_replaceable, load_meta, prepare, split_by_hash
    from encdec.data.recipes import RECIPES, Corpus

    given = {"max_len": args.max_len, "vocab_size": args.vocab_size, "spm_type": args.spm_type,
             "joint_vocab": args.joint_vocab}
    defaults = {"max_len": 256, "vocab_size": 8000, "spm_type": "bpe", "joint_vocab": False}
    if args.targets_from is not None and args.recipe != "bible-speech-es":
        raise DataError("--targets-from is an option of the bible-speech-es recipe")
    if args.voices is not None and args.recipe != "bible-speech":
        raise DataError("--voices is an option of the bible-speech recipe (bible-tts: --voice)")
    if args.recipe == "bible-speech":
        from encdec.data.speech import prepare_speech

        voices = args.voices or "standard"
        out = Path(args.out or ("data/bible-speech" if voices == "standard"
                                else f"data/bible-speech-{voices}"))
        hours, vocab_size = args.hours or 10.0, args.vocab_size or 256
        if (out / "meta.json").exists() and not args.force:
            meta = load_meta(out)
            options = meta.get("options", {})
            if options.get("train_hours") == hours and options.get("vocab_size") == vocab_size \
                    and options.get("voice_set", "standard") == voices \
                    and meta.get("energy_floor"):  # earlier versions: features without a floor
                print(f"{out}: already prepared (bible-speech); --force to redo")
                return
        prepare_speech(out, train_hours=hours, vocab_size=vocab_size, voices=voices)
        return
    if args.recipe == "bible-tts":
        _prepare_tts(args)
        return
    if args.voice is not None or args.inputs is not None or args.g2p is not None:
        raise DataError("--voice, --inputs and --g2p are options of the bible-tts recipe")
    if args.hours is not None:
        raise DataError("--hours is an option of the bible-speech and bible-tts recipes")
    if args.speech_dir is not None and args.recipe != "bible-speech-es":
        raise DataError("--speech-dir is an option of the bible-speech-es recipe")
    if args.recipe == "bible-speech-es":
        _prepare_speech_translation(args)
        return
    if args.stream and (args.recipe or not args.train):
        raise DataError("--stream prepares a user corpus given with --train FILE (a recipe is "
                        "built in memory)")
    if args.recipe:
        if args.recipe not in RECIPES:
            raise DataError(f"unknown recipe {args.recipe!r}; built-in recipes: "
                            f"{', '.join(RECIPES)}, bible-speech, bible-speech-es, bible-tts")
        recipe = RECIPES[args.recipe]
        options = {k: given[k] if given[k] is not None else recipe.options.get(k, defaults[k])
                   for k in defaults}
        out = Path(args.out or f"data/{args.recipe}")
        meta_path = out / "meta.json"
        if meta_path.exists() and not args.force:
            meta = load_meta(out)
            if meta.get("name") == args.recipe and meta.get("options") == options:
                print(f"{out}: already prepared ({args.recipe}); --force to redo")
                return
        check_replaceable(out, args.force)  # before the (slow) corpus is built
        corpus = recipe.build()
        name = args.recipe
    else:
        if not args.train:
            raise DataError("give a recipe name or a training corpus (--train FILE.tsv|.jsonl, "
                            "or --train SRC TGT for parallel line files)")
        if not args.out:
            raise DataError("--out DIR is required for a user corpus")
        from encdec.data.utterances import is_audio_list, prepare_audio_list

        if len(args.train) == 1 and is_audio_list(args.train[0]):
            if args.stream:
                raise DataError(f"--stream prepares text pairs; {args.train[0]} is an audio list")
            lists = {"train": args.train[0]}
            if args.dev or args.test:
                if not (args.dev and args.test):
                    raise DataError("give both --dev and --test, or neither")
                lists.update(dev=args.dev[0], test=args.test[0])
            if args.metric not in (None, "asr", "text"):
                raise DataError(f"--metric {args.metric}: audio lists are scored with asr "
                                "(WER/CER) or text (BLEU/chrF)")
            prepare_audio_list(args.out, lists, vocab_size=args.vocab_size or 256,
                               tokenizer=args.tgt_tokenizer or "sentencepiece",
                               metric=args.metric, force=args.force)
            return
        if args.metric == "asr":
            raise DataError("--metric asr scores speech recognition: give an audio list "
                            "(--train LIST.tsv|.jsonl), or use --metric text or g2p")
        if args.stream:
            from encdec.data.stream import prepare_stream

            options = {k: given[k] if given[k] is not None else defaults[k] for k in defaults}
            prepare_stream(args.train, args.out, dev=args.dev, test=args.test,
                           src_tokenizer={"kind": args.src_tokenizer, "lowercase": args.lowercase},
                           tgt_tokenizer={"kind": args.tgt_tokenizer or args.src_tokenizer,
                                          "lowercase": args.lowercase},
                           metric=args.metric or "text", group_refs=args.group_refs,
                           tokenizer_sample=args.tokenizer_sample, chunk_pairs=args.chunk_pairs,
                           workers=args.workers, force=args.force, **options)
            return
        out = Path(args.out)
        check_replaceable(out, args.force)
        splits = {"train": read_pairs(*args.train)}
        if args.dev or args.test:
            if not (args.dev and args.test):
                raise DataError("give both --dev and --test, or neither (then 5%/5% are split off "
                                "the training data by a hash of the source)")
            splits["dev"] = read_pairs(*args.dev)
            splits["test"] = read_pairs(*args.test)
        else:
            splits = split_by_hash(splits["train"])
        src_spec = {"kind": args.src_tokenizer, "lowercase": args.lowercase}
        tgt_spec = {"kind": args.tgt_tokenizer or args.src_tokenizer, "lowercase": args.lowercase}
        corpus = Corpus(splits, src_spec, tgt_spec, metric=args.metric or "text",
                        group_refs=args.group_refs,
                        split_by_hash=not args.dev)
        name = "custom"
        options = {k: given[k] if given[k] is not None else defaults[k] for k in defaults}
    prepare(corpus, out, name=name, options=options, force=args.force, **options)


def _prepare_tts(args) -> None:
    from encdec.data.prepare import load_meta
    from encdec.data.tts import DEFAULT_VOICE, prepare_tts

    out = Path(args.out or "data/bible-tts")
    options = {"train_hours": args.hours or 3.0, "inputs": args.inputs or "phonemes",
               "g2p": args.g2p or ""}
    voice = args.voice or DEFAULT_VOICE
    if (out / "meta.json").exists() and not args.force:
        meta = load_meta(out)
        have = meta.get("options", {})
        if meta.get("voice") == voice and all(have.get(k) == v for k, v in options.items()):
            print(f"{out}: already prepared (bible-tts, {voice}); --force to redo")
            return
    prepare_tts(out, voice=voice, inputs=options["inputs"], train_hours=options["train_hours"],
                g2p_run=args.g2p)


def _prepare_speech_translation(args) -> None:
    from encdec.data.corpus import DataError
    from encdec.data.prepare import load_meta
    from encdec.data.speech import prepare_speech_translation

    out = Path(args.out or "data/bible-speech-es")
    speech_dir = Path(args.speech_dir or "data/bible-speech")
    vocab_size = args.vocab_size or 4000
    targets_from = str(args.targets_from) if args.targets_from else None
    if targets_from and args.vocab_size:
        raise DataError("--vocab-size and --targets-from: the vocabulary is either trained "
                        "(--vocab-size) or copied from the text data (--targets-from); give one")
    if (out / "meta.json").exists() and not args.force and (speech_dir / "meta.json").exists():
        meta = load_meta(out)
        options = meta.get("options", {})
        if meta.get("name") == "bible-speech-es" and options.get("vocab_size") == vocab_size \
                and options.get("speech_dir") == str(speech_dir) and \
                options.get("targets_from") == targets_from and \
                options.get("speech_utterances") == load_meta(speech_dir).get("utterances"):
            print(f"{out}: already prepared (bible-speech-es from {speech_dir}); --force to redo")
            return
    prepare_speech_translation(out, speech_dir, vocab_size=vocab_size, targets_from=targets_from,
                               force=args.force)


def _train(args) -> None:
    from encdec.config import Config, ConfigError
    from encdec.train import train, wants_tcmalloc

    path = Path(args.config)
    run_dir = None
    if path.is_dir():  # a run directory: continue with its saved config, in that directory
        run_dir = path  # (a copied or moved run trains where it is, not where it was made)
        path = path / "config.yaml"
    cfg = Config.load(path, args.overrides)
    if run_dir is not None and not any(o.split("=", 1)[0].strip() == "train.run_dir"
                                       for o in args.overrides):
        cfg.train.run_dir = str(run_dir)
    if getattr(args, "own_process", False) and wants_tcmalloc(cfg):
        from encdec.host import reexec_with_tcmalloc

        why = reexec_with_tcmalloc()  # returns only when it could not
        if cfg.train.allocator == "tcmalloc":
            raise ConfigError(f"train.allocator=tcmalloc: {why}")
        print(f"encdec: training with the C library's malloc ({why}): a higher peak memory "
              f"on audio data; train.allocator=system silences this", file=sys.stderr)
    train(cfg, resume=args.resume)


def _average(args) -> None:
    from encdec.checkpoint import average_checkpoints

    path = average_checkpoints(args.run, args.last, args.name, force=args.force, raw=args.raw)
    chosen = json.loads((path / "averaged.json").read_text(encoding="utf-8"))["checkpoints"]
    print(f"averaged {', '.join(chosen)} -> {path}\n"
          f"use it with: encdec evaluate {args.run} --checkpoint {path.name}")


def _print_tts_scores(r: dict) -> None:
    names = {"reference": "reference recording", "copy": "copy synthesis (vocoder)",
             "model": f"{r['arch']} (length_scale {r['length_scale']:g})"}
    rows = "".join(f"\n  {names[k]:<34} WER {v['wer']:6.2f}  CER {v['cer']:6.2f}  "
                   f"{v['seconds']:8.1f} s" for k, v in r["systems"].items())
    own = r.get("asr_judge")
    if own:
        rows += (f"\n  judged by encdec's own recognizer {own['run']} (checkpoint "
                 f"{own['checkpoint']}; not independent):" + "".join(
                     f"\n  {names[k]:<34} WER {v['wer']:6.2f}  CER {v['cer']:6.2f}"
                     for k, v in own["systems"].items()))
    print(f"{r['split']} ({r['inputs']} utterances, judge {r['judge']}, checkpoint "
          f"{r['checkpoint']}):{rows}\n  MCD (DTW) {r['mcd_db']:.2f} dB, duration "
          f"{r['duration_ratio']:.3f}x the recordings'; real-time factor: mel "
          f"{r['mel_rtf']:.4f}, vocoder {r['vocoder_rtf']:.4f} on {r['threads']} threads\n"
          f"  -> {r['written_to']}")


def _evaluate(args) -> None:
    from encdec.evaluate import evaluate

    result = evaluate(args.run, split=args.split, checkpoint_name=args.checkpoint,
                      data_dir=args.data, device=args.device, limit=args.limit,
                      rerank=args.rerank, asr_judge=args.asr_judge, **_decode_overrides(args))
    if result.get("metric") == "tts":
        _print_tts_scores(result)
        return
    s = result["scores"]
    d = result["decode"]
    how = f"beam {d['beam_size']}" if d["method"] == "beam" else d["method"]
    how += f", CTC weight {d['ctc_weight']:g}" if d["method"] == "beam" and d["ctc_weight"] else ""
    if d["method"] == "nat":
        how = f"nat, {d['iterations']} iteration(s), length beam {d['length_beam']}"
        how += ", every pass" if not d["early_exit"] and d["iterations"] > 1 else ""
    how += f", reranked by {result['rerank']}" if result["rerank"] else ""
    if "groups" in result:  # speech: overall, per voice group, real-time factor
        metric = result["metric"]
        voices = result.get("voices", {})
        line = _speech_scores(metric, s) + "".join(
            f"\n  {g:<7} {v['n']:>5} utt  {_speech_scores(metric, v, 6)}" + "".join(
                f"\n    {name:<26} {sv['n']:>5} utt  {_speech_scores(metric, sv, 6)}"
                for name, sv in voices.items() if sv["group"] == g)
            for g, v in result["groups"].items())
        if metric == "text":
            line += f"\n  {s['bleu_signature']}\n  {s['chrf_signature']}"
        line += (f"\n  real-time factor {result['real_time_factor']:.4f} on "
                 f"{result['threads']} threads")
        print(f"{result['split']} ({result['inputs']} utterances, {how}, checkpoint "
              f"{result['checkpoint']}): {line}\n  -> {result['written_to']}")
        return
    if result["metric"] == "g2p":
        line = f"WER {s['wer']:.2f}%  PER {s['per']:.2f}%"
    else:
        line = f"BLEU {s['bleu']:.2f}  chrF {s['chrf']:.2f}\n  {s['bleu_signature']}\n  {s['chrf_signature']}"
    print(f"{result['split']} ({result['inputs']} inputs, {how}, checkpoint {result['checkpoint']}): "
          f"{line}  exact match {s['exact_match']:.2f}%  "
          f"[{result['inputs_per_s']:.0f} inputs/s] -> {result['written_to']}")


def _speech_scores(metric: str, scores: dict, width: int = 0) -> str:
    """WER/CER (recognition) or BLEU/chrF (translation) of a speech evaluation."""
    if metric == "asr":
        return f"WER {scores['wer']:{width}.2f}%  CER {scores['cer']:{width}.2f}%"
    return f"BLEU {scores['bleu']:{width}.2f}  chrF {scores['chrf']:{width}.2f}"


def _translate(args) -> None:
    from encdec.commands.translate import run as run_cli

    run_cli(args.run, checkpoint_name=args.checkpoint, input_path=args.input,
            output_path=args.output, scores=args.scores, device=args.device,
            overrides=dict(_decode_overrides(args), nbest=args.nbest),
            long_inputs=args.long_inputs, progress=False if args.no_progress else None,
            rerank=args.rerank, engine=args.engine, export_dir=args.export)


def _transcribe(args) -> None:
    from encdec.commands.transcribe import run as run_cli

    run_cli(args.run, args.inputs, checkpoint_name=args.checkpoint, output_path=args.output,
            device=args.device, overrides=_decode_overrides(args),
            progress=not args.no_progress)


def _speak(args) -> None:
    from encdec.commands.speak import run as run_cli

    run_cli(args.run, text=args.text, input_path=args.input, output=args.output,
            length_scale=args.length_scale, batch_size=args.batch_size,
            checkpoint_name=args.checkpoint, device=args.device)


def _pipeline(args) -> None:
    from encdec.commands.pipeline import run as run_cli

    asr = {"method": args.asr_method, "beam_size": args.asr_beam,
           "ctc_weight": args.asr_ctc_weight}
    mt = {"beam_size": args.mt_beam}
    stages = [{k: v for k, v in stage.items() if v is not None} for stage in (asr, mt)]
    run_cli([args.asr_run, args.mt_run], args.inputs, checkpoint_name=args.checkpoint,
            output_path=args.output, device=args.device, stage_overrides=stages,
            asr_nbest=args.asr_nbest, rescore=args.rescore, show_transcript=args.show_transcript,
            progress=not args.no_progress)


def _distill(args) -> None:
    from encdec.distill import distill, distill_transcripts

    if args.data:
        distill_transcripts(args.run, args.data, split=args.split, out=args.out,
                            checkpoint_name=args.checkpoint, device=args.device, force=args.force,
                            **_decode_overrides(args))
        return
    distill(args.run, split=args.split, out=args.out, checkpoint_name=args.checkpoint,
            device=args.device, force=args.force, **_decode_overrides(args))


def _export(args) -> None:
    from encdec.export import DEFAULT_DIR, export_ctranslate2, read_info

    out = export_ctranslate2(args.run, args.out, quantization=args.quantization,
                             checkpoint_name=args.checkpoint)
    info = read_info(out)
    use = f"encdec translate {args.run} --engine ctranslate2"
    if out.resolve() != (Path(args.run) / DEFAULT_DIR).resolve():
        use += f" --export {out}"
    print(f"exported {args.run} ({info['checkpoint']}) to {out} (CTranslate2, "
          f"{info['quantization']} weights)\nuse it with: {use}")


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        from encdec.config import ConfigError
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas") from None


def _experiment(args) -> None:
    from encdec.experiments import run_experiment

    out = args.out or f"runs/experiment-{args.name}"
    run_experiment(args.name, out, base_config=args.config, minutes=args.minutes,
                   steps=args.steps, overrides=args.overrides, nat_config=args.nat_config,
                   from_run=args.from_run,
                   seeds=_parse_seeds(args.seeds) if args.seeds else None, jobs=args.jobs)
    print(f"results: {out}/results.md, {out}/results.csv, {out}/plot.png")


def _sweep(args) -> None:
    from encdec.sweep import parse_grid, run_sweep

    run_sweep(args.config, args.out, parse_grid(args.grid), _parse_seeds(args.seeds),
              minutes=args.minutes,
              steps=args.steps, overrides=args.overrides, average=args.average,
              split=args.split, decode={"beam_size": args.beam, "method": args.method},
              jobs=args.jobs)
    print(f"results: {args.out}/results.md, {args.out}/runs.csv, {args.out}/plot.png")


def _serve(args) -> None:
    from encdec.serve import serve

    serve(args.run, host=args.host, port=args.port, checkpoint_name=args.checkpoint,
          device=args.device, overrides=args.overrides, access_log=args.access_log,
          threads=args.threads, api_key_file=args.api_key_file, then=args.then,
          engine=args.engine, export_dir=args.export)


def _decode_overrides(args) -> dict:
    method = args.method
    if args.decoder is not None:
        # The decoder family had two spellings; `--method` (decode.method) is the one left.
        print(f"encdec: --decoder is deprecated and will be removed: use --method "
              f"{'nat' if args.decoder == 'nat' else 'greedy|beam|sample'} (a run trained "
              "with model.arch=nat decodes with --method nat by default)", file=sys.stderr)
        if args.decoder == "nat":
            if method not in (None, "nat"):
                from encdec.config import ConfigError
                raise ConfigError(f"--decoder nat decodes with Mask-Predict, not --method {method}")
            method = "nat"
    return {"beam_size": args.beam, "method": method, "length_penalty": args.length_penalty,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "iterations": args.iterations, "length_beam": args.length_beam,
            "length_scale": args.length_scale, "batch_size": args.batch_size,
            "early_exit": args.early_exit, "ctc_weight": args.ctc_weight}


ENGINE_HELP = ("encdec: decode with encdec's own search on the PyTorch model (the default); "
               "ctranslate2: with CTranslate2 on an export of the same checkpoint (greedy and "
               "beam search; same outputs), RUN/export/ctranslate2 unless --export is given, "
               "exported on first use")
EXPORT_HELP = "the export to decode with (encdec export RUN --out DIR) for --engine ctranslate2"

RERANK_HELP = ("an autoregressive run that re-orders the candidates (every candidate length "
               "with --method nat --length-beam L, every beam with --beam N) by its own "
               "teacher-forced score; its vocabulary may differ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encdec", description="Transformer sequence-to-sequence toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="build a data directory from a recipe or your corpus")
    pr.add_argument("recipe", nargs="?", help="built-in recipe, e.g. g2p-cmudict")
    pr.add_argument("--out", help="data directory to write (default data/RECIPE)")
    pr.add_argument("--train", nargs="+", metavar="FILE",
                    help="training pairs: FILE.tsv, FILE.jsonl, or SRC TGT parallel line files; "
                         "or speech: a .tsv of AUDIO_PATH<TAB>TRANSCRIPT lines or a .jsonl of "
                         '{"audio": ..., "text": ...} objects; speech translation: '
                         "AUDIO_PATH<TAB>TRANSLATION<TAB>TRANSCRIPT lines or objects with a "
                         '"transcript" (the source language)')
    pr.add_argument("--dev", nargs="+", metavar="FILE", help="dev pairs (same forms as --train)")
    pr.add_argument("--test", nargs="+", metavar="FILE", help="test pairs (same forms as --train)")
    pr.add_argument("--src-tokenizer", default="sentencepiece",
                    choices=["char", "whitespace", "sentencepiece"])
    pr.add_argument("--tgt-tokenizer", choices=["char", "whitespace", "sentencepiece"],
                    help="default: same as --src-tokenizer")
    pr.add_argument("--vocab-size", type=int,
                    help="SentencePiece vocabulary size (default: the recipe's, else 8000)")
    pr.add_argument("--spm-type", choices=["bpe", "unigram"], help="default: the recipe's, else bpe")
    pr.add_argument("--joint-vocab", action=argparse.BooleanOptionalAction, default=None,
                    help="one SentencePiece model and vocabulary for both sides "
                         "(default: the recipe's, else separate)")
    pr.add_argument("--lowercase", action="store_true")
    pr.add_argument("--max-len", type=int, help="drop pairs longer than this many tokens (default 256)")
    pr.add_argument("--metric", choices=["text", "g2p", "asr"],
                    help="text: BLEU/chrF (the default for text corpora and audio lists with "
                         "transcripts); g2p: word/phoneme error rates; asr: WER/CER (the "
                         "default for audio lists)")
    pr.add_argument("--group-refs", action="store_true",
                    help="score against all targets of the same source (multi-reference)")
    pr.add_argument("--hours", type=float,
                    help="bible-speech: hours of training audio to synthesize (default 10); "
                         "a killed or smaller earlier run is continued")
    pr.add_argument("--voices", choices=["standard", "wide"],
                    help="bible-speech: the voice set (default standard: six training voices; "
                         "wide: eleven, written to data/bible-speech-wide by default)")
    pr.add_argument("--voice", help="bible-tts: the voice to learn (default flite-slt; the "
                                    "bible-speech voices: flite-rms, flite-awb, espeak-en-us, "
                                    "...)")
    pr.add_argument("--inputs", choices=["phonemes", "chars"],
                    help="bible-tts: what the model reads (default phonemes: CMUdict, then --g2p)")
    pr.add_argument("--g2p", metavar="RUN",
                    help="bible-tts: an encdec G2P run that pronounces the corpus words CMUdict "
                         "lacks (default: spell them letter by letter)")
    pr.add_argument("--speech-dir", metavar="DIR",
                    help="bible-speech-es: the bible-speech directory whose audio it uses "
                         "(default data/bible-speech)")
    pr.add_argument("--targets-from", metavar="DATA_DIR",
                    help="bible-speech-es: use the target tokenizer and vocabulary of this "
                         "prepared text data (e.g. data/bible-en-es) instead of training one, so "
                         "a translation run's decoder can start the model "
                         "(train.init_decoder_from)")
    pr.add_argument("--stream", action="store_true",
                    help="corpora larger than memory: tokenize in chunks over --workers "
                         "processes straight into the memory-mapped arrays, SentencePiece "
                         "trained on a sample (text pairs only)")
    pr.add_argument("--tokenizer-sample", type=int, default=1_000_000, metavar="N",
                    help="--stream: train SentencePiece on a uniform sample of N training pairs "
                         "(default 1,000,000)")
    pr.add_argument("--chunk-pairs", type=int, default=100_000, metavar="N",
                    help="--stream: lines per chunk a worker tokenizes (default 100,000)")
    pr.add_argument("--workers", type=int, metavar="N",
                    help="--stream: worker processes (default: one per core, at most 8)")
    pr.add_argument("--force", action="store_true",
                    help="prepare a recipe again; replace an --out directory that is not an "
                         "encdec data directory")
    pr.set_defaults(func=_prepare)

    tr = sub.add_parser("train", help="train a model: encdec train CONFIG [section.key=value ...]")
    tr.add_argument("config", help="YAML config, or a run directory to continue with --resume")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    tr.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    tr.set_defaults(func=_train)

    av = sub.add_parser("average", help="average the weights of a run's last N checkpoints")
    av.add_argument("run", help="run directory")
    av.add_argument("--last", type=int, required=True, help="how many of the newest checkpoints")
    av.add_argument("--name", help="checkpoint directory to write (default avg-lastN)")
    av.add_argument("--force", action="store_true",
                    help="replace an existing checkpoint directory of that name that is not an "
                         "earlier average")
    av.add_argument("--raw", action="store_true",
                    help="a run trained with train.ema_decay: average its trained weights, not "
                         "their moving average (--last 1 takes them out as they are)")
    av.set_defaults(func=_average)

    def decode_args(q):
        q.add_argument("run", help="run directory")
        q.add_argument("--checkpoint", default="best", help="best, last, or a step-NNNNNNN name")
        q.add_argument("--beam", type=int, help="beam size (1 = greedy)")
        q.add_argument("--method", choices=["greedy", "beam", "sample", "nat", "ctc"],
                       help="default: the run's decode.method. greedy, beam, sample: left to "
                            "right; nat: non-autoregressive Mask-Predict (runs trained with "
                            "model.arch=nat, whose default it is); ctc: CTC best path (speech "
                            "models with a CTC head)")
        q.add_argument("--ctc-weight", type=float,
                       help="speech: weight of the CTC prefix score in beam search (joint "
                            "CTC/attention; 0 attention only, 1 CTC only)")
        q.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
        q.add_argument("--batch-size", type=int,
                       help="inputs decoded together (default: the run's decode.batch_size)")
        q.add_argument("--length-penalty", type=float, help="beam: score / length**penalty")
        q.add_argument("--temperature", type=float, help="sampling temperature")
        q.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens")
        q.add_argument("--top-p", type=float, help="sampling: keep the smallest set with this mass")
        q.add_argument("--decoder", choices=["at", "nat"], help=argparse.SUPPRESS)
        q.add_argument("--iterations", type=int, help="nat: refinement passes (1 = single pass)")
        q.add_argument("--length-beam", type=int, help="nat: candidate lengths decoded at once")
        q.add_argument("--length-scale", type=float,
                       help="nat: multiply predicted lengths (<1 shorter, >1 longer output)")
        q.add_argument("--early-exit", action=argparse.BooleanOptionalAction,
                       help="nat: stop refining an output once a pass leaves it unchanged "
                            "(default: the run's decode.early_exit, normally on); "
                            "--no-early-exit always runs every pass")

    ev = sub.add_parser("evaluate", help="decode and score a split")
    decode_args(ev)
    ev.add_argument("--split", default="test")
    ev.add_argument("--data", help="data directory (default: the run's)")
    ev.add_argument("--limit", type=int, default=0, help="only the first N inputs")
    ev.add_argument("--rerank", metavar="RUN", help=RERANK_HELP)
    ev.add_argument("--asr-judge", metavar="RUN",
                    help="text-to-speech runs: also judge the audio with this encdec speech "
                         "recognition run (besides pocketsphinx; reported as encdec's own)")
    ev.set_defaults(func=_evaluate)

    tl = sub.add_parser("translate", help="decode stdin, a file, or an interactive prompt")
    decode_args(tl)
    tl.add_argument("--nbest", type=int, help="outputs per input")
    tl.add_argument("--input", "-i", help="input file (default: stdin)")
    tl.add_argument("--output", "-o", help="output file (default: stdout)")
    tl.add_argument("--scores", action="store_true", help="print each output's score after a tab")
    tl.add_argument("--long-inputs", choices=["split", "truncate"], default="split",
                    help="inputs longer than the model was trained on: translate them in "
                         "segments cut at sentence or clause ends (split), or cut them (truncate); "
                         "a warning names the line either way")
    tl.add_argument("--no-progress", action="store_true", help="no progress bar for --input")
    tl.add_argument("--rerank", metavar="RUN", help=RERANK_HELP)
    tl.add_argument("--engine", choices=["encdec", "ctranslate2"], default="encdec",
                    help=ENGINE_HELP)
    tl.add_argument("--export", metavar="DIR", help=EXPORT_HELP)
    tl.set_defaults(func=_translate)

    tc = sub.add_parser("transcribe", help="speech to text: encdec transcribe RUN FILE|DIR ...")
    decode_args(tc)
    tc.add_argument("inputs", nargs="+", metavar="AUDIO",
                    help="audio files (WAV, FLAC, OGG, ...) or directories of them")
    tc.add_argument("--output", "-o", help="write FILE<TAB>transcript lines here (default stdout)")
    tc.add_argument("--no-progress", action="store_true", help="no progress bar")
    tc.set_defaults(func=_transcribe)

    sp = sub.add_parser("speak", help='text to speech: encdec speak RUN "text" -o out.wav, '
                                      "or -i lines.txt -o DIR/")
    sp.add_argument("run", help="a text-to-speech run (fastspeech, transformer_tts or tacotron2)")
    sp.add_argument("text", nargs="?", help="what to say (or -i FILE)")
    sp.add_argument("-i", "--input", help="a text file: one utterance per line, to DIR/NNNN.wav")
    sp.add_argument("-o", "--output", required=True, help="a .wav file (one text) or a directory")
    sp.add_argument("--length-scale", type=float, default=1.0,
                    help="multiplies the predicted durations: 1.2 speaks 20%% slower (fastspeech)")
    sp.add_argument("--batch-size", type=int, default=16, help="texts synthesized together")
    sp.add_argument("--checkpoint", default="best")
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(func=_speak)

    pl = sub.add_parser("pipeline", help="speech translation by a cascade: encdec pipeline "
                                         "ASR_RUN MT_RUN FILE|DIR ...")
    pl.add_argument("asr_run", help="speech run: audio -> transcript")
    pl.add_argument("mt_run", help="text run: transcript -> output")
    pl.add_argument("inputs", nargs="+", metavar="AUDIO",
                    help="audio files (WAV, FLAC, OGG, ...) or directories of them")
    pl.add_argument("--checkpoint", default="best",
                    help="both runs' checkpoint: best, last, or a step-NNNNNNN name")
    pl.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    pl.add_argument("--asr-method", choices=["greedy", "beam", "ctc"],
                    help="the recognizer's search (default: its run's)")
    pl.add_argument("--asr-beam", type=int, help="the recognizer's beam size")
    pl.add_argument("--asr-ctc-weight", type=float,
                    help="the recognizer's CTC weight in joint beam search")
    pl.add_argument("--asr-nbest", type=int, default=1,
                    help="transcripts per file (at most the recognizer's beam)")
    pl.add_argument("--rescore", action="store_true",
                    help="translate all --asr-nbest transcripts and keep the output with the "
                         "best sum of recognizer and translation scores")
    pl.add_argument("--mt-beam", type=int, help="the translation model's beam size (1 = greedy)")
    pl.add_argument("--show-transcript", action="store_true",
                    help="print the transcript the output came from as a third column")
    pl.add_argument("--output", "-o", help="write FILE<TAB>output lines here (default stdout)")
    pl.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl.set_defaults(func=_pipeline)

    ds = sub.add_parser("distill", help="write a teacher run's outputs as a new training target set")
    decode_args(ds)
    ds.add_argument("--split", default="train", help="split of the teacher's data to translate")
    ds.add_argument("--data", metavar="DIR",
                    help="speech translation: a data directory with source-language transcripts "
                         "(bible-speech-es) whose transcripts the teacher, a text translation "
                         "run, translates into new targets for an end-to-end model")
    ds.add_argument("--out", help="data directory to write (default: the teacher's, or --data's, "
                                  "+ -distilled)")
    ds.add_argument("--force", action="store_true",
                    help="replace an --out directory that is not an encdec data directory")
    ds.set_defaults(func=_distill)

    xp = sub.add_parser("export", help="write a Transformer run as a CTranslate2 model: "
                                       "encdec export RUN --format ctranslate2 --out DIR")
    xp.add_argument("run", help="run directory (model.arch transformer)")
    xp.add_argument("--format", choices=["ctranslate2"], default="ctranslate2",
                    help="what to export to (default ctranslate2)")
    xp.add_argument("--quantization", choices=["int8", "int8_float32", "float16"],
                    help="weight type (default: float32, the same outputs as encdec)")
    xp.add_argument("--out", metavar="DIR",
                    help="directory to write (default RUN/export/ctranslate2, the one "
                         "--engine ctranslate2 uses); an earlier export there is replaced")
    xp.add_argument("--checkpoint", default="best", help="best, last, avg-lastN or step-NNNNNNN")
    xp.set_defaults(func=_export)

    from encdec.experiments import EXPERIMENTS

    ex = sub.add_parser("experiment", help="train variants for a fixed budget and compare them")
    ex.add_argument("name", choices=list(EXPERIMENTS))
    ex.add_argument("overrides", nargs="*", help="overrides of the base config for every variant")
    ex.add_argument("--config", default="configs/g2p-small.yaml", help="base config")
    ex.add_argument("--minutes", type=float,
                    help="training minutes per variant (default, when --steps is not given: "
                         "50 / number of variants)")
    ex.add_argument("--steps", type=int,
                    help="optimizer steps per variant: the same work for each, reproducible")
    ex.add_argument("--nat-config", default="configs/g2p-nat.yaml",
                    help="nat: the non-autoregressive model's config (the base config's size)")
    ex.add_argument("--from", dest="from_run", metavar="RUN",
                    help="sampling: continue a copy of this trained run for --steps more steps "
                         "in each variant (its config is the base), scheduled sampling "
                         "starting from zero at the run's last step; scored at the last step. "
                         "nat: this trained autoregressive run is the AT model and the teacher "
                         "(none is trained)")
    ex.add_argument("--seeds", help="train every variant once per seed, e.g. 1,2,3, in "
                    "OUT/VARIANT/seed-N; the table gives each variant's mean and range "
                    "(default: once, with the config's seed, in OUT/VARIANT)")
    ex.add_argument("--jobs", type=int, default=1,
                    help="models trained at once, each in its own process on cores / jobs "
                         "threads (as sweep --jobs); compare by --steps then")
    ex.add_argument("--out", help="output directory (default runs/experiment-NAME)")
    ex.set_defaults(func=_experiment)

    sw = sub.add_parser("sweep", help="train a grid of settings x seeds for one budget; one table")
    sw.add_argument("config", help="base config")
    sw.add_argument("overrides", nargs="*", help="overrides of the base config for every run")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a setting to vary (repeatable; every combination is trained)")
    sw.add_argument("--seeds", default="1", help="seeds, e.g. 1,2,3 (default 1)")
    sw.add_argument("--minutes", type=float, help="training minutes per run")
    sw.add_argument("--steps", type=int, help="optimizer steps per run")
    sw.add_argument("--average", type=int, default=0, metavar="N",
                    help="also score the average of each run's last N checkpoints")
    sw.add_argument("--split", default="test", help="split to score (default test)")
    sw.add_argument("--beam", type=int, help="beam size (default: the config's)")
    sw.add_argument("--method", choices=["greedy", "beam"], help="default: the config's")
    sw.add_argument("--jobs", type=int, default=1,
                    help="runs trained at once, each in its own process on cores / jobs threads "
                         "(two one-thread runs do more work in all on 2 cores than one "
                         "two-thread run); compare settings by --steps then, or keep every run "
                         "paired (a run alone at the end trains faster per minute)")
    sw.add_argument("--out", required=True, help="output directory (one per sweep)")
    sw.set_defaults(func=_sweep)

    sv = sub.add_parser("serve", help="HTTP API and web page: encdec serve RUN [serve.key=value ...]")
    sv.add_argument("run", help="run directory")
    sv.add_argument("overrides", nargs="*",
                    help="serve.* settings, e.g. serve.max_batch_size=1 serve.max_inputs=16")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--checkpoint", default="best", help="best, last, avg-lastN or step-NNNNNNN")
    sv.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    sv.add_argument("--threads", type=int, default=0, help="CPU threads for the model (0: all)")
    sv.add_argument("--then", metavar="RUN",
                    help="a pipeline: a text run that translates each transcript of the speech "
                         "run RUN; POST /v1/transcribe then answers with a \"translation\" too")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    sv.add_argument("--api-key-file", metavar="FILE",
                    help="require 'Authorization: Bearer <key>' with a key from FILE (one per "
                         "line); wins over $ENCDEC_API_KEY. GET /v1/health and the page stay open")
    sv.add_argument("--engine", choices=["encdec", "ctranslate2"], default="encdec",
                    help=ENGINE_HELP + "; ctranslate2 returns no attention")
    sv.add_argument("--export", metavar="DIR", help=EXPORT_HELP)
    sv.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from encdec.checkpoint import CheckpointError
    from encdec.config import ConfigError
    from encdec.data.corpus import DataError
    from encdec.speak import SpeakError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after a flag (`train RUN --resume train.lr=1e-4`)
        if args.command not in ("train", "serve", "experiment", "sweep") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    # the command line of this process (not a call from Python): `train` may re-execute it
    args.own_process = argv is None
    from encdec.train import TrainingInterrupted

    try:
        args.func(args)
        sys.stdout.flush()  # inside the try: a reader gone before the last write is caught
    except (ConfigError, DataError, CheckpointError, SpeakError) as err:
        print(f"encdec: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"encdec: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("encdec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`encdec ... | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # what a shell reports for a death by SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
