"""Speech recognition end to end and by equivalence: joint CTC/attention beam search against
attention-only beam (weight 0) and against exact CTC probabilities (weight 1), batched against
one at a time, resume against uninterrupted training, and prepare -> train -> evaluate ->
transcribe through the CLI on tone words (each letter a tone; see conftest)."""

import itertools
import json

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from conftest import TINY_SPEECH_MODEL, tone_word, write_speech_config
from encdec.cli import main
from encdec.config import Config, ConfigError, ModelConfig
from encdec.data.vocab import EOS, PAD
from encdec.decoding import beam_search, ctc_best_path, greedy
from encdec.models import build_model


def _model(ctc_weight=0.3, vocab=7, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY_SPEECH_MODEL, "ctc_weight": ctc_weight, **kw})
    return build_model(cfg, 20, vocab).eval()


def _source(lengths, bins=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), bins, generator=g)
    for b, n in enumerate(lengths):
        feats[b, n:] = 0.0
    return {"src_feats": feats, "src_lengths": torch.tensor(lengths)}


def _row(source, b):
    n = int(source["src_lengths"][b])
    return {"src_feats": source["src_feats"][b:b + 1, :n], "src_lengths": source["src_lengths"][b:b + 1]}


@pytest.mark.parametrize("block", ["transformer", "conformer"])
def test_joint_beam_with_weight_0_equals_attention_beam(block):
    model = _model(encoder_block=block)
    source = _source([40, 31, 23])
    plain = beam_search(model, source, beam_size=4, nbest=4, max_len_a=0.5, max_len_b=4)
    joint = beam_search(model, source, beam_size=4, nbest=4, max_len_a=0.5, max_len_b=4,
                        ctc_weight=0.0)
    for p, j in zip(plain, joint):
        assert [h.tokens for h in p] == [h.tokens for h in j]
        assert [h.score for h in p] == pytest.approx([h.score for h in j], abs=1e-5)


def _ctc_log_prob(log_probs, tokens):
    """log p_CTC(tokens | input) by PyTorch's CTC loss (sums over every alignment)."""
    if not tokens:
        return float(log_probs.detach()[:, PAD].sum())
    return -float(F.ctc_loss(log_probs.detach()[:, None], torch.tensor([tokens]),
                             torch.tensor([log_probs.size(0)]), torch.tensor([len(tokens)]),
                             blank=PAD, reduction="sum"))


def test_joint_beam_with_weight_1_is_ctc_prefix_beam_search():
    """A CTC-only model: every finished hypothesis scores exactly log p_CTC(y), and the best
    is the most probable output among all sequences (brute force over a 3-token vocabulary)."""
    model = _model(ctc_weight=1.0, vocab=7)  # outputs 3 (<unk>), 4, 5, 6
    source = _source([27, 23])  # 5 and 4 encoder positions
    hyps = beam_search(model, source, beam_size=12, nbest=12, length_penalty=0.0,
                       max_len_a=1.0, max_len_b=3, ctc_weight=1.0)
    lp = model.encode(**source).ctc_log_probs
    for b in range(2):
        S = int(model.front.output_lengths(source["src_lengths"])[b])
        row = lp[b, :S]
        for h in hyps[b]:
            assert h.score == pytest.approx(_ctc_log_prob(row, h.tokens), abs=1e-4)
        every = [list(y) for n in range(S + 1) for y in itertools.product((3, 4, 5, 6), repeat=n)]
        best = max(every, key=lambda y: _ctc_log_prob(row, y))
        assert hyps[b][0].tokens == best


def test_batched_decoding_equals_one_at_a_time():
    model = _model()
    source = _source([44, 19, 30])
    cases = [lambda s: beam_search(model, s, beam_size=3, max_len_a=0.5, max_len_b=3,
                                   ctc_weight=0.4),
             lambda s: ctc_best_path(model, s), lambda s: greedy(model, s, 0.5, 3)]
    for decode in cases:
        batched = decode(source)
        for b in range(3):
            alone = decode(_row(source, b))
            assert batched[b][0].tokens == alone[0][0].tokens
            assert batched[b][0].score == pytest.approx(alone[0][0].score, abs=1e-4)


