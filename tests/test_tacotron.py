"""Tacotron2 (encdec/models/tacotron.py): the step-by-step training pass against synthesis's
steps, scheduled sampling against what synthesis feeds itself, batch against single, and that
it learns a toy alignment."""

import pytest
import torch
from test_tts import _toy_tts_batch, assert_attention_gives_the_durations, train_toy_tts

from encdec.config import Config, ConfigError, ModelConfig
from encdec.models.tacotron import LocationSensitiveAttention, Tacotron2

M = 16  # mel bins of the toy data


def _tiny(seed: int = 0, dropout: float = 0.0, prenet_dropout: float = 0.0) -> Tacotron2:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="tacotron2", d_model=32, n_heads=2, enc_layers=1, ffn_dim=64,
                      dropout=dropout, tts_prenet_dim=24, tts_decoder_dim=40)
    return Tacotron2(cfg, 12, n_mels=M, reduction=2, prenet_dropout=prenet_dropout,
                     postnet_layers=2, attention_dim=20, location_filters=4, location_kernel=5)


def _steps(model, tok, mel, own: bool):
    """Frames before the post-net (B, S * 2, M), one ``synthesis_step`` at a time, each fed the
    recording's previous frame (``own=False``) or the model's own (``own=True``)."""
    with torch.no_grad():
        state, _ = model.start_synthesis(tok)
        prev = mel.new_zeros(mel.size(0), M)
        steps = []
        for s in range(-(-mel.size(1) // 2)):
            out, _, _ = model.synthesis_step(prev, state, s)
            steps.append(out)
            prev = out[:, -1] if own else mel[:, min(2 * s + 1, mel.size(1) - 1)]
    return torch.cat(steps, dim=1)[:, :mel.size(1)]


def test_training_pass_equals_synthesis_steps_fed_the_recording_or_its_own_frames():
    model = _tiny().eval()
    gen = torch.Generator().manual_seed(1)
    tok, mel, lengths, _ = _toy_tts_batch(gen, torch.randn(12, M, generator=gen), B=6)
    real = torch.arange(mel.size(1))[None, :] < lengths[:, None]
    with torch.no_grad():
        _, forced = model.loss(tok, mel, lengths)
        _, sampled = model.loss(tok, mel, lengths, sampling=1.0)
    torch.testing.assert_close(_steps(model, tok, mel, own=False)[real], forced["before"][real],
                               rtol=1e-5, atol=1e-5)
    # probability 1: every step after the first reads the model's own last frame, as synthesis
    own = _steps(model, tok, mel, own=True)
    torch.testing.assert_close(own[real], sampled["before"][real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(own[real], forced["before"][real], atol=1e-3)
    # and synthesis (stop head ignored: a threshold it never passes) makes those frames
    out = model.synthesize(tok, max_frames=mel.size(1), stop_threshold=1.1)
    after = model._postnet(own, torch.ones(own.shape[:2], dtype=torch.bool))
    first = lengths.min()
    torch.testing.assert_close(out.mels[:, :first], after[:, :first], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="samples step by step"):
        model.loss(tok, mel, lengths, sampling=0.5, passes=2)


def test_synthesis_of_a_batch_equals_each_input_alone():
    model = _tiny(seed=2).eval()
    gen = torch.Generator().manual_seed(4)
    tok, _, _, _ = _toy_tts_batch(gen, torch.randn(12, M, generator=gen), B=4)
    batch = model.synthesize(tok, max_frames=24, stop_threshold=1.1)
    for b in range(tok.size(0)):
        row = tok[b:b + 1, : int(tok[b].ne(0).sum())]
        alone = model.synthesize(row, max_frames=24, stop_threshold=1.1)
        torch.testing.assert_close(batch.mels[b], alone.mels[0], rtol=1e-4, atol=1e-4)
        n = row.size(1)
        torch.testing.assert_close(batch.alignment[b, :, :n], alone.alignment[0],
                                   rtol=1e-4, atol=1e-5)
        assert (batch.alignment[b, :, n:] == 0).all()  # padded tokens get no attention


def test_location_features_move_the_attention():
    """The same query and keys, attended from another place: the previous and cumulative
    weights change the energies through the location convolution."""
    torch.manual_seed(0)
    att = LocationSensitiveAttention(8, 6, d_attention=10, filters=4, kernel=3)
    q, values = torch.randn(2, 8), torch.randn(2, 5, 6)
    keys, mask = att.key(values), torch.ones(2, 5, dtype=torch.bool)
    at_start = torch.zeros(2, 5)
    at_start[:, 0] = 1.0
    later = torch.zeros(2, 5)
    later[:, 3] = 1.0
    c1, w1 = att(q, keys, values, mask, at_start, at_start)
    c2, w2 = att(q, keys, values, mask, later, later + at_start)
    assert torch.allclose(w1.sum(-1), torch.ones(2)) and not torch.allclose(w1, w2, atol=1e-3)
    torch.testing.assert_close(c1, torch.einsum("bn,bnd->bd", w1, values))


def test_tacotron2_learns_a_monotonic_alignment_on_toy_data():
    model = _tiny(seed=0, prenet_dropout=0.2)
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(12, M, generator=gen) * 2
    train_toy_tts(model, gen, protos, steps=250)
    tok, mel, lengths, true = _toy_tts_batch(gen, protos)
    model.eval()
    with torch.no_grad():
        _, parts = model.loss(tok, mel, lengths, prenet_dropout=False)
    assert_attention_gives_the_durations(parts["attention"], tok, lengths, true)


def test_tacotron2_config_is_checked():
    with pytest.raises(ConfigError, match="tts_decoder_dim=0"):
        Config.from_dict({"model": {"arch": "tacotron2", "tts_decoder_dim": 0}})
    with pytest.raises(ConfigError, match="tacotron2 samples step by step"):
        Config.from_dict({"model": {"arch": "tacotron2"},
                          "train": {"scheduled_sampling": "linear", "ss_passes": 2}})
