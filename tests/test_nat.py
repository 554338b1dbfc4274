"""Non-autoregressive decoding: the length predictor, CMLM/GLAT losses, Mask-Predict on a
scripted model, length_scale, distillation, and a NAT run through the ordinary CLI."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from encdec import checkpoint
from encdec.cli import main
from encdec.config import ModelConfig
from encdec.data.dataset import BinarizedSplit, collate, read_eval
from encdec.data.vocab import PAD
from encdec.decoding.nat import mask_predict, remask_count
from encdec.losses import nat_loss
from encdec.models import build_model
from encdec.models.base import EncoderOut
from encdec.translate import Translator

ROOT = Path(__file__).resolve().parents[1]


def tiny_nat(**kw):
    cfg = ModelConfig(arch="nat", d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64,
                      dropout=0.0, length_offset=4, **kw)
    torch.manual_seed(0)
    return build_model(cfg, 20, 24).eval()


def test_length_predictor_shapes_and_classes():
    model = tiny_nat()
    src = torch.tensor([[5, 6, 7, PAD, PAD], [5, 6, 7, 8, 9]])
    enc = model.encode(src)
    logits = model.length_logits(enc)
    assert logits.shape == (2, 9)  # offsets -4..4
    classes = model.length_classes(enc, torch.tensor([1, 20]))
    assert classes.tolist() == [4 - 2, 8]  # 1 - 3 = -2 -> class 2; 20 - 5 = 15 clipped to +4
    lengths = model.lengths_of_classes(enc, torch.tensor([[2, 4], [8, 0]]))
    assert lengths.tolist() == [[1, 3], [9, 1]]
    assert torch.allclose(model.length_log_probs(enc).exp().sum(-1), torch.ones(2))
    # Padding does not change the length prediction (masked mean of the encoder output).
    enc_short = model.encode(src[:1, :3])
    torch.testing.assert_close(model.length_logits(enc_short), logits[:1], atol=1e-5, rtol=1e-5)


def _batch(tiny_data, n=6):
    import numpy as np
    return collate(BinarizedSplit(tiny_data, "train"), np.arange(n))


@pytest.mark.parametrize("objective", ["cmlm", "glat", "glat_cmlm"])
def test_nat_loss_is_token_mean_plus_weighted_length_loss(tiny_data, objective):
    from encdec.data.assets import load_assets
    assets = load_assets(tiny_data)
    cfg = ModelConfig(arch="nat", d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64,
                      dropout=0.0, length_offset=4, nat_objective=objective)
    batch = _batch(tiny_data)
    losses = {}
    for weight in (0.0, 1.0):
        cfg.length_loss_weight = weight
        torch.manual_seed(0)
        model = build_model(cfg, len(assets.src_vocab), len(assets.tgt_vocab))
        torch.manual_seed(1)
        loss, nll = nat_loss(model, batch, 0.0)
        losses[weight] = loss.item()
        assert torch.isfinite(loss)
        if weight == 0:  # no smoothing, no length loss: the loss is the NLL
            assert nll.item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert model.length_head.weight.grad.abs().sum() > 0 and model.mask_embed.grad.abs().sum() > 0
    enc = model.encode(batch.src_tokens)
    tgt_len = (batch.tgt_out.ne(PAD).sum(1) - 1)
    length_ce = torch.nn.functional.cross_entropy(model.length_logits(enc),
                                                  model.length_classes(enc, tgt_len))
    assert losses[1.0] - losses[0.0] == pytest.approx(length_ce.item() * batch.num_tgt_tokens,
                                                      rel=1e-4)


@pytest.mark.parametrize("objective, first_pass", [("cmlm", None), ("glat", "all"),
                                                      ("glat_cmlm", "some")])
def test_glancing_pass_runs_only_on_glancing_sentences(tiny_data, objective, first_pass):
    from encdec.data.assets import load_assets
    assets = load_assets(tiny_data)
    cfg = ModelConfig(arch="nat", d_model=32, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=64,
                      dropout=0.0, length_offset=4, nat_objective=objective)
    torch.manual_seed(0)
    model = build_model(cfg, len(assets.src_vocab), len(assets.tgt_vocab))
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append((args[0].size(0),
                                                                  torch.is_grad_enabled())))
    batch = _batch(tiny_data, n=16)
    torch.manual_seed(3)
    nat_loss(model, batch, 0.1)
    first = [n for n, grad in calls if not grad]
    assert calls[-1] == (16, True)  # the trained pass sees the whole batch
    if first_pass is None:
        assert first == []
    elif first_pass == "all":
        assert first == [16]
    else:
        assert len(first) == 1 and 0 < first[0] < 16


class ScriptedNAT:
    """Mask-Predict's model contract with scripted confidences: pass i predicts token 10 + i at
    every position, with log-probability ``confidence[i][position]``; records what it saw."""

    def __init__(self, length_probs, confidences, vocab=30, tokens=None):
        self.length_probs = torch.tensor(length_probs)  # classes = lengths 0..C-1 here
        self.confidences = confidences
        self.tokens = tokens  # token of pass i: tokens[i] (default 10 + i)
        self.vocab = vocab
        self.seen = []

    def encode(self, src):
        return EncoderOut(torch.zeros(src.size(0), src.size(1), 1), src.ne(PAD))

    def length_log_probs(self, enc):
        return self.length_probs.log().expand(enc.memory.size(0), -1)

    def lengths_of_classes(self, enc, classes):
        return classes

    def project_memory(self, enc):
        return None

    def decode_parallel(self, tokens, observed, enc, need_attention=False, memory=None):
        i = len(self.seen)
        self.seen.append((tokens.clone(), observed.clone()))
        N, T = tokens.shape
        conf = torch.tensor((self.confidences[i] + [0.5] * T)[:T])
        # Other tokens share the rest of the mass; token 10 + i gets probability conf.
        logits = torch.full((N, T, self.vocab), -30.0)
        logits[:, :, self.tokens[i] if self.tokens else 10 + i] = conf.log()
        logits[:, :, 29] = (1 - conf).log()
        attn = torch.full((N, T, enc.memory.size(1)), 1.0 / enc.memory.size(1)) if need_attention else None
        return logits, attn

    def logits(self, hidden):
        return hidden


def test_shared_memory_equals_replicated_encoder_output(tiny_data):
    """decode_parallel with the memory projected once for groups of rows gives the hidden
    states and attention of the plain path on a row-replicated encoder output."""
    from encdec.data.assets import load_assets
    from encdec.models.base import EncoderOut
    assets = load_assets(tiny_data)
    cfg = ModelConfig(arch="nat", d_model=32, n_heads=2, enc_layers=1, dec_layers=2, ffn_dim=64,
                      dropout=0.0, length_offset=4)
    torch.manual_seed(0)
    model = build_model(cfg, len(assets.src_vocab), len(assets.tgt_vocab)).eval()
    src = torch.tensor([[5, 6, 7, 8], [9, 5, PAD, PAD]])
    enc = model.encode(src)
    L = 3
    lengths = torch.tensor([4, 3, 5, 2, 1, 3])  # L candidate lengths per input
    tokens = torch.full((6, 5), PAD)
    for r, n in enumerate(lengths.tolist()):
        tokens[r, :n] = torch.randint(4, len(assets.tgt_vocab), (n,))
    observed = tokens.ne(PAD) & (torch.rand(6, 5) < 0.5)
    rows = torch.arange(2).repeat_interleave(L)
    plain = EncoderOut(enc.memory[rows], enc.memory_mask[rows])
    h1, w1 = model.decode_parallel(tokens, observed, plain, need_attention=True)
    h2, w2 = model.decode_parallel(tokens, observed, enc, need_attention=True,
                                   memory=model.project_memory(enc))
    real = tokens.ne(PAD)
    torch.testing.assert_close(h1[real], h2[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1[real], w2[real], rtol=1e-5, atol=1e-6)


def test_mask_predict_remasks_the_least_confident_positions():
    confidences = [[0.9, 0.2, 0.6, 0.3, 0.8], [0.5, 0.95, 0.4, 0.7, 0.5], [0.99] * 5]
    model = ScriptedNAT([0, 0, 0, 0, 0, 1.0], confidences)  # length 5 for sure
    src = torch.tensor([[5, 6, 7]])
    out = mask_predict(model, src, iterations=3, need_attention=True)[0][0]
    assert [remask_count(torch.tensor(5), i, 3).item() for i in range(3)] == [3, 1, 0]
    first, second, third = [obs[0].tolist() for _, obs in model.seen]
    assert first == [False] * 5
    # After pass 1, the 3 least confident (positions 1, 3, 2) are masked again.
    assert second == [True, False, False, False, True]
    # Pass 2 re-predicted 1, 2, 3 with confidences 0.95, 0.4, 0.7: the least confident of all
    # five (0.9, 0.95, 0.4, 0.7, 0.8) is position 2.
    assert third == [True, True, False, True, True]
    assert out.tokens == [10, 11, 12, 11, 10]
    expected = torch.tensor([0.9, 0.95, 0.99, 0.7, 0.8]).log().mean()
    assert out.score == pytest.approx(float(expected), rel=1e-5)
    assert out.attention.shape == (6, 3) and out.attention[-1].abs().sum() == 0
    # Observed positions are fed the tokens predicted before.
    assert model.seen[2][0][0].tolist()[:2] == [10, 11]


@pytest.mark.parametrize("early_exit, passes", [(True, 2), (False, 3)])
def test_early_exit_stops_once_a_pass_changes_nothing(early_exit, passes):
    confidences = [[0.9, 0.6, 0.7, 0.65, 0.8], [0.55, 0.95, 0.9, 0.7, 0.6], [0.99] * 5]
    model = ScriptedNAT([0, 0, 0, 0, 0, 1.0], confidences, tokens=[10, 10, 10])
    out = mask_predict(model, torch.tensor([[5, 6, 7]]), iterations=3,
                       early_exit=early_exit)[0][0]
    # Pass 2 re-predicts positions 1, 3, 2 as the same tokens: with early exit, pass 3 never
    # runs; without, it re-predicts the least confident (position 3, 0.7).
    assert len(model.seen) == passes
    assert out.tokens == [10] * 5
    final = [0.9, 0.95, 0.9, 0.7, 0.8] if early_exit else [0.9, 0.95, 0.9, 0.99, 0.8]
    assert out.score == pytest.approx(float(torch.tensor(final).log().mean()), rel=1e-5)


def test_rows_with_nothing_to_remask_are_not_decoded_again():
    # Candidate lengths 4 and 1: with 3 passes a length-1 row has nothing to re-mask after the
    # first pass (1 * 2 // 3 = 0), so only the length-4 row (and only its width) goes on.
    model = ScriptedNAT([0, 0.45, 0, 0, 0.55], [[0.5] * 4] * 3)
    hyps = mask_predict(model, torch.tensor([[5, 6]]), iterations=3, length_beam=2, nbest=2,
                        early_exit=False)[0]
    assert [tuple(t.shape) for t, _ in model.seen] == [(2, 4), (1, 4), (1, 4)]
    assert sorted(len(h.tokens) for h in hyps) == [1, 4]
    assert {tuple(h.tokens) for h in hyps} == {(10,), (12, 11, 10, 10)}


@pytest.mark.parametrize("early_exit", [True, False])
def test_batched_mask_predict_equals_one_input_at_a_time(early_exit):
    """Rows leave the batch at different passes (early exit, nothing left to re-mask); the
    rows still refined must decode exactly as they would alone."""
    model = tiny_nat()
    torch.manual_seed(1)
    src = torch.randint(4, 20, (6, 7))
    for r, n in enumerate([7, 2, 5, 1, 6, 3]):
        src[r, n:] = PAD
    settings = dict(iterations=5, length_beam=3, nbest=3, need_attention=True,
                    early_exit=early_exit, max_output_len=12)
    batched = mask_predict(model, src, **settings)
    for r in range(6):
        n = int(src[r].ne(PAD).sum())
        alone = mask_predict(model, src[r:r + 1, :n], **settings)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[r]]
        for a, b in zip(alone, batched[r]):
            assert a.score == pytest.approx(b.score, abs=1e-4)
            torch.testing.assert_close(a.attention, b.attention[:, :n], atol=1e-5, rtol=1e-4)


def test_single_pass_and_length_beam():
    # Lengths 3 (p 0.6) and 2 (p 0.4); the length-2 output is more confident.
    model = ScriptedNAT([0, 0, 0.4, 0.6], [[0.3, 0.3, 0.3]])
    model.confidences = [[0.3, 0.3, 0.3]]
    one = mask_predict(model, torch.tensor([[4, 5]]), iterations=1, length_beam=1)[0]
    assert len(one) == 1 and len(one[0].tokens) == 3
    # Candidates rank by mean token log-prob + length log-prob.
    for conf, order in (([0.99, 0.99, 0.5], [2, 3]), ([0.99, 0.99, 0.9], [3, 2])):
        model = ScriptedNAT([0, 0, 0.45, 0.55], [conf])
        two = mask_predict(model, torch.tensor([[4, 5]]), iterations=1, length_beam=2, nbest=2)[0]
        assert [len(h.tokens) for h in two] == order
        expected = {n: math.log(p) + sum(math.log(c) for c in conf[:n]) / n
                    for n, p in ((2, 0.45), (3, 0.55))}
        assert [h.score for h in two] == pytest.approx([expected[n] for n in order], rel=1e-5)


@pytest.mark.parametrize("scale, expected", [(1.0, 6), (0.5, 3), (1.5, 9), (0.1, 1), (3.0, 10)])
def test_length_scale_multiplies_the_predicted_length(scale, expected):
    model = ScriptedNAT([0] * 6 + [1.0], [[0.5] * 20])
    out = mask_predict(model, torch.tensor([[4, 5, 6]]), iterations=1, length_scale=scale,
                       max_output_len=10)[0][0]
    assert len(out.tokens) == expected  # round(6 * scale), at least 1, at most max_len


def test_maximum_output_length_is_per_input_not_the_padded_width():
    from encdec.config import DecodeConfig
    from encdec.decoding import generate

    model = tiny_nat()
    cfg = DecodeConfig(method="nat", iterations=2, length_scale=4.0, max_len_a=1.0, max_len_b=1)
    short, long_ = [5, 6], [7, 8, 9, 10, 11, 12, 13, 14]
    batch = torch.tensor([short + [PAD] * 6, long_])
    together = generate(model, batch, cfg)
    alone = generate(model, torch.tensor([short]), cfg)
    assert len(alone[0][0].tokens) <= 3  # at most 1 * 2 + 1
    assert [h.tokens for h in together[0]] == [h.tokens for h in alone[0]]
    assert len(together[1][0].tokens) <= 9
    # Given lengths obey the same per-input bound.
    out = mask_predict(model, batch, iterations=1, lengths=torch.tensor([8, 8]),
                       max_output_len=torch.tensor([3, 9]))
    assert [len(h[0].tokens) for h in out] == [3, 8]


def test_given_lengths_replace_the_predicted_ones():
    model = tiny_nat()
    src = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    out = mask_predict(model, src, iterations=2, lengths=torch.tensor([2, 6]))
    assert [len(h[0].tokens) for h in out] == [2, 6]
    # The score's length term is the predictor's log-probability of the given length.
    predicted = mask_predict(model, src, iterations=2)
    again = mask_predict(model, src, iterations=2,
                         lengths=torch.tensor([len(h[0].tokens) for h in predicted]))
    for p, a in zip(predicted, again):
        assert p[0].tokens == a[0].tokens and p[0].score == pytest.approx(a[0].score, abs=1e-5)


@pytest.fixture(scope="module")
def distilled(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "data"
    assert main(["distill", str(tiny_run), "--split", "train", "--out", str(out), "--beam", "2"]) == 0
    return out


def test_distill_out_never_replaces_a_directory_that_is_not_a_data_directory(tiny_run, tmp_path,
                                                                           capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.pdf").write_text("keep")
    assert main(["distill", str(tiny_run), "--split", "dev", "--out", str(out)]) == 2
    assert "is not an encdec data directory" in capsys.readouterr().err
    assert (out / "paper.pdf").read_text() == "keep"
    assert main(["distill", str(tiny_run), "--split", "dev", "--out", str(out), "--force",
                 "--beam", "1"]) == 0
    assert (out / "meta.json").exists() and not (out / "paper.pdf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_distillation_is_aligned_with_the_source(distilled, tiny_run, tiny_data):
    src = (tiny_data / "train.src.txt").read_text().splitlines()
    assert (distilled / "train.src.txt").read_text().splitlines() == src
    tgt = (distilled / "train.tgt.txt").read_text().splitlines()
    assert len(tgt) == len(src)
    teacher = Translator.from_run(tiny_run).translate(src, beam_size=2)
    assert tgt == [t if t else o for t, o in
                   zip(teacher, (tiny_data / "train.tgt.txt").read_text().splitlines())]
    split = BinarizedSplit(distilled, "train")
    from encdec.data.assets import load_assets
    vocab = load_assets(distilled).tgt_vocab
    for i in (0, 7, len(src) - 1):
        assert " ".join(vocab.decode(split.tgt(i).tolist())) == tgt[i]
    for name in ("dev.tgt.txt", "test.eval.jsonl", "train.eval.jsonl", "tgt.vocab"):
        assert (distilled / name).read_bytes() == (tiny_data / name).read_bytes()
    meta = json.loads((distilled / "meta.json").read_text())
    assert meta["distilled"]["split"] == "train" and meta["distilled"]["decode"]["beam_size"] == 2


def _nat_config(tmp_path, data, name, objective="glat", **train):
    common = dict(max_steps=6, valid_every=3, log_every=1, valid_max_inputs=8, **train)
    path = write_config(tmp_path / f"{name}.yaml", data, tmp_path / name, **common)
    text = path.read_text().replace("model:\n", f"model:\n  arch: nat\n  nat_objective: {objective}\n")
    path.write_text(text.replace("decode:\n", "decode:\n  method: nat\n  iterations: 2\n"))
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_nat_resume_with_dropout_equals_uninterrupted(distilled, tmp_path, device):
    """Resuming restores every generator training draws from: dropout and the NAT's random
    masks and glancing choices, per process, on CPU and CUDA."""
    over = ["model.dropout=0.1", "model.attention_dropout=0.1", f"train.device={device}"]
    full = _nat_config(tmp_path, distilled, "full", objective="glat_cmlm")
    part = _nat_config(tmp_path, distilled, "part", objective="glat_cmlm")
    assert main(["train", str(full), *over]) == 0
    assert main(["train", str(part), *over, "train.max_steps=4"]) == 0
    state = load_file(str(checkpoint.resolve(tmp_path / "part", "last") / "trainer.safetensors"))
    assert "rng.0" in state and ("cuda_rng.0" in state) == (device == "cuda")
    assert main(["train", str(tmp_path / "part"), "--resume", "train.max_steps=6"]) == 0
    a = load_file(str(checkpoint.resolve(tmp_path / "full", "last") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tmp_path / "part", "last") / "model.safetensors"))
    exact = device == "cpu"  # CUDA kernels may sum in another order from run to run
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0 if exact else 1e-3,
                                   atol=0 if exact else 1e-4, msg=key)
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl")
                        .read_text().splitlines()) if "loss" in r]
    if exact:
        assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_nat_student_trains_resumes_and_decodes_through_the_cli(distilled, tmp_path):
    assert main(["train", str(_nat_config(tmp_path, distilled, "full"))]) == 0
    assert main(["train", str(_nat_config(tmp_path, distilled, "part")), "train.max_steps=3"]) == 0
    assert main(["train", str(tmp_path / "part"), "--resume", "train.max_steps=6"]) == 0
    a = load_file(str(checkpoint.resolve(tmp_path / "full", "last") / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tmp_path / "part", "last") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ev = subprocess.run([sys.executable, "-m", "encdec.cli", "evaluate", str(tmp_path / "full"),
                         "--method", "nat", "--iterations", "4", "--length-beam", "3",
                         "--no-early-exit"],
                        capture_output=True, text=True, env=env)
    assert ev.returncode == 0, ev.stderr
    assert "WER" in ev.stdout
    written = json.loads(Path(ev.stdout.strip().rsplit("-> ", 1)[1]).read_text())
    assert written["decode"]["early_exit"] is False and written["decode"]["iterations"] == 4
    tr = Translator.from_run(tmp_path / "full")
    assert len(tr.translate(["abc", "", "hgfedcba"], iterations=3, length_scale=2.0)) == 3
    bad = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(tmp_path / "full"),
                          "--beam", "4"], input="abc\n", capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "method nat" in bad.stderr


def test_two_process_ddp_nat(distilled, tmp_path):
    cfg = write_config(tmp_path / "ddp.yaml", distilled, tmp_path / "ddp", max_steps=4,
                       valid_every=4, log_every=2, valid_max_inputs=8)
    cfg.write_text(cfg.read_text().replace("model:\n", "model:\n  arch: nat\n")
                   .replace("decode:\n", "decode:\n  method: nat\n"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "encdec.cli", "train", str(cfg)], capture_output=True, text=True, env=env,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def nat_run(distilled, tmp_path_factory):
    root = tmp_path_factory.mktemp("natrun")
    path = write_config(root / "nat.yaml", distilled, root / "run", max_steps=6, valid_every=6,
                        log_every=3, valid_max_inputs=8)
    path.write_text(path.read_text().replace("model:\n", "model:\n  arch: nat\n")
                    .replace("decode:\n", "decode:\n  method: nat\n"))
    assert main(["train", str(path)]) == 0
    return root / "run"


def test_teacher_forced_scores_equal_beam_search_scores(tiny_run, tiny_data):
    """score_candidates (one teacher-forced pass) gives each beam output the score beam search
    (incremental, cached) gave it."""
    from encdec.data.vocab import UNK
    from encdec.decoding.beam import beam_search
    tr = Translator.from_run(tiny_run)
    a = tr.assets
    src = [e["src"] for e in read_eval(tiny_data, "test")[:12]]
    texts, expected = [], []
    for s in src:
        ids = torch.tensor([a.src_vocab.encode(a.src_tokenizer.encode(s))])
        # Outputs with <unk> do not survive detokenization; the others are scored again.
        hyps = [h for h in beam_search(tr.model, ids, beam_size=4, nbest=4)[0]
                if UNK not in h.tokens]
        texts.append([a.tgt_tokenizer.decode(a.tgt_vocab.decode(h.tokens)) for h in hyps])
        expected.append([h.score for h in hyps])
    assert sum(map(len, texts)) > 30
    scores = tr.score_candidates(src, texts, batch_size=5)
    for sc, ex in zip(scores, expected):
        assert sc == pytest.approx(ex, abs=1e-4)


def test_rerank_orders_the_candidates_by_the_reranker(nat_run, tiny_run, tiny_data):
    nat, at = Translator.from_run(nat_run), Translator.from_run(tiny_run)
    src = [e["src"] for e in read_eval(tiny_data, "test")[:10]] + [""]
    plain = nat.translate_nbest(src, iterations=2, length_beam=3, nbest=3)
    best = nat.translate_nbest(src, iterations=2, length_beam=3, rerank=at)
    both = nat.translate_nbest(src, iterations=2, length_beam=3, nbest=2, rerank=at)
    assert [len(b) for b in best] == [1] * len(src) and [len(b) for b in both] == [2] * len(src)
    for p, b, two, s in zip(plain, best, both, src):
        if not s:
            assert b[0].text == "" and b[0].score == 0.0
            continue
        texts = [t.text for t in p]
        at_scores = at.score_candidates([s], [texts])[0]
        order = sorted(range(3), key=lambda i: -at_scores[i])
        assert [t.text for t in two] == [texts[i] for i in order[:2]]
        assert [t.score for t in two] == pytest.approx([at_scores[i] for i in order[:2]])
        assert b[0].text == two[0].text
    # An autoregressive model reranking its own beams keeps their order and scores.
    own = at.translate_nbest(src[:5], beam_size=3, nbest=3)
    again = at.translate_nbest(src[:5], beam_size=3, nbest=3, rerank=at)
    for o, a in zip(own, again):
        assert [t.text for t in o] == [t.text for t in a]
        assert [t.score for t in o] == pytest.approx([t.score for t in a], abs=1e-4)


def test_rerank_errors_and_cli(nat_run, tiny_run, tiny_data):
    from encdec.config import ConfigError
    nat, at = Translator.from_run(nat_run), Translator.from_run(tiny_run)
    with pytest.raises(ConfigError, match="several candidates"):
        nat.translate_nbest(["abc"], length_beam=1, rerank=at)
    with pytest.raises(ConfigError, match="several candidates"):
        at.translate_nbest(["abc"], method="greedy", rerank=at)
    with pytest.raises(ConfigError, match="must be autoregressive"):
        at.translate_nbest(["abc"], beam_size=2, rerank=nat)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ev = subprocess.run([sys.executable, "-m", "encdec.cli", "evaluate", str(nat_run),
                         "--length-beam", "3", "--rerank", str(tiny_run), "--limit", "8"],
                        capture_output=True, text=True, env=env)
    assert ev.returncode == 0, ev.stderr
    written = Path(ev.stdout.strip().rsplit("-> ", 1)[1])
    assert written.name == "test-nat4-lb3-rerank-first8.json"  # --limit 8 is in the name
    assert json.loads(written.read_text())["rerank"] == str(tiny_run)
    tl = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(nat_run),
                         "--length-beam", "2", "--rerank", str(tiny_run)],
                        input="abc\n", capture_output=True, text=True, env=env)
    assert tl.returncode == 0 and len(tl.stdout.splitlines()) == 1, tl.stderr
    bad = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(nat_run),
                          "--rerank", str(tiny_run)], input="abc\n", capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "several candidates" in bad.stderr and not bad.stdout


def test_serve_takes_early_exit(nat_run):
    from fastapi.testclient import TestClient

    from encdec.serve import create_app
    client = TestClient(create_app(Translator.from_run(nat_run)))
    ok = client.post("/v1/translate", json={"inputs": ["abc"], "early_exit": False})
    assert ok.status_code == 200 and ok.json()["decode"]["early_exit"] is False
    bad = client.post("/v1/translate", json={"inputs": ["abc"], "early_exit": "no"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "early_exit"


def test_the_decoder_family_is_one_option_and_the_old_spelling_warns(capsys):
    from encdec.cli import _decode_overrides, build_parser
    from encdec.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(["evaluate", "RUN", "--method", "nat", "--iterations", "4"])
    assert _decode_overrides(args)["method"] == "nat"
    assert capsys.readouterr().err == ""
    assert "--decoder" not in parser._subparsers._group_actions[0].choices["evaluate"].format_help()
    old = parser.parse_args(["translate", "RUN", "--decoder", "nat"])
    assert _decode_overrides(old)["method"] == "nat"
    assert "--decoder is deprecated" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not --method beam"):
        _decode_overrides(parser.parse_args(["evaluate", "RUN", "--decoder", "nat", "--method", "beam"]))
