"""The TTS models' own behaviour on toy data: FastSpeech learns durations without an aligner,
TransformerTTS's cached steps, scheduled sampling, pre-net and attention keys, the guided
attention loss, and a teacher's durations (Tacotron2's are in test_tacotron.py)."""

import math

import pytest
import torch
import torch.nn.functional as F


def _toy_tts_batch(gen, protos, B=16):
    """Tokens whose frames are their own noisy prototype vector, held for 2-6 frames (no token
    twice in a row, so every boundary is visible in the frames)."""
    V = protos.size(0)
    toks, mels, durs = [], [], []
    for _ in range(B):
        n = int(torch.randint(3, 8, (1,), generator=gen))
        t = torch.randint(4, V, (n,), generator=gen)
        for i in range(1, n):
            if t[i] == t[i - 1]:
                t[i] = 4 + (t[i] - 3) % (V - 4)
        d = torch.randint(2, 7, (n,), generator=gen)
        toks.append(t)
        durs.append(d)
        mels.append(protos[t].repeat_interleave(d, 0)
                    + 0.1 * torch.randn(int(d.sum()), protos.size(1), generator=gen))
    N, T = max(len(t) for t in toks), max(len(m) for m in mels)
    tok = torch.zeros(B, N, dtype=torch.long)
    mel = torch.zeros(B, T, protos.size(1))
    dur = torch.zeros(B, N, dtype=torch.long)
    for i, (t, m, d) in enumerate(zip(toks, mels, durs)):
        tok[i, :len(t)], mel[i, :len(m)], dur[i, :len(d)] = t, m, d
    return tok, mel, torch.tensor([len(m) for m in mels]), dur