def test_ctc_best_path_scores_its_path_and_shows_the_alignment():
    model = _model()
    source = _source([35])
    (hyp,), = ctc_best_path(model, source, need_attention=True)
    with torch.no_grad():
        lp = model.encode(**source).ctc_log_probs[0]
    assert hyp.score == pytest.approx(float(lp.max(-1).values.sum()), abs=1e-4)
    assert hyp.attention.shape == (len(hyp.tokens) + 1, lp.size(0))
    assert EOS not in hyp.tokens and PAD not in hyp.tokens


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="decode.method=ctc"):
        Config.from_dict({"decode": {"method": "ctc"}})
    with pytest.raises(ConfigError, match="no attention decoder"):
        Config.from_dict({"model": {"arch": "speech", "ctc_weight": 1.0},
                          "decode": {"method": "greedy"}})
    with pytest.raises(ConfigError, match="model.subsampling"):
        Config.from_dict({"model": {"arch": "speech", "subsampling": 3}})
    with pytest.raises(ConfigError, match="augment.snr_db"):
        Config.from_dict({"augment": {"snr_db": [20, 10]}})
    with pytest.raises(ConfigError, match="augment.start_step"):
        Config.from_dict({"augment": {"start_step": -1}})


def test_text_arch_on_speech_data_is_refused(tiny_speech_data, tmp_path, capsys):
    cfg = write_speech_config(tmp_path / "c.yaml", tiny_speech_data, tmp_path / "run",
                              model={"arch": "transformer"})
    assert main(["train", str(cfg), "decode.ctc_weight=0"]) == 2
    assert "model.arch=speech for audio inputs" in capsys.readouterr().err


