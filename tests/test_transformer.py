"""The Transformer against torch.nn.Transformer with the same weights; tied output."""

import sys
from pathlib import Path

import torch

from encdec.config import ModelConfig
from encdec.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference import ReferenceTransformer  # noqa: E402


def test_transformer_equals_torch_nn_transformer_with_same_weights():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, norm="pre")
    ours = build_model(cfg, 15, 17).eval()
    ref = ReferenceTransformer(cfg, 15, 17).load_encdec(ours).eval()
    src = torch.tensor([[4, 5, 6, 7], [8, 9, 0, 0]])
    tgt_in = torch.tensor([[1, 4, 5], [1, 6, 0]])
    with torch.no_grad():
        expected = ref.output(ref(src, tgt_in))
        got = ours.logits(ours(src, tgt_in))
    keep = tgt_in.ne(0)
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    # and the reference's cached greedy and beam loops (benchmarks/decode_speed.py) give our
    # outputs, whole (an early or missing EOS would show)
    from encdec.decoding import beam_search, greedy

    ours_out = [h[0].tokens for h in greedy(ours, src, max_len_a=1.0, max_len_b=3)]
    assert ref.greedy(src, 1.0, 3) == ours_out
    ours_beam = [h[0].tokens for h in beam_search(ours, src, beam_size=3, length_penalty=1.0,
                                                  max_len_a=1.0, max_len_b=3)]
    assert ref.beam(src, 3, 1.0, 1.0, 3) == ours_beam


def test_tied_output_and_parameter_count():
    cfg = ModelConfig(d_model=256, n_heads=4, enc_layers=3, dec_layers=3, ffn_dim=1024)
    model = build_model(cfg, 31, 43)
    assert model.output.weight is model.tgt_embed.tokens.weight
    n = sum(p.numel() for p in model.parameters())
    assert 5.5e6 < n < 5.6e6  # g2p-small, as in the peer table