def test_fastspeech_learns_durations_without_an_aligner_and_length_scale_controls_them():
    from encdec.config import ModelConfig
    from encdec.models.tts import FastSpeech

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(12, 16, generator=gen) * 2
    cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, dropout=0.0)
    model = FastSpeech(cfg, 12, n_mels=16, predictor_channels=32, postnet_layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(220):
        tok, mel, lengths, _ = _toy_tts_batch(gen, protos)
        loss, _ = model.loss(tok, mel, lengths, binarize=step >= 100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tok, mel, lengths, true = _toy_tts_batch(gen, protos)
    real = tok.ne(0)
    with torch.no_grad():
        _, parts = model.loss(tok, mel, lengths)
    learned = parts["durations"]  # the alignment's (MAS) durations of unseen utterances
    assert float(((learned - true).abs() <= 1)[real].float().mean()) >= 0.85
    assert (learned.sum(dim=1) == lengths).all()
    out = model.synthesize(tok)
    slow = model.synthesize(tok, length_scale=2.0)
    total = float(lengths.sum())
    assert abs(float(out.frame_lengths.sum()) - total) < 0.15 * total  # predicted durations
    assert float(slow.frame_lengths.sum()) == pytest.approx(2 * float(out.frame_lengths.sum()),
                                                            rel=0.05)
    assert out.mels.shape == (16, int(out.frame_lengths.max()), 16)
    given = model.synthesize(tok, durations=true)  # durations from elsewhere (e.g. a teacher)
    assert torch.equal(given.frame_lengths, lengths)
    twice_first = torch.ones_like(tok, dtype=torch.float)
    twice_first[:, 0] = 2.0
    per_token = model.synthesize(tok, token_scales=twice_first)
    assert (per_token.durations[:, 1:] == out.durations[:, 1:]).all()
    assert (per_token.durations[:, 0] >= 2 * out.durations[:, 0] - 1).all()


def train_toy_tts(model, gen, protos, steps: int) -> None:
    """``steps`` Adam steps (3e-3) of ``model.loss`` on fresh toy batches."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        tok, mel, lengths, _ = _toy_tts_batch(gen, protos)
        loss, _ = model.loss(tok, mel, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_attention_gives_the_durations(attention, tok, lengths, true):
    """MAS over an attention (B, T, N) gives every row's frames, and three tokens in four
    within a frame of their true durations."""
    from encdec.models.tts import durations_from_attention

    got = durations_from_attention(attention, tok.ne(0).sum(1), lengths)
    assert (got.sum(dim=1) == lengths).all()
    assert float(((got - true).abs() <= 1)[tok.ne(0)].float().mean()) >= 0.75


def _assert_steps_fed_the_recording_equal(model, tok, mel, lengths, before):
    """One cached decoder step at a time (2 frames per step), each fed the recording's previous
    frame, gives the teacher-forced pass's frames ``before`` (B, T, M)."""
    with torch.no_grad():
        memory, mask, embedded = model.encode_with_input(tok)
        caches = model.init_caches(memory, embedded)
        prev = mel.new_zeros(mel.size(0), 16)
        steps = []
        for s in range(-(-mel.size(1) // 2)):
            out, _, _ = model.decode_step(prev, caches, mask[:, None, None, :], s)
            steps.append(out)
            prev = mel[:, min(2 * s + 1, mel.size(1) - 1)]
    stepped = torch.cat(steps, dim=1)[:, :mel.size(1)]
    real = torch.arange(mel.size(1))[None, :] < lengths[:, None]
    torch.testing.assert_close(stepped[real], before[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keys", ["encoder", "embedding"])
def test_transformer_tts_cached_steps_equal_teacher_forcing_and_attention_gives_durations(keys):
    from encdec.config import ModelConfig
    from encdec.models.tts import TransformerTTS

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(12, 16, generator=gen) * 2
    cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, dropout=0.0,
                      tts_attention_keys=keys)
    model = TransformerTTS(cfg, 12, n_mels=16, reduction=2, postnet_layers=2,
                           prenet_dropout=0.2)
    train_toy_tts(model, gen, protos, steps=300)
    tok, mel, lengths, true = _toy_tts_batch(gen, protos)
    model.eval()
    model.prenet_dropout = 0.0  # deterministic, for the equivalence below
    with torch.no_grad():
        _, parts = model.loss(tok, mel, lengths)
    # the teacher way to durations: the guided attention, read by MAS
    assert_attention_gives_the_durations(parts["attention"], tok, lengths, true)
    # one cached step at a time, fed the true previous frames = the teacher-forced pass
    _assert_steps_fed_the_recording_equal(model, tok, mel, lengths, parts["before"])
    out = model.synthesize(tok, max_frames=60)
    assert out.mels.shape[0] == 16 and (out.frame_lengths <= 60).all()
    assert (out.durations.sum(dim=1) == out.frame_lengths).all()


def _tiny_transformer_tts(seed: int, prenet_dim: int = 0):
    """A tiny TransformerTTS (2 frames per step, pre-net dropout off, eval mode) and a toy
    batch: tokens, mels, mel lengths."""
    from encdec.config import ModelConfig
    from encdec.models.tts import TransformerTTS

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(12, 16, generator=gen) * 2
    cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=2, ffn_dim=64, dropout=0.0,
                      tts_prenet_dim=prenet_dim)
    model = TransformerTTS(cfg, 12, n_mels=16, reduction=2, postnet_layers=2, prenet_dropout=0.0)
    tok, mel, lengths, _ = _toy_tts_batch(gen, protos, B=4)
    return model.eval(), tok, mel, lengths


def test_transformer_tts_scheduled_sampling_feeds_the_first_pass_frames():
    """sampling=1: every decoder step after the first reads the teacher-forced pass's own
    prediction of the previous step's last frame, as a cached step fed those frames does;
    sampling=0 is teacher forcing; a fraction mixes the two per step, and gradients flow."""
    model, tok, mel, lengths = _tiny_transformer_tts(seed=3)
    with torch.no_grad():
        _, forced = model.loss(tok, mel, lengths)
        _, none = model.loss(tok, mel, lengths, sampling=0.0)
        _, own = model.loss(tok, mel, lengths, sampling=1.0)
    torch.testing.assert_close(none["before"], forced["before"], rtol=0, atol=0)
    assert not torch.allclose(own["before"], forced["before"], atol=1e-3)
    T = mel.size(1)
    predicted = F.pad(forced["before"], (0, 0, 0, -(-T // 2) * 2 - T))
    with torch.no_grad():
        memory, mask, embedded = model.encode_with_input(tok)
        caches = model.init_caches(memory, embedded)
        prev = mel.new_zeros(mel.size(0), 16)
        steps = []
        for s in range(-(-T // 2)):
            out, _, _ = model.decode_step(prev, caches, mask[:, None, None, :], s)
            steps.append(out)
            prev = predicted[:, 2 * s + 1]
    stepped = torch.cat(steps, dim=1)[:, :T]
    real = torch.arange(T)[None, :] < lengths[:, None]
    torch.testing.assert_close(stepped[real], own["before"][real], rtol=1e-4, atol=1e-4)
    # a fraction: each step's input is the recording's previous frame or the prediction of
    # it, about that fraction the prediction (the first step's is the zero frame)
    seen = []
    prenet = model._prenet
    model._prenet = lambda frames, stochastic=True: seen.append(frames) or prenet(frames, stochastic)
    torch.manual_seed(1)
    with torch.no_grad():
        model.loss(tok, mel, lengths, sampling=0.5)
    del model._prenet
    first_pass, second_pass = seen
    S = first_pass.size(1)
    shifted = torch.cat([first_pass[:, :1], predicted.view(-1, S, 2, 16)[:, :-1, -1]], dim=1)
    truth = (second_pass - first_pass).abs().amax(dim=-1) == 0
    ours = (second_pass - shifted).abs().amax(dim=-1) == 0
    assert (truth | ours).all() and truth[:, 0].all()
    share = float(ours[:, 1:].float().mean())
    assert 0.3 < share < 0.7, share
    model.train()
    loss, _ = model.loss(tok, mel, lengths, sampling=0.5)
    loss.backward()
    assert all(p.grad is not None for p in model.prenet.parameters())


def test_transformer_tts_bottleneck_prenet_is_projected_up_and_steps_equal_teacher_forcing():
    """model.tts_prenet_dim narrower than d_model: the pre-net's layers are that wide and a
    linear layer projects up; cached steps fed the recording's frames equal the teacher-forced
    pass. The default (0) builds the d_model-wide pre-net without a projection, so runs trained
    before the option load unchanged."""
    from encdec.config import Config, ConfigError

    plain = _tiny_transformer_tts(seed=2)[0]
    assert plain.prenet_up is None and not any(k.startswith("prenet_up")
                                               for k in plain.state_dict())
    assert [tuple(l.weight.shape) for l in plain.prenet] == [(32, 16), (32, 32)]
    model, tok, mel, lengths = _tiny_transformer_tts(seed=2, prenet_dim=8)
    assert [tuple(l.weight.shape) for l in model.prenet] == [(8, 16), (8, 8)]
    assert tuple(model.prenet_up.weight.shape) == (32, 8)
    with torch.no_grad():
        _, parts = model.loss(tok, mel, lengths)
    _assert_steps_fed_the_recording_equal(model, tok, mel, lengths, parts["before"])
    loss, _ = model.loss(tok, mel, lengths)
    loss.backward()
    assert model.prenet_up.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.tts_prenet_dim=-1"):
        Config.from_dict({"model": {"arch": "transformer_tts", "tts_prenet_dim": -1}})


def test_transformer_tts_sampling_passes_compound_the_models_own_frames():
    """train.ss_passes: with sampling=1 and k predicting passes, the trained pass's first k + 1
    decoder steps read exactly what synthesis feeds itself (each input a prediction made from
    a prediction, back to the zero frame), and later steps do not (their chains end in a
    recorded frame)."""
    model, tok, mel, lengths = _tiny_transformer_tts(seed=5)
    k = 2
    with torch.no_grad():
        _, own = model.loss(tok, mel, lengths, sampling=1.0, passes=k)
        memory, mask, embedded = model.encode_with_input(tok)
        caches = model.init_caches(memory, embedded)
        prev = mel.new_zeros(mel.size(0), 16)
        free = []
        for s in range(k + 2):
            out, _, _ = model.decode_step(prev, caches, mask[:, None, None, :], s)
            free.append(out)
            prev = out[:, -1]
    free = torch.cat(free, dim=1)  # (B, 2 (k + 2), M): synthesis's first k + 2 steps
    rows = lengths >= 2 * (k + 2)  # rows long enough for both checks
    assert rows.sum() >= 2
    before, free = own["before"][rows], free[rows]
    torch.testing.assert_close(before[:, : 2 * (k + 1)], free[:, : 2 * (k + 1)],
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before[:, 2 * (k + 1): 2 * (k + 2)], free[:, 2 * (k + 1):],
                              atol=1e-3)
    model.train()
    loss, _ = model.loss(tok, mel, lengths, sampling=0.5, passes=2)
    loss.backward()
    assert all(p.grad is not None for p in model.prenet.parameters())


def test_transformer_tts_attention_keys_from_the_embeddings_skip_the_encoder():
    """With tts_attention_keys=embedding the guided attention (one decoder layer here, so its
    queries see no memory) does not move when the encoder's layers change; the values and the
    mel frames still do. With the default keys it moves."""
    from encdec.config import ModelConfig
    from encdec.models.tts import TransformerTTS

    tok, mel, lengths, _ = _toy_tts_batch(torch.Generator().manual_seed(1), torch.randn(12, 16))
    for keys in ("encoder", "embedding"):
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64,
                          dropout=0.0, tts_attention_keys=keys)
        model = TransformerTTS(cfg, 12, n_mels=16, reduction=2, postnet_layers=2,
                               prenet_dropout=0.0).eval()
        with torch.no_grad():
            before = model.loss(tok, mel, lengths)[1]
            for p in model.encoder.parameters():
                p.add_(torch.randn_like(p))
            after = model.loss(tok, mel, lengths)[1]
        moved = (after["attention"] - before["attention"]).abs().max().item()
        assert (moved < 1e-6) == (keys == "embedding"), (keys, moved)
        assert (after["before"] - before["before"]).abs().max().item() > 1e-3
        if keys == "embedding":  # the caches need the embeddings the keys come from
            with pytest.raises(ValueError, match="pass embedded="):
                model.init_caches(model.encode(tok)[0])


def test_guided_attention_weighs_mass_off_the_diagonal_by_its_width():
    from encdec.config import ModelConfig
    from encdec.models.tts import TransformerTTS, guided_attention_loss

    # one row of 4 frames over 2 tokens (a padded third): all mass on token 0, then token 1
    att = torch.zeros(1, 4, 3)
    att[0, :2, 0] = 1.0
    att[0, 2:, 1] = 1.0
    text, frames = torch.tensor([2]), torch.tensor([4])

    def by_hand(sigma):
        total = 0.0
        for t in range(4):
            n = 0 if t < 2 else 1
            total += 1 - math.exp(-(n / 2 - t / 4) ** 2 / (2 * sigma ** 2))
        return total / 8  # 4 frames x 2 real tokens

    for sigma in (0.2, 0.05):
        assert float(guided_attention_loss(att, text, frames, sigma)) == pytest.approx(
            by_hand(sigma), rel=1e-6)
    # a narrower prior costs the same attention more, and model.loss passes the width on
    assert by_hand(0.05) > 1.5 * by_hand(0.2)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, dropout=0.0)
    model = TransformerTTS(cfg, 12, n_mels=16, reduction=2, postnet_layers=2, prenet_dropout=0.0)
    tok, mel, lengths, _ = _toy_tts_batch(torch.Generator().manual_seed(1), torch.randn(12, 16))
    with torch.no_grad():
        wide = model.loss(tok, mel, lengths, guided_sigma=0.2)[1]["guided"]
        narrow = model.loss(tok, mel, lengths, guided_sigma=0.05)[1]["guided"]
    assert narrow > wide > 0


def test_teacher_durations_are_read_once_without_the_prenet_dropout():
    """train.durations_from: the student's durations come from the teacher's attention with the
    pre-net's dropout off, so every epoch teaches the same durations for an utterance, and each
    utterance is read once."""
    from types import SimpleNamespace

    from encdec.config import ModelConfig
    from encdec.losses import tts_loss
    from encdec.models.tts import FastSpeech, TeacherDurations, TransformerTTS
    from encdec.models.tts import durations_from_attention

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    protos = torch.randn(12, 16, generator=gen) * 2
    cfg = ModelConfig(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64, dropout=0.0)
    teacher = TransformerTTS(cfg, 12, n_mels=16, reduction=2, postnet_layers=2,
                             prenet_dropout=0.5).eval()
    student = FastSpeech(cfg, 12, n_mels=16, predictor_channels=32, postnet_layers=2).eval()
    tok, mel, lengths, _ = _toy_tts_batch(gen, protos)
    n = tok.ne(0).sum(1)

    def read(seed, **kw):
        torch.manual_seed(seed)
        with torch.no_grad():
            _, parts = teacher.loss(tok, mel, lengths, **kw)
        return durations_from_attention(parts["attention"], n, lengths)

    # with the dropout on (as the teacher trained) the durations change from call to call
    assert not torch.equal(read(1), read(2))
    assert torch.equal(read(1, prenet_dropout=False), read(2, prenet_dropout=False))
    keys = [("train", i) for i in range(len(tok))]
    batch = SimpleNamespace(tokens=tok, mels=mel, mel_lengths=lengths, keys=keys,
                            num_tgt_tokens=int(lengths.sum()))
    durations = TeacherDurations(teacher)
    losses = []
    for seed in (1, 2):  # a batch without keys: read afresh on each call
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(tts_loss(student, SimpleNamespace(**{**vars(batch), "keys": None}),
                                   teacher=durations)[0])
    assert torch.equal(losses[0], losses[1])
    first = durations(batch)
    assert torch.equal(first, read(1, prenet_dropout=False)) and len(durations.cache) == len(tok)
    # read once: a changed teacher no longer changes a cached utterance (rows in any order)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    changed = read(1, prenet_dropout=False)
    assert not torch.equal(changed, first)
    order = torch.arange(len(tok)).flip(0)
    again = durations(SimpleNamespace(tokens=tok[order], mels=mel[order],
                                      mel_lengths=lengths[order], keys=[keys[i] for i in order]))
    assert torch.equal(again, first[order])
    assert torch.equal(durations(SimpleNamespace(tokens=tok, mels=mel, mel_lengths=lengths,
                                                 keys=None)), changed)


@pytest.mark.parametrize("arch", ["fastspeech", "transformer_tts", "tacotron2"])
def test_tts_postnet_layers_zero_builds_none_and_counts_the_output_loss_once(arch):
    from encdec.config import ModelConfig
    from encdec.models import model_for_data

    meta = {"modality": "tts", "src_vocab_size": 12, "feature_bins": 16, "name": "toy"}
    sizes = {"arch": arch, "d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1,
             "ffn_dim": 64, "dropout": 0.0, "tts_decoder_dim": 32, "tts_prenet_dim": 16}
    with_net = model_for_data(ModelConfig(**sizes, tts_postnet_layers=3), meta)
    assert len(with_net.postnet.convs) == 2 and with_net.postnet_out is not None
    model = model_for_data(ModelConfig(**sizes, tts_postnet_layers=0), meta)
    assert model.postnet is None and model.postnet_out is None
    assert not any("postnet" in name for name, _ in model.named_parameters())
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tok, mel, lengths, dur = _toy_tts_batch(gen, torch.randn(12, 16, generator=gen), B=4)
    if arch == "fastspeech":
        total, parts = model.loss(tok, mel, lengths, durations=dur)
        expected = parts["duration"] + parts["mel"]
    else:
        total, parts = model.loss(tok, mel, lengths, guided_weight=0.0, prenet_dropout=False)
        expected = parts["mel"] + parts["stop"]
    assert parts["postnet"] == pytest.approx(parts["mel"])  # the output is the decoder's frames
    assert float(total) == pytest.approx(expected, rel=1e-5)