def test_resumed_training_equals_uninterrupted(tiny_speech_data, tmp_path):
    """Augmentation (speed, noise, SpecAugment) is drawn per batch from the saved position, so
    stopping after 6 steps and resuming gives the weights of 12 steps in one go."""
    from safetensors.torch import load_file

    one = write_speech_config(tmp_path / "one.yaml", tiny_speech_data, tmp_path / "one",
                              max_steps=12, valid_every=6, model={"dropout": 0.1})
    two = write_speech_config(tmp_path / "two.yaml", tiny_speech_data, tmp_path / "two",
                              max_steps=6, valid_every=6, model={"dropout": 0.1})
    # augmentation starts after the resume point, so both phases are covered
    assert main(["train", str(one), "augment.start_step=8"]) == 0
    assert main(["train", str(two), "augment.start_step=8"]) == 0
    assert main(["train", str(tmp_path / "two"), "--resume", "train.max_steps=12"]) == 0
    a = load_file(str(tmp_path / "one/checkpoints/step-0000012/model.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step-0000012/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_augmentation_waits_for_start_step(tiny_speech_data, tmp_path):
    """Before augment.start_step the updates are those of training without augmentation."""
    from safetensors.torch import load_file

    def weights(name, *overrides):
        cfg = write_speech_config(tmp_path / f"{name}.yaml", tiny_speech_data, tmp_path / name,
                                  max_steps=4, valid_every=4, model={"dropout": 0.1})
        assert main(["train", str(cfg), *overrides]) == 0
        return load_file(str(tmp_path / name / "checkpoints/step-0000004/model.safetensors"))

    clean = weights("clean", "augment.speed_perturb=[1.0]", "augment.noise_prob=0",
                    "augment.freq_masks=0", "augment.time_masks=0")
    late = weights("late", "augment.start_step=4")
    early = weights("early", "augment.start_step=2")
    for key in clean:
        torch.testing.assert_close(late[key], clean[key], rtol=0, atol=0)
    assert any(not torch.equal(early[key], clean[key]) for key in clean)


def test_vocal_tract_length_perturbation_in_training_batches(tiny_speech_data):
    """augment.vtlp warps each utterance's filterbank by its own factor: batches differ from
    clean ones, the same seed gives the same batch, and [1, 1] (off) draws nothing, so every
    other augmentation keeps its random stream."""
    from encdec.config import AugmentConfig
    from encdec.data.utterances import AudioFront, Augmenter, UtteranceSplit, collate_speech

    meta = json.loads((tiny_speech_data / "meta.json").read_text())
    split, front = UtteranceSplit(tiny_speech_data, "train"), AudioFront.load(tiny_speech_data, meta)
    idx = np.arange(6)

    def batch(seed=(3,), **aug):
        cfg = AugmentConfig(**{"freq_masks": 0, "time_masks": 0, **aug})
        return collate_speech(split, idx, front, Augmenter(cfg, 16000), seed=seed).src_feats

    clean = collate_speech(split, idx, front).src_feats
    plain = {"speed_perturb": (1.0,), "noise_prob": 0.0}
    torch.testing.assert_close(batch(**plain), clean, rtol=0, atol=0)
    warped = batch(**plain, vtlp=(0.9, 1.1))
    torch.testing.assert_close(batch(**plain, vtlp=(0.9, 1.1)), warped, rtol=0, atol=0)
    assert all((warped[b] - clean[b]).abs().max() > 0.05 for b in range(len(idx)))
    assert not torch.equal(batch(seed=(4,), **plain, vtlp=(0.9, 1.1)), warped)
    # off draws nothing: the other augmentations keep the random streams they had before
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    assert Augmenter(AugmentConfig(), 16000).warps(6, rng) is None
    assert rng.bit_generator.state == state
    factors = Augmenter(AugmentConfig(vtlp=(0.9, 1.1)), 16000).warps(6, rng)
    assert len(factors) == 6 and all(0.9 <= w <= 1.1 for w in factors)
    with pytest.raises(ConfigError, match=r"augment.vtlp=\[1.2, 0.9\]"):
        Config.from_dict({"model": {"arch": "speech"}, "augment": {"vtlp": [1.2, 0.9]}})


def test_prepare_train_evaluate_transcribe(tiny_speech_run, tiny_speech_data, tmp_path, capsys):
    meta = json.loads((tiny_speech_data / "meta.json").read_text())
    assert meta["modality"] == "speech" and meta["utterances"]["train"] == 160
    # evaluate: WER and CER per group, joint beam and CTC best path
    for args in ([], ["--method", "ctc"], ["--beam", "3", "--ctc-weight", "0.5"]):
        assert main(["evaluate", str(tiny_speech_run), "--split", "test", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("WER") >= 6 and "real-time factor" in out
    result = json.loads((tiny_speech_run / "eval" / "test-ctc.json").read_text())
    assert result["scores"]["wer"] < 60, result["scores"]  # trained: untrained is ~100 or more
    assert set(result["groups"]) == {"all"} and result["real_time_factor"] > 0
    # validation also scores the CTC best path: the same WER as evaluate --method ctc
    # (at the first validation, where the two decoders still differ)
    last = [json.loads(line) for line in (tiny_speech_run / "metrics.jsonl").read_text().splitlines()
            if "valid_wer" in line][0]
    assert main(["evaluate", str(tiny_speech_run), "--split", "dev", "--method", "ctc",
                 "--checkpoint", f"step-{last['step']:07d}"]) == 0
    dev = json.loads(next((tiny_speech_run / "eval").glob("dev-ctc*.json")).read_text())
    assert last["valid_ctc_wer"] == pytest.approx(dev["scores"]["wer"])
    assert last["valid_ctc_cer"] == pytest.approx(dev["scores"]["cer"])
    assert last["valid_ctc_wer"] != last["valid_wer"], last
    capsys.readouterr()
    # transcribe: files and a directory; an unreadable file is reported, the rest transcribed
    words = ["abc", "fed", "ace"]
    for i, w in enumerate(words):
        soundfile.write(str(tmp_path / f"{i}.wav"), tone_word(w), 16000)
    (tmp_path / "bad.wav").write_text("not audio")
    code = main(["transcribe", str(tiny_speech_run), str(tmp_path / "0.wav"), str(tmp_path / "bad.wav"),
                 str(tmp_path / "1.wav"), "--no-progress", "--method", "ctc"])
    captured = capsys.readouterr()
    assert code == 2 and "bad.wav: not an audio file" in captured.err
    assert "real-time factor" in captured.err
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / "0.wav"), str(tmp_path / "1.wav")]
    (tmp_path / "bad.wav").unlink()
    assert main(["transcribe", str(tiny_speech_run), str(tmp_path), "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_python_api_takes_paths_and_arrays_at_any_rate(tiny_speech_run, tmp_path):
    import soxr

    from encdec.transcribe import Transcriber

    tr = Transcriber.from_run(tiny_speech_run)
    wave = tone_word("bad")
    soundfile.write(str(tmp_path / "a.wav"), wave, 16000, subtype="FLOAT")  # same samples
    at_8k = soxr.resample(wave, 16000, 8000)
    stereo_48k = np.stack([soxr.resample(wave, 16000, 48000)] * 2, axis=1)
    texts = tr.transcribe([str(tmp_path / "a.wav"), (wave, 16000), (at_8k, 8000),
                           (stereo_48k, 48000)], method="ctc")
    assert texts[0] == texts[1]  # a file and its samples are the same input
    assert all(isinstance(t, str) for t in texts)
    with pytest.raises(Exception, match="NaN or infinite"):
        tr.transcribe([(np.full(16000, np.nan, dtype=np.float32), 16000)])
    # long audio is decoded in segments and joined
    long = np.concatenate([tone_word(w) for w in ["abc", "fed", "bead", "cafe"] * 10])  # 15 s
    tr.max_segment_s = 10.0
    warnings = []
    nbest = tr.transcribe_nbest([(long, 16000)], method="ctc",
                                warn=lambda i, m: warnings.append(m))
    assert warnings and "segments" in warnings[0]
    from encdec.audio.io import split_long

    pieces = [torch.from_numpy(long)[a:b].numpy() for a, b in split_long(torch.from_numpy(long),
                                                                         16000, 10.0)]
    assert len(pieces) >= 2
    alone = tr.transcribe([(p, 16000) for p in pieces], method="ctc")
    assert nbest[0][0].text == " ".join(t for t in alone if t)


def test_energy_floor_is_what_dither_adds_on_average():
    """Digital silence gets the mean energy Kaldi's dither of 1.0 gives it (per band, within
    0.25 in log energy over one second of dithered frames), not log(float epsilon) = -15.9;
    loud bands keep their energy."""
    from encdec.audio.features import FbankOptions, LogMel
    from encdec.data.utterances import AudioFront

    front = AudioFront(None)
    silence, _ = front.log_mel_energies([torch.zeros(16000)])
    torch.manual_seed(3)
    dithered, _ = LogMel(FbankOptions(dither=1.0)).train()(torch.zeros(1, 16000))
    assert (silence[0] - dithered[0].exp().mean(0).log()).abs().max() < 0.25
    raw, _ = front.log_mel(torch.zeros(1, 16000))
    assert raw.min() < -15 and silence.min() > -5
    tone = torch.from_numpy(tone_word("abc"))
    floored, _ = front.log_mel_energies([tone])
    plain, _ = front.log_mel(tone[None] * 32768.0)
    loud = plain > 15
    assert loud.any() and (floored[loud] - plain[loud]).abs().max() < 1e-3


def test_ctc_only_loss_is_the_ctc_loss_and_leaves_the_decoder_out():
    """The CTC warm-up's loss is the encoder's CTC loss with weight 1; no gradient reaches
    the decoder, and the encoder's gradient is that of the CTC loss alone."""
    from types import SimpleNamespace

    from encdec.losses import ctc_attention_loss

    model = _model(ctc_weight=0.3).train()
    source = _source([40, 31, 23])
    tgt = torch.tensor([[3, 4, 5, EOS], [6, 3, EOS, PAD], [4, EOS, PAD, PAD]])
    batch = SimpleNamespace(**source, tgt_in=torch.cat([torch.full((3, 1), 1), tgt[:, :-1]], 1),
                            tgt_out=tgt, num_tgt_tokens=int(tgt.ne(PAD).sum()))
    loss, nll = ctc_attention_loss(model, batch, 0.1, ctc_only=True)
    loss.backward()
    decoder = [n for n, _ in model.named_parameters()
               if n.startswith(("tgt_embed.", "decoder.", "dec_norm.", "output."))]
    assert decoder and all(p.grad is None for n, p in model.named_parameters() if n in decoder)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if n not in decoder}
    model.zero_grad(set_to_none=True)
    out = model.encode(**source)
    targets = tgt.masked_fill(tgt.eq(EOS), PAD)
    expected = F.ctc_loss(out.ctc_log_probs.transpose(0, 1), targets, out.memory_mask.sum(1),
                          targets.ne(PAD).sum(1), blank=PAD, reduction="sum", zero_infinity=True)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and float(nll) == float(loss)
    for name, grad in got.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad)
    joint, _ = ctc_attention_loss(model, batch, 0.1)
    assert float(joint) != pytest.approx(float(loss))


def test_ctc_warmup_leaves_the_decoder_untouched_then_trains_it(tiny_speech_data, tmp_path):
    """During train.ctc_warmup_steps the decoder keeps its initial weights whatever the
    learning rate, while the encoder trains; the update after the warm-up trains it."""
    from safetensors.torch import load_file

    def weights(name, steps, *overrides):
        cfg = write_speech_config(tmp_path / f"{name}.yaml", tiny_speech_data, tmp_path / name,
                                  max_steps=steps, valid_every=steps, model={"dropout": 0.1})
        assert main(["train", str(cfg), *overrides]) == 0
        return load_file(str(tmp_path / name / f"checkpoints/step-{steps:07d}/model.safetensors"))

    warm = weights("warm", 3, "train.ctc_warmup_steps=3")
    slow = weights("slow", 3, "train.ctc_warmup_steps=3", "train.lr=1e-4")
    joint = weights("joint", 4, "train.ctc_warmup_steps=3")
    decoder = [k for k in warm if k.startswith(("tgt_embed.", "decoder.", "dec_norm.", "output."))]
    encoder = [k for k in warm if k not in decoder]
    assert decoder and encoder
    for key in decoder:
        torch.testing.assert_close(warm[key], slow[key], rtol=0, atol=0)
    assert all(not torch.equal(warm[k], slow[k]) for k in encoder)
    assert all(not torch.equal(joint[k], warm[k]) for k in decoder)


def test_validation_decodes_in_batches_of_the_training_batch_audio(tiny_speech_data, tmp_path,
                                                                   monkeypatch):
    """Validation decodes at most train.max_frames of padded audio at a time (10 ms frames):
    decoding's own default of 200 s per batch set the asr-small hour's peak memory."""
    from encdec.decoding import audio

    budgets, real = [], audio.decode_audio

    def spy(*args, **kwargs):
        budgets.append(kwargs.get("max_batch_s"))
        return real(*args, **kwargs)

    monkeypatch.setattr(audio, "decode_audio", spy)
    cfg = write_speech_config(tmp_path / "c.yaml", tiny_speech_data, tmp_path / "run",
                              max_frames=1500, max_steps=2, valid_every=2)
    assert main(["train", str(cfg)]) == 0
    assert budgets == [15.0, 15.0]  # the greedy pass and the CTC best path
