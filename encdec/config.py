"""Typed configuration: one dataclass per concern, YAML in/out, dotted overrides, validation.

Every field has its default and its meaning here, in one place. A run directory keeps the
resolved config as ``config.yaml`` so a model can always be rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


@dataclass
class DataConfig:
    dir: str = "data/g2p-cmudict"  # prepared data directory (output of `encdec prepare`)


@dataclass
class ModelConfig:
    # encdec.models.MODELS: transformer | nat | lstm | gru | speech | fastspeech |
    # transformer_tts | tacotron2
    arch: str = "transformer"
    d_model: int = 256
    n_heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 3
    ffn_dim: int = 1024
    dropout: float = 0.1  # on embeddings and on each sublayer output before the residual add
    attention_dropout: float = 0.0  # on attention probabilities
    activation_dropout: float = 0.0  # inside the feed-forward block, after the activation
    activation: str = "relu"  # relu | gelu
    norm: str = "pre"  # pre (LayerNorm before each sublayer) | post (the original paper)
    norm_type: str = "layernorm"  # layernorm | rmsnorm | batchnorm (statistics over real positions)
    positions: str = "sinusoidal"  # sinusoidal | learned
    max_positions: int = 1024  # learned positions only: longest sequence
    tie_output: bool = True  # decoder input embedding shared with the output projection
    share_embeddings: bool = False  # source and target embeddings shared (joint vocabulary only)
    # Recurrent (arch: lstm | gru) only; d_model is the hidden size, n_heads/ffn_dim unused:
    rnn_attention: str = "luong"  # luong (multiplicative) | bahdanau (additive)
    rnn_bidirectional: bool = True  # bidirectional encoder (d_model / 2 per direction)
    # Non-autoregressive (arch: nat) only:
    nat_objective: str = "cmlm"  # cmlm (random masking) | glat (glancing) | glat_cmlm (half each)
    glat_ratio: float = 0.5  # glat: reveal this fraction of the first pass's wrong tokens
    length_offset: int = 64  # length predictor classes: target - source length in [-n, n]
    length_loss_weight: float = 0.1  # weight of the length loss (per sentence)
    # Speech input (arch: speech): log-mel frames -> conv subsampling -> encoder blocks.
    subsampling: int = 4  # frame-rate reduction of the conv front: 4 (40 ms per position) | 6 | 8
    front_channels: int = 64  # channels of the conv front (its cost grows with their square)
    encoder_block: str = "transformer"  # transformer (sinusoidal positions) | conformer (rotary)
    conv_kernel: int = 15  # conformer: depthwise convolution width, in positions
    # Weight of the CTC loss on the encoder (the rest is the attention decoder's): 0 = no CTC
    # head, 1 = CTC only (no decoder is built; decode with method ctc or ctc_weight 1).
    ctc_weight: float = 0.3
    # Speech translation: weight of an auxiliary CTC loss on the encoder over the source-language
    # transcripts (the data's "transcript" field, tokenized with its own vocabulary), added to the
    # loss above; 0 = no auxiliary head. Its head is used in training only.
    aux_ctc_weight: float = 0.0
    # Text-to-speech (arch: fastspeech | transformer_tts | tacotron2): tokens -> 80-bin log-mel
    # frames. The autoregressive ones (transformer_tts, tacotron2):
    tts_reduction: int = 2  # frames per decoder step (Tacotron's r)
    tts_guided_weight: float = 1.0  # guided-attention (diagonal prior) loss weight
    tts_guided_sigma: float = 0.2  # the prior's width, a fraction of the lengths
    # Width of the pre-net's two layers (the previous frames' way in); 0 = d_model for
    # transformer_tts, 256 for tacotron2. transformer_tts projects a narrower one up to d_model:
    # a bottleneck (as in Transformer-TTS), so the decoder must lean on the text more and on the
    # previous frames less
    tts_prenet_dim: int = 0
    tts_decoder_dim: int = 512  # tacotron2: width of its attention and decoder LSTMs
    # Layers of the post-net every TTS model ends in (5-wide convolutions of 256 channels over
    # the frames, then a projection back to the mel bins, added to its input); 0 = none (as in
    # FastSpeech and FastSpeech 2: the decoder's frames are the output)
    tts_postnet_layers: int = 5
    # transformer_tts: what the last decoder layer's cross-attention (the guided one, which
    # durations are read from) projects its keys from: encoder (its output, like the values)
    # | embedding (its input: token embeddings with positions, without the neighbours' context)
    tts_attention_keys: str = "encoder"
    # fastspeech: durations learned jointly (forward-sum over monotonic paths + MAS); the
    # binarization loss joins after this many steps, once the soft alignment has converged a bit
    tts_binarize_from: int = 1000
    tts_align_weight: float = 1.0  # fastspeech: weight of the forward-sum and binarization losses
    # fastspeech: scaling of the beta-binomial diagonal prior on the learned alignment (0 = none;
    # without it the alignment can collapse onto the first token and never recover)
    tts_align_prior: float = 1.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/g2p"
    seed: int = 1
    max_tokens: int = 4096  # batch size in target tokens (per process, per accumulation step)
    max_frames: int = 20000  # speech: batch size in 10 ms feature frames (200 s of audio)
    # speech with a CTC head and a decoder: the first updates train the encoder on the CTC loss
    # alone (the decoder is not run), then the joint loss with model.ctc_weight. The decoder's
    # loss from the start held asr-small's CTC back: dev CTC best-path WER 88.7 % (ctc_weight
    # 0.3) and 81.5 % (0.5) against 70.3 % for CTC alone after 6 minutes (README "Speech
    # recognition").
    ctc_warmup_steps: int = 0
    accum_steps: int = 1  # gradient accumulation
    lr: float = 1.5e-3  # peak learning rate
    # inverse_sqrt | cosine | linear | constant. cosine and linear decay to min_lr at the end of
    # the budget, max_steps or max_minutes (whichever ends first): a run that knows its time
    # limit ends annealed
    schedule: str = "inverse_sqrt"
    warmup_steps: int = 200  # short: a 4000-step warmup leaves a CPU run barely trained for an hour
    min_lr: float = 1e-5  # cosine/linear floor
    # cosine/linear: decay over the budget's last fraction only, at the peak rate before it
    # (warmup-stable-decay); 1 = decay from the end of the warmup
    decay_fraction: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0 disables clipping
    # Exponential moving average of the weights (Polyak averaging), updated after every step:
    # validation, the checkpoints' model.safetensors and so every decoder use the average; the
    # optimizer steps the raw weights, kept in trainer.safetensors for --resume. The decay ramps
    # up as min(ema_decay, (1 + n) / (10 + n)) after n updates, so the initial weights fade out
    # fast; until the ramp reaches ema_decay (about 9,000 updates for 0.999) it averages mostly
    # the last fifth of the updates so far, then about the last 1 / (1 - ema_decay). 0 = off.
    ema_decay: float = 0.0
    label_smoothing: float = 0.1
    max_steps: int = 0  # 0 = no step limit
    max_epochs: int = 0  # 0 = no epoch limit
    max_minutes: float = 0.0  # wall-clock budget; 0 = none
    valid_every: int = 500  # steps between validations (and checkpoints)
    valid_max_inputs: int = 0  # validate the metric on the first N dev inputs; 0 = all
    patience: int = 0  # stop after this many validations without improvement; 0 = never
    keep_checkpoints: int = 3  # step checkpoints kept besides the best one
    log_every: int = 50  # steps between metric lines in metrics.jsonl
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    num_threads: int = 0  # CPU threads for torch; 0 = all cores
    # CPU: the C allocator `encdec train` runs with (encdec/host.py). auto: tcmalloc for audio
    # data (speech, TTS) when it is installed (Debian libtcmalloc-minimal4): the command
    # re-executes itself with it preloaded (asr-small: half the peak memory of glibc's malloc
    # with trims, 0.78x the time per update); tcmalloc: for any data, an error when it is
    # missing; system: the C library's own
    allocator: str = "auto"
    # CPU on glibc, text data: reuse freed buffers (encdec/host.py); never for audio batches,
    # whose shapes vary too much (the heap grows)
    retain_freed_memory: bool = True
    # CPU on glibc, audio data: hand the heap's free pages back every N steps and after each
    # validation (malloc_trim, encdec/host.py); 0 = never
    trim_every: int = 20
    # CPU, fp32: linear layers through oneDNN on packed weights (encdec/nn/packed.py), as
    # decoding always does. Off by default: 4-6 % more tokens/s on the presets before the
    # explicit short-sequence attention, within noise since, for 0.5-1.3 GB more resident
    # memory (oneDNN keeps a kernel per batch shape)
    packed_linear: bool = False
    # fp32, no autocast, vocabularies of 1,024 or more: the loss and its gradient written chunk
    # by chunk into the logits' own buffer (encdec/losses.py, output_layer_loss): one (tokens x
    # vocabulary) buffer instead of two. Same values; false keeps the log-probabilities apart
    chunked_loss: bool = True
    # torch.compile each encoder and decoder layer of the training model (TorchInductor, shapes
    # dynamic so that batches of every length share the compiled code): the elementwise work
    # around the matrix products (norms, residuals, dropout, ReLU, softmax) fused into fewer
    # passes. The first steps pay the compilation (a minute or more on a CPU); validation and
    # decoding run eager on the weight average. Needs a C++ compiler on the CPU
    compile: bool = False
    max_len: int = 256  # longer training pairs are skipped when batching
    # Scheduled sampling (Bengio et al., 2015): with probability p(step) a decoder input is the
    # model's own prediction. p = min(ss_max_prob, 1 - eps(step)), eps the teacher-forcing
    # probability: linear max(0, 1 - step / ss_steps), exponential ss_k ** step, or inverse
    # sigmoid ss_k / (ss_k + exp(step / ss_k)). Recurrent models sample step by step; the
    # Transformer uses two passes (the second fed with the first's argmax predictions);
    # transformer_tts the same with its predicted frames as the next steps' inputs.
    scheduled_sampling: str = "off"  # off | linear | exponential | inverse_sigmoid
    ss_max_prob: float = 0.25
    ss_steps: int = 2000  # linear: steps until eps reaches 0
    ss_k: float = 500.0  # exponential (use e.g. 0.999) and inverse sigmoid
    # The schedule's step 0 (teacher forcing before it): scheduled sampling from a trained
    # model, resumed with train.ss_start_step at its last step, anneals from zero as from scratch
    ss_start_step: int = 0
    # transformer_tts: predicting passes before the trained one. With 1, the sampled inputs are
    # teacher-forced predictions (one step of error); with k, pass i reads pass i-1's mixture,
    # so a sampled input may carry up to k steps of the model's own errors, as in synthesis.
    # Measured on bible-tts: 3 passes did no better than 1 (README, "Speech synthesis").
    ss_passes: int = 1
    # Start from another run's weights (speech): before the first step (not on --resume), the
    # parameters of init_parts are copied from the best checkpoint of the run directory
    # init_from; shapes must match. Parts: front (conv subsampler), encoder (blocks and final
    # norm), ctc (the CTC head), decoder (target embedding, blocks, final norm, output layer).
    init_from: str = ""
    init_parts: tuple[str, ...] = ("encoder",)
    # and the decoder from another run (speech translation: a translation run on text into the
    # same language, prepared with the same target vocabulary; see prepare --targets-from)
    init_decoder_from: str = ""
    # fastspeech: durations read off a trained transformer_tts run's attention (the teacher
    # way, FastSpeech's) instead of learned jointly; the run must be on the same data
    durations_from: str = ""


@dataclass
class AugmentConfig:
    """Speech training augmentation (arch speech; never applied to dev, test or decoding)."""
    speed_perturb: tuple[float, ...] = (0.9, 1.0, 1.1)  # speeds drawn uniformly per utterance
    noise_prob: float = 0.5  # chance an utterance gets additive noise
    snr_db: tuple[float, float] = (5.0, 30.0)  # signal-to-noise ratio, uniform in this range
    # Vocal tract length perturbation (Jaitly & Hinton, 2013): the mel filters' frequencies
    # warped by a factor drawn uniformly per utterance from this range (Kaldi's VTLN warp,
    # piecewise linear; e.g. [0.9, 1.1]); speed perturbation moves formants and pitch
    # together, this moves the formants alone. [1.0, 1.0] = off.
    vtlp: tuple[float, float] = (1.0, 1.0)
    freq_masks: int = 2  # SpecAugment (Park et al., 2019): bands of up to freq_width bins
    freq_width: int = 27
    time_masks: int = 2  # spans of up to time_width frames, at most time_ratio of the utterance
    time_width: int = 40
    time_ratio: float = 0.05
    # Updates before augmentation begins (0: from the first). A CTC model first has to get past
    # the blank-and-prior plateau (every frame blank, the loss near the targets' unigram
    # entropy); on bible-speech, augmentation from the start kept asr-small there for over 300
    # updates, while clean audio let the loss fall from update 180 (README "Speech recognition").
    start_step: int = 0


@dataclass
class DecodeConfig:
    method: str = "beam"  # greedy | beam | sample | nat | ctc (CTC best path: the speech NAT)
    beam_size: int = 5
    nbest: int = 1
    length_penalty: float = 1.0  # score / length**length_penalty
    max_len_a: float = 1.5  # output at most a * len(src) + b tokens
    max_len_b: int = 10
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = off
    top_p: float = 1.0  # sampling only; 1.0 = off
    batch_size: int = 64  # inputs per decoding batch
    # method nat (non-autoregressive models): Mask-Predict
    iterations: int = 4  # refinement passes; 1 = single pass
    length_beam: int = 1  # most likely lengths decoded in parallel; best by mean log-probability
    length_scale: float = 1.0  # multiplies the predicted length (speed control for speech)
    early_exit: bool = True  # stop refining an output once a pass leaves it unchanged
    # speech models with a CTC head: weight of the CTC prefix score in beam search (joint
    # CTC/attention decoding, Watanabe et al. 2017); 0 = attention only, 1 = CTC prefix beam
    ctc_weight: float = 0.0


@dataclass
class ServeConfig:
    """`encdec serve`: request limits and dynamic batching."""
    max_inputs: int = 64  # inputs per request (more: 413)
    max_input_chars: int = 1000  # characters per input (more: 413)
    max_body_bytes: int = 1_000_000  # request body (more: 413)
    max_queue: int = 2048  # inputs waiting to be decoded (more: 503)
    max_beam: int = 16  # largest beam a request may ask for (more: 422)
    max_batch_size: int = 64  # inputs decoded together; 1 turns dynamic batching off
    max_wait_ms: float = 5.0  # how long a batch waits to fill once its first input arrived
    request_timeout_s: float = 60.0  # a request still queued after this gets 503
    rate_limit: float = 0.0  # requests per second per client (API key, else address); 0 = off
    rate_burst: int = 20  # requests a client may send at once before rate_limit applies (429)
    rate_hold_s: float = 1.0  # a 429 is held up to this long (slows retry loops); 0 = at once
    docs: bool = False  # /docs and /redoc; off because their pages load scripts from a CDN
    # speech runs (POST /v1/transcribe): an upload's body and its audio (more: 413)
    max_audio_bytes: int = 20_000_000  # 60 s of 16 kHz 16-bit WAV is 1.9 MB; 48 kHz stereo 11.5 MB
    max_audio_seconds: float = 60.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        validate(self)

    # ---- YAML / dict -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        text = yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections "
                              "data/model/train/decode/serve/augment")
        return _build(cls, raw, prefix="", source=source)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Config":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        raw = raw or {}
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw, source=str(path))


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def apply_override(raw: dict, item: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a raw config dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.lr=3e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {item!r}: key must be section.name, e.g. train.lr")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    raw.setdefault(parts[0], {})
    if not isinstance(raw[parts[0]], dict):
        raise ConfigError(f"override {item!r}: section {parts[0]!r} is not a mapping")
    raw[parts[0]][parts[1]] = parsed


def _build(cls, raw: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}{key}"
            raise ConfigError(f"{source}: unknown key {where!r}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        value = raw[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key!r} must be a mapping")
            kwargs[f.name] = _build(hint, value, prefix=f"{key}.", source=source)
        else:
            kwargs[f.name] = _coerce(value, hint, key, source)
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length, at least one
            if not value:
                raise ConfigError(f"{source}: {key!r} must have at least one item")
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key!r} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key!r} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: {key!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
        return value
    return value


_CHOICES = {
    ("model", "activation"): ("relu", "gelu"),
    ("model", "norm"): ("pre", "post"),
    ("model", "norm_type"): ("layernorm", "rmsnorm", "batchnorm"),
    ("model", "positions"): ("sinusoidal", "learned"),
    ("train", "schedule"): ("inverse_sqrt", "cosine", "linear", "constant"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("decode", "method"): ("greedy", "beam", "sample", "nat", "ctc"),
    ("model", "encoder_block"): ("transformer", "conformer"),
    ("model", "nat_objective"): ("cmlm", "glat", "glat_cmlm"),
    ("model", "rnn_attention"): ("luong", "bahdanau"),
    ("train", "scheduled_sampling"): ("off", "linear", "exponential", "inverse_sigmoid"),
}


def validate(cfg: Config) -> None:
    for (section, name), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{section}.{name}={value!r}: choose one of {', '.join(allowed)}")
    m, t, d, sv = cfg.model, cfg.train, cfg.decode, cfg.serve
    positive = {
        "serve.max_inputs": sv.max_inputs, "serve.max_input_chars": sv.max_input_chars,
        "serve.max_body_bytes": sv.max_body_bytes, "serve.max_queue": sv.max_queue,
        "serve.max_beam": sv.max_beam, "serve.max_batch_size": sv.max_batch_size,
        "serve.request_timeout_s": sv.request_timeout_s,
        "model.d_model": m.d_model, "model.n_heads": m.n_heads, "model.ffn_dim": m.ffn_dim,
        "model.max_positions": m.max_positions, "train.max_tokens": t.max_tokens,
        "train.accum_steps": t.accum_steps, "train.valid_every": t.valid_every,
        "train.log_every": t.log_every, "train.max_len": t.max_len,
        "decode.beam_size": d.beam_size, "decode.nbest": d.nbest, "decode.batch_size": d.batch_size,
        "decode.iterations": d.iterations, "decode.length_beam": d.length_beam,
        "decode.length_scale": d.length_scale, "model.length_offset": m.length_offset,
        "train.max_frames": t.max_frames, "model.conv_kernel": m.conv_kernel,
        "model.front_channels": m.front_channels, "serve.max_audio_bytes": sv.max_audio_bytes,
        "serve.max_audio_seconds": sv.max_audio_seconds,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value}: must be positive")
    if m.arch in ("transformer", "nat") and m.d_model % m.n_heads:  # recurrent models have no heads
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    _validate_speech(cfg)
    if m.enc_layers < 1 or m.dec_layers < 1:
        raise ConfigError("model.enc_layers and model.dec_layers must be at least 1")
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key}={getattr(m, key)}: must be in [0, 1)")
    if t.allocator not in ("auto", "tcmalloc", "system"):
        raise ConfigError(f"train.allocator={t.allocator!r}: must be auto, tcmalloc or system")
    if t.trim_every < 0:
        raise ConfigError(f"train.trim_every={t.trim_every}: must be 0 (never) or positive")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing={t.label_smoothing}: must be in [0, 1)")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr}: must be positive")
    if t.warmup_steps < 0 or t.max_steps < 0 or t.max_epochs < 0 or t.max_minutes < 0:
        raise ConfigError("train.warmup_steps, max_steps, max_epochs, max_minutes must be >= 0")
    if t.schedule in ("cosine", "linear") and t.max_steps == 0 and t.max_minutes == 0:
        raise ConfigError(f"train.schedule={t.schedule} decays over the budget: it needs "
                          "train.max_steps or train.max_minutes")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay}: must be in [0, 1) (0 = off)")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction}: must be in (0, 1]")
    if (m.arch == "nat") != (d.method == "nat"):
        raise ConfigError(f"decode.method={d.method!r} with model.arch={m.arch!r}: a "
                          "non-autoregressive model (arch nat) decodes with method nat "
                          "(Mask-Predict), and only it does")
    if d.method == "nat" and d.nbest > d.length_beam:
        raise ConfigError(f"decode.nbest={d.nbest} cannot exceed decode.length_beam="
                          f"{d.length_beam} (one output per candidate length)")
    if d.nbest > 1 and d.method == "greedy":
        raise ConfigError(f"decode.nbest={d.nbest} needs beam search with a beam of at least "
                          "nbest, or sampling: greedy decoding gives one output per input")
    if t.scheduled_sampling != "off" and m.arch == "fastspeech":
        raise ConfigError("train.scheduled_sampling: a fastspeech model does not read its own "
                          "frames (it makes them all at once); use it with transformer_tts or "
                          "tacotron2")
    if t.ss_passes < 1:
        raise ConfigError(f"train.ss_passes={t.ss_passes}: must be >= 1")
    if t.ss_passes > 1 and m.arch != "transformer_tts":
        raise ConfigError(f"train.ss_passes={t.ss_passes}: several predicting passes are "
                          f"built for transformer_tts only (model.arch={m.arch!r} samples "
                          "from one; tacotron2 samples step by step, as it synthesizes)")
    if not 0.0 <= t.ss_max_prob <= 1.0:
        raise ConfigError(f"train.ss_max_prob={t.ss_max_prob}: must be in [0, 1]")
    if t.scheduled_sampling == "exponential" and not 0.0 < t.ss_k < 1.0:
        raise ConfigError(f"train.ss_k={t.ss_k}: exponential decay needs 0 < ss_k < 1")
    if t.ss_start_step < 0:
        raise ConfigError(f"train.ss_start_step={t.ss_start_step}: must be >= 0")
    if t.scheduled_sampling in ("linear", "inverse_sigmoid") and (t.ss_steps <= 0 or t.ss_k <= 0):
        raise ConfigError("train.ss_steps and train.ss_k must be positive")
    if not 0.0 <= m.glat_ratio <= 1.0:
        raise ConfigError(f"model.glat_ratio={m.glat_ratio}: must be in [0, 1]")
    if d.nbest > d.beam_size and d.method == "beam":
        raise ConfigError(f"decode.nbest={d.nbest} cannot exceed decode.beam_size={d.beam_size}")
    if sv.max_wait_ms < 0:
        raise ConfigError(f"serve.max_wait_ms={sv.max_wait_ms}: must be >= 0")
    if sv.rate_limit < 0:
        raise ConfigError(f"serve.rate_limit={sv.rate_limit}: must be >= 0 (0 turns it off)")
    if sv.rate_burst < 1:
        raise ConfigError(f"serve.rate_burst={sv.rate_burst}: must be at least 1 (one request)")
    if sv.rate_hold_s < 0:
        raise ConfigError(f"serve.rate_hold_s={sv.rate_hold_s}: must be >= 0 "
                          "(0 sends a 429 at once)")
    if d.temperature <= 0:
        raise ConfigError(f"decode.temperature={d.temperature}: must be positive")
    if not 0.0 < d.top_p <= 1.0:
        raise ConfigError(f"decode.top_p={d.top_p}: must be in (0, 1]")


INIT_PARTS = ("front", "encoder", "ctc", "decoder")  # train.init_parts: see SpeechTransformer.PARTS


def _validate_speech(cfg: Config) -> None:
    m, d, a = cfg.model, cfg.decode, cfg.augment
    if m.subsampling not in (4, 6, 8):
        raise ConfigError(f"model.subsampling={m.subsampling}: choose one of 4, 6, 8")
    for key, value in (("model.ctc_weight", m.ctc_weight), ("decode.ctc_weight", d.ctc_weight),
                       ("augment.noise_prob", a.noise_prob)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}={value}: must be in [0, 1]")
    speech = m.arch == "speech"
    for key, value in (("model.tts_align_prior", m.tts_align_prior),
                       ("model.tts_align_weight", m.tts_align_weight),
                       ("model.tts_guided_weight", m.tts_guided_weight)):
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0 (0 = off)")
    if m.tts_attention_keys not in ("encoder", "embedding"):
        raise ConfigError(f"model.tts_attention_keys={m.tts_attention_keys!r}: choose encoder or "
                          "embedding")
    if m.tts_prenet_dim < 0:
        raise ConfigError(f"model.tts_prenet_dim={m.tts_prenet_dim}: must be >= 0 (0 = the "
                          "model's default width)")
    if m.tts_postnet_layers < 0 or m.tts_postnet_layers == 1:
        raise ConfigError(f"model.tts_postnet_layers={m.tts_postnet_layers}: 0 (no post-net) or "
                          ">= 2 (convolutions, then the projection back to the mel bins)")
    if m.tts_decoder_dim < 1:
        raise ConfigError(f"model.tts_decoder_dim={m.tts_decoder_dim}: must be >= 1")
    if m.tts_guided_sigma <= 0:
        raise ConfigError(f"model.tts_guided_sigma={m.tts_guided_sigma}: must be > 0 (a fraction "
                          "of the text and frame lengths)")
    if m.aux_ctc_weight < 0:
        raise ConfigError(f"model.aux_ctc_weight={m.aux_ctc_weight}: must be >= 0 (0 = no "
                          "auxiliary CTC head)")
    if m.aux_ctc_weight > 0 and not speech:
        raise ConfigError(f"model.aux_ctc_weight={m.aux_ctc_weight} needs model.arch=speech "
                          "(an auxiliary CTC head on the speech encoder)")
    t = cfg.train
    unknown = [p for p in t.init_parts if p not in INIT_PARTS]
    if unknown:
        raise ConfigError(f"train.init_parts={list(t.init_parts)}: unknown part(s) "
                          f"{', '.join(map(repr, unknown))}; choose from {', '.join(INIT_PARTS)}")
    if t.ctc_warmup_steps < 0:
        raise ConfigError(f"train.ctc_warmup_steps={t.ctc_warmup_steps}: must be >= 0")
    if t.ctc_warmup_steps > 0 and not (speech and 0 < m.ctc_weight < 1):
        raise ConfigError(f"train.ctc_warmup_steps={t.ctc_warmup_steps} needs a speech model with "
                          "a CTC head and a decoder (model.arch=speech, 0 < model.ctc_weight < 1)")
    if t.init_decoder_from and not (speech and m.ctc_weight < 1):
        raise ConfigError(f"train.init_decoder_from={t.init_decoder_from!r} needs a speech model "
                          "with an attention decoder (model.arch=speech, model.ctc_weight < 1)")
    if t.init_decoder_from and t.init_from and "decoder" in t.init_parts:
        raise ConfigError(f"train.init_decoder_from={t.init_decoder_from!r} and "
                          f"train.init_parts={list(t.init_parts)} both give the decoder; take "
                          "decoder out of train.init_parts")
    if t.init_from and not speech:
        raise ConfigError(f"train.init_from={t.init_from!r} needs model.arch=speech (the parts "
                          f"{', '.join(INIT_PARTS)} are a speech model's)")
    if d.method == "ctc" and not (speech and m.ctc_weight > 0):
        raise ConfigError("decode.method=ctc needs a speech model with a CTC head "
                          "(model.arch=speech, model.ctc_weight > 0)")
    if d.ctc_weight > 0 and not (speech and m.ctc_weight > 0):
        raise ConfigError(f"decode.ctc_weight={d.ctc_weight} needs a speech model trained with a "
                          "CTC head (model.arch=speech, model.ctc_weight > 0)")
    if speech and m.ctc_weight == 1.0 and d.method in ("greedy", "sample", "beam") and \
            d.ctc_weight < 1.0:
        raise ConfigError(f"model.ctc_weight=1 trains no attention decoder: decode with "
                          f"decode.method=ctc decode.ctc_weight=0, or beam search with "
                          f"decode.ctc_weight=1 "
                          f"(not method {d.method!r} with ctc_weight {d.ctc_weight})")
    if d.ctc_weight > 0 and d.method != "beam":
        raise ConfigError(f"decode.ctc_weight={d.ctc_weight} applies to beam search: set "
                          f"decode.method=beam (not {d.method!r}), or decode.ctc_weight=0 for "
                          f"method {d.method!r}")
    if a.start_step < 0:
        raise ConfigError(f"augment.start_step={a.start_step}: must be >= 0")
    if any(s <= 0 for s in a.speed_perturb):
        raise ConfigError(f"augment.speed_perturb={list(a.speed_perturb)}: speeds must be positive")
    if not 0 <= a.snr_db[0] <= a.snr_db[1]:
        raise ConfigError(f"augment.snr_db={list(a.snr_db)}: need 0 <= low <= high")
    if len(a.vtlp) != 2 or not 0.5 <= a.vtlp[0] <= a.vtlp[1] <= 2.0:
        raise ConfigError(f"augment.vtlp={list(a.vtlp)}: give [low, high] warp factors with "
                          "0.5 <= low <= high <= 2 (e.g. [0.9, 1.1]; [1.0, 1.0] is off)")
    if min(a.freq_masks, a.freq_width, a.time_masks, a.time_width) < 0 or \
            not 0.0 <= a.time_ratio <= 1.0:
        raise ConfigError("augment.freq_masks/freq_width/time_masks/time_width must be >= 0 and "
                          "augment.time_ratio in [0, 1]")
