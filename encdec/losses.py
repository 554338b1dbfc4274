"""Label-smoothed cross-entropy over the non-pad target positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encdec.data.vocab import EOS, PAD
from encdec.scheduled_sampling import mix_predictions


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, smoothing: float):
    """Summed loss and summed NLL over ``target`` (N,) given ``logits`` (N, V).

    The smoothed loss spreads ``smoothing`` uniformly over the vocabulary (Szegedy et al.):
    (1 - smoothing) * NLL + smoothing * mean over the vocabulary of -log p, as in
    ``F.cross_entropy(label_smoothing=...)``. The plain NLL, what perplexity is made of, comes
    from the same log-softmax: with large vocabularies a second pass over the logits costs
    several percent of a training step. PAD targets are ignored. The gradient is written in
    one pass (see ``_SmoothedCrossEntropy``).
    """
    return _SmoothedCrossEntropy.apply(logits, target, smoothing)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Label-smoothed cross-entropy whose backward writes d loss / d logits directly:
    softmax - (1 - smoothing) * onehot(target) - smoothing / V, zero on PAD rows, in place on
    the saved log-probabilities. Autograd's chain through log_softmax, gather and mean costs
    five passes over (N, V) and a zero-filled buffer as large: 0.35 s of a 2 s step on the
    Bible preset (7,809 subwords, 5,300 target tokens per batch)."""

    @staticmethod
    def forward(ctx, logits, target, smoothing):
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        loss, nll_sum = _smoothed_sums(log_probs, target, smoothing)
        ctx.save_for_backward(log_probs, target)
        ctx.smoothing, ctx.logits_dtype, ctx.spent = smoothing, logits.dtype, False
        ctx.mark_non_differentiable(nll_sum)
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        if ctx.spent:  # the saved buffer became the gradient the first time
            raise RuntimeError("label_smoothed_nll: backward through the loss twice is not "
                               "supported (retain_graph=True)")
        ctx.spent = True
        log_probs, target = ctx.saved_tensors
        grad = _logits_grad_(log_probs, target, ctx.smoothing)  # in the saved buffer
        grad.mul_(grad_loss)
        return grad.to(ctx.logits_dtype), None, None


def _smoothed_sums(log_probs: torch.Tensor, target: torch.Tensor, smoothing: float):
    """(loss, NLL), each summed over the rows of ``log_probs`` (n, V) whose ``target`` is not
    PAD: NLL = -log p(target); loss = (1 - smoothing) * NLL + smoothing * mean of -log p."""
    keep = target.ne(PAD)
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1).masked_fill(~keep, 0.0)  # (n,)
    if smoothing == 0.0:
        return nll.sum(), nll.sum()
    smooth = -log_probs.mean(dim=-1).masked_fill(~keep, 0.0)  # (n,)
    return ((1.0 - smoothing) * nll + smoothing * smooth).sum(), nll.sum()


def _logits_grad_(log_probs: torch.Tensor, target: torch.Tensor, smoothing: float):
    """d loss / d logits for ``_smoothed_sums``' loss, written over ``log_probs`` (n, V) and
    returned: softmax - (1 - smoothing) * onehot(target) - smoothing / V, zero on PAD rows."""
    grad = log_probs.exp_()  # softmax
    if smoothing > 0.0:
        grad.sub_(smoothing / grad.size(-1))
    grad.scatter_add_(1, target.unsqueeze(1), grad.new_full((grad.size(0), 1), smoothing - 1.0))
    keep = target.ne(PAD)
    if not bool(keep.all()):
        grad.mul_(keep.unsqueeze(1))
    return grad


# Rows per chunk of the output-layer loss: about 4 Mi logits (16 MB in fp32) at a time, so a
# chunk stays in the CPU's last-level cache through its log-softmax, loss and gradient passes.
CHUNK_LOGITS = 1 << 22
# Below this vocabulary size the (N, V) logits are small and the plain path is as fast.
CHUNK_MIN_VOCAB = 1024


def output_layer_loss(core, hidden: torch.Tensor, target: torch.Tensor, smoothing: float,
                      chunked: bool = True):
    """``label_smoothed_nll(core.logits(hidden), target, smoothing)``, with the loss and its
    gradient written chunk by chunk into the logits' own buffer where the model's ``logits`` is
    its ``output`` layer, a plain ``nn.Linear`` (the Transformer and the recurrent models) in
    fp32 with no autocast and a vocabulary of at least ``CHUNK_MIN_VOCAB``
    (``_OutputLayerLoss``). Otherwise, or with ``chunked=False``, ``label_smoothed_nll`` takes
    the logits and keeps its log-probabilities in a second (N, V) buffer."""
    output = getattr(core, "output", None)
    if (chunked and type(output) is nn.Linear and output.weight.dtype == torch.float32
            and hidden.dtype == torch.float32 and output.out_features >= CHUNK_MIN_VOCAB
            and not torch.is_autocast_enabled(hidden.device.type)):
        rows = max(16, CHUNK_LOGITS // output.out_features)
        return _OutputLayerLoss.apply(hidden, output.weight, output.bias, target, smoothing,
                                      rows)
    return label_smoothed_nll(core.logits(hidden), target, smoothing)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in place (one kernel where PyTorch allows it)."""
    try:
        return torch._log_softmax(x, -1, False, out=x)
    except (AttributeError, RuntimeError, TypeError):
        return x.copy_(torch.log_softmax(x, dim=-1))


class _OutputLayerLoss(torch.autograd.Function):
    """The output layer (one product) and the label-smoothed loss, the loss passes made over
    chunks of ``rows`` rows of the logits, in place.

    Per chunk: log-softmax, the chunk's loss and NLL (``_smoothed_sums``) and, when a gradient
    is wanted, d loss / d logits (``_logits_grad_``), each pass while the chunk is in the
    cache. The backward is the output layer's two products on that gradient. Against
    ``label_smoothed_nll`` on whole logits: one (N, V) buffer instead of two (on the Bible
    preset about 5,300 x 7,809 floats, 165 MB), and a chunk's passes can stay in the cache
    (``benchmarks/output_loss.py``: 1.13x the whole path there, forward and backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, smoothing, rows):
        want_grad = any(ctx.needs_input_grad[:3])
        logits = F.linear(hidden, weight, bias)  # (N, V): log-probabilities, then d loss / d logits
        loss = hidden.new_zeros(())
        nll_sum = hidden.new_zeros(())
        for start in range(0, logits.size(0), rows):
            chunk, t = logits[start:start + rows], target[start:start + rows]  # (n, V), (n,)
            log_probs = _log_softmax_(chunk)
            chunk_loss, chunk_nll = _smoothed_sums(log_probs, t, smoothing)
            loss += chunk_loss
            nll_sum += chunk_nll
            if want_grad:
                _logits_grad_(log_probs, t, smoothing)  # the chunk is d loss / d logits from here
        if want_grad:
            ctx.save_for_backward(hidden, weight, logits)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(nll_sum)
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        hidden, weight, grad_logits = ctx.saved_tensors  # (N, d), (V, d), (N, V)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.mm(grad_logits, weight).mul_(grad_loss) if need_h else None
        grad_weight = torch.mm(grad_logits.t(), hidden).mul_(grad_loss) if need_w else None
        grad_bias = grad_logits.sum(dim=0).mul_(grad_loss) if ctx.has_bias and need_b else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def sequence_loss(model, batch, smoothing: float, sampling: float = 0.0, ctc_only: bool = False,
                  chunked: bool = True):
    """(loss_sum, nll_sum) over the target tokens of ``batch`` (EOS included).

    ``sampling`` > 0 turns on scheduled sampling with that probability; ``ctc_only`` (speech)
    trains the encoder on its CTC loss alone (``train.ctc_warmup_steps``); ``chunked`` lets the
    loss be written chunk by chunk into the logits' buffer (``output_layer_loss``), False keeps
    the log-probabilities in a second buffer (``train.chunked_loss``).
    """
    core = getattr(model, "module", model)  # DDP wraps the model
    if getattr(core, "non_autoregressive", False):
        return nat_loss(model, batch, smoothing)
    if hasattr(batch, "src_feats"):
        return ctc_attention_loss(model, batch, smoothing, ctc_only)
    tgt_in = batch.tgt_in
    if sampling > 0 and getattr(core, "samples_own_inputs", False):
        hidden = model(batch.src_tokens, tgt_in, sampling_prob=sampling)
    else:
        if sampling > 0:  # two passes: the first, teacher-forced, supplies predictions
            with torch.no_grad():
                predicted = core.logits(core(batch.src_tokens, tgt_in)).argmax(-1)
            tgt_in = mix_predictions(tgt_in, predicted, sampling)
        hidden = model(batch.src_tokens, tgt_in)  # (B, T, d)
    keep = batch.tgt_out.ne(PAD)
    # Project only real positions: with large vocabularies the output layer dominates.
    return output_layer_loss(core, hidden[keep], batch.tgt_out[keep], smoothing, chunked)


def _random_subset(real: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: ``counts[b]`` positions chosen uniformly among the True ones of ``real[b]``."""
    noise = torch.rand(real.shape, device=real.device).masked_fill(~real, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each position's noise in its row
    return real & (rank < counts[:, None])


def nat_loss(model, batch, smoothing: float):
    """Non-autoregressive objectives (``model.nat_objective``), with the length loss.

    * cmlm: mask n ~ U{1..L} random target positions; predict them from the rest.
    * glat: a first pass from all-[MASK] input (no gradient) counts the wrong tokens d; then
      ``glat_ratio * d`` random reference tokens are revealed and the rest predicted.
    * glat_cmlm: each sentence one way or the other, with equal chance. Glancing alone, late
      in training, reveals few tokens, so the model rarely sees the partly observed inputs that
      Mask-Predict's later passes give it; the CMLM half keeps those in the training mix.

    The token loss is the mean over predicted positions, scaled to the batch's target-token
    count so the trainer's normalization gives that mean. The length loss (cross-entropy of
    the length class, ``length_loss_weight`` per sentence) is added the same way.
    """
    core = getattr(model, "module", model)
    cfg = core.cfg
    tgt = batch.tgt_out.masked_fill(batch.tgt_out.eq(EOS), PAD)  # (B, T): no EOS in NAT output
    real = tgt.ne(PAD)
    lengths = real.sum(dim=1)
    if cfg.nat_objective == "cmlm":
        use_glat = torch.zeros_like(lengths, dtype=torch.bool)
    elif cfg.nat_objective == "glat":
        use_glat = torch.ones_like(lengths, dtype=torch.bool)
    else:  # glat_cmlm: each sentence is trained one way or the other, half and half
        use_glat = torch.rand(lengths.shape, device=tgt.device) < 0.5
    counts = (torch.rand(lengths.shape, device=tgt.device) * lengths).long() + 1  # 1..L
    predict = _random_subset(real, counts)  # CMLM: a random subset of the target positions
    rows = use_glat.nonzero().squeeze(1)
    if rows.numel():  # glancing: the first pass runs only on the sentences that use it
        g_src, g_tgt, g_real = batch.src_tokens[rows], tgt[rows], real[rows]
        with torch.no_grad():
            hidden, _ = core(g_src, g_tgt, torch.zeros_like(g_real))
            wrong = (core.logits(hidden).argmax(-1).ne(g_tgt) & g_real).sum(dim=1)
        predict[rows] = g_real & ~_random_subset(g_real, (wrong.float() * cfg.glat_ratio).long())
    hidden, length_logits = model(batch.src_tokens, tgt, real & ~predict)
    n_predict = predict.sum().clamp(min=1)
    loss, nll = label_smoothed_nll(core.logits(hidden[predict]), tgt[predict], smoothing)
    encoder_mask = batch.src_tokens.ne(PAD)
    n = cfg.length_offset
    classes = (lengths - encoder_mask.sum(dim=1)).clamp(-n, n) + n
    length_loss = F.cross_entropy(length_logits.float(), classes, reduction="mean")
    scale = batch.num_tgt_tokens / n_predict
    return loss * scale + cfg.length_loss_weight * length_loss * batch.num_tgt_tokens, nll * scale


def ctc_attention_loss(model, batch, smoothing: float, ctc_only: bool = False):
    """Speech: (1 - w) * attention cross-entropy + w * CTC loss, both summed over the batch
    (w = ``model.ctc_weight``; Watanabe et al., 2017). The trainer divides by the target
    tokens, so each term is per token. The NLL returned is the attention decoder's (the CTC
    loss with w = 1). CTC targets are the tokens without EOS; blank is the padding id; an
    utterance too short for its transcript contributes 0 (``zero_infinity``), not inf.

    Speech translation adds ``model.aux_ctc_weight`` times the auxiliary CTC loss over the
    source-language transcripts (``aux_ctc_loss``), summed the same way.

    ``ctc_only``: the CTC loss alone, with weight 1, and the decoder is not run (it gets no
    gradient); the NLL returned is then the CTC loss."""
    core = getattr(model, "module", model)
    w = 1.0 if ctc_only else core.cfg.ctc_weight
    hidden, encoder_out = model(batch.src_feats, batch.src_lengths,
                                None if ctc_only else batch.tgt_in)
    loss = nll = 0.0
    if w < 1.0:
        keep = batch.tgt_out.ne(PAD)
        att_loss, nll = label_smoothed_nll(core.logits(hidden[keep]), batch.tgt_out[keep],
                                           smoothing)
        loss = (1.0 - w) * att_loss
    if w > 0.0:
        targets = batch.tgt_out.masked_fill(batch.tgt_out.eq(EOS), PAD)  # (B, T)
        target_lengths = targets.ne(PAD).sum(dim=1)
        ctc = F.ctc_loss(encoder_out.ctc_log_probs.transpose(0, 1),  # (S, B, V)
                         targets, encoder_out.memory_mask.sum(dim=1), target_lengths,
                         blank=PAD, reduction="sum", zero_infinity=True)
        loss = loss + w * ctc
        if w == 1.0:
            nll = ctc.detach()
    if core.cfg.aux_ctc_weight > 0:
        loss = loss + core.cfg.aux_ctc_weight * aux_ctc_loss(core, encoder_out, batch)
    return loss, nll


def aux_ctc_loss(core, encoder_out, batch) -> torch.Tensor:
    """CTC loss (summed over the batch) of the auxiliary head against the transcripts'
    ids ``batch.src_text`` (B, U), PAD-padded; blank is the padding id, as for the main head."""
    if batch.src_text is None:
        from encdec.data.corpus import DataError

        raise DataError("model.aux_ctc_weight > 0 but this batch has no transcripts: every "
                        "split needs a transcript field (prepare the data again)")
    log_probs = core.aux_ctc_log_probs(encoder_out)  # (B, S, V_transcript)
    return F.ctc_loss(log_probs.transpose(0, 1), batch.src_text,  # (S, B, V)
                      encoder_out.memory_mask.sum(dim=1), batch.src_text.ne(PAD).sum(dim=1),
                      blank=PAD, reduction="sum", zero_infinity=True)


def tts_loss(model, batch, step: int = 0, teacher=None, sampling: float = 0.0,
             passes: int = 1):
    """Text-to-speech: (loss_sum, mel_sum), each a per-frame mean times the batch's frames (the
    trainer divides by the frames). The loss is the model's total (mel L1 before and after the
    post-net, durations, alignment or stop and guided attention); the second value is the L1
    after the post-net. FastSpeech learns its durations jointly unless a ``teacher``
    (``TeacherDurations``: a TransformerTTS's attention) gives them. ``sampling``: the
    autoregressive model's scheduled-sampling probability, ``passes`` its predicting passes
    (``TransformerTTS.loss``)."""
    from encdec.models.tts import FastSpeech

    core = getattr(model, "module", model)
    frames = batch.num_tgt_tokens
    if isinstance(core, FastSpeech):
        kwargs = {"binarize": step >= core.cfg.tts_binarize_from,
                  "align_weight": core.cfg.tts_align_weight}
        if teacher is not None:
            kwargs["durations"] = teacher(batch)
        total, parts = model(batch.tokens, batch.mels, batch.mel_lengths, **kwargs)
    else:
        total, parts = model(batch.tokens, batch.mels, batch.mel_lengths,
                             guided_weight=core.cfg.tts_guided_weight,
                             guided_sigma=core.cfg.tts_guided_sigma, sampling=sampling,
                             passes=passes)
    return total * frames, torch.tensor(parts["postnet"] * frames)
