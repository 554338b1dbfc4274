"""`encdec train`: the training loop shared by every model family.

Token-based bucketed batches -> model -> label-smoothed loss -> AdamW step, periodic
validation (dev loss + task metric with greedy decoding), atomic checkpoints, exact resume,
DDP under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from encdec import checkpoint, dist
from encdec.config import Config, ConfigError, DecodeConfig
from encdec.data.assets import copy_assets, load_assets
from encdec.data.corpus import DataError
from encdec.data.dataset import BinarizedSplit, collate, read_eval, shard, token_batches
from encdec.decoding.texts import decode_texts
from encdec.files import atomic_write_text
from encdec.host import allocator, resident_mb, retain_freed_memory, trim_heap
from encdec.losses import sequence_loss, tts_loss
from encdec.metrics import METRICS, score
from encdec.models import AUTOREGRESSIVE_TTS, model_for_data
from encdec.nn.packed import forget_packed_weights, pack_linear_weights
from encdec.scheduled_sampling import sampling_prob


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use cpu")
    return torch.device(name)


def lr_at(step: int, cfg, elapsed_s: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based), ``elapsed_s`` seconds into training:
    linear warmup, then the schedule.

    ``cosine`` and ``linear`` decay from ``lr`` to ``min_lr`` over the budget: the steps after
    the warmup (``max_steps``) or the wall-clock minutes (``max_minutes``), whichever ends
    first, so a run stopped by its time limit ends annealed. With ``decay_fraction`` f < 1 the
    rate stays at its peak and decays over the budget's last fraction f only (warmup, stable,
    decay)."""
    s = step + 1
    warm = max(cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        return cfg.lr * min(1.0, s / warm)
    if s <= cfg.warmup_steps:
        return cfg.lr * s / warm
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(warm / s)
    progress = budget_progress(s, cfg, elapsed_s)
    f = cfg.decay_fraction
    progress = max(0.0, progress - (1.0 - f)) / f
    shape = (1.0 - progress) if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def budget_progress(s: int, cfg, elapsed_s: float) -> float:
    """How much of the training budget is spent, in [0, 1], ``s`` steps and ``elapsed_s``
    seconds in: the larger of the step fraction after the warmup and the time fraction."""
    done = 0.0
    if cfg.max_steps:
        done = (s - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_minutes:
        done = max(done, elapsed_s / (cfg.max_minutes * 60.0))
    return min(1.0, max(0.0, done))


def ema_update(decay: float):
    """The update of a weight average for torch.optim.swa_utils.AveragedModel: an exponential
    moving average whose decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates."""

    def update(averaged: list, current: list, num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current):
            avg.lerp_(cur, weight)

    return update


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm gains (1-D parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    try:  # the fused kernel is fastest on CPU and GPU alike
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def _check_same_targets(run_dir: Path, data_dir: Path, key: str) -> None:
    """ConfigError unless the run ``run_dir`` was trained on the target vocabulary of
    ``data_dir``: a decoder's embedding rows and output classes are its tokens."""
    from encdec.data.vocab import Vocab

    theirs, ours = run_dir / "data" / "tgt.vocab", data_dir / "tgt.vocab"
    if not theirs.exists() or not ours.exists():
        missing = theirs if not theirs.exists() else ours
        raise ConfigError(f"{key}={str(run_dir)!r}: no target vocabulary to compare ({missing} "
                          "is missing)")
    a, b = Vocab.load(theirs).itos, Vocab.load(ours).itos
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        there = repr(a[first]) if first < len(a) else "nothing"
        here = repr(b[first]) if first < len(b) else "nothing"
        raise ConfigError(
            f"{key}={str(run_dir)!r}: its decoder has another target vocabulary ({len(a)} "
            f"tokens there, {len(b)} in {data_dir}; token {first} is {there} there, {here} "
            "here); prepare this data with that run's target tokenizer and vocabulary "
            "(encdec prepare bible-speech-es --targets-from ITS_DATA_DIR)")


def copy_parts(model: torch.nn.Module, run_dir: str | Path, parts: tuple[str, ...],
               key: str = "train.init_from", data_dir: str | Path | None = None) -> int:
    """Copy the parameters of ``parts`` (``model.PARTS`` names) from the best checkpoint of the
    run ``run_dir`` into ``model``; returns how many tensors were copied. Exactly the model's
    parameters under those parts' prefixes are copied, and the source must have each of them
    with the same shape, and no others there (ConfigError names the parameter, ``key`` the
    setting). The source may be a text run for the decoder. With ``data_dir`` (the data
    ``model`` trains on), a decoder is copied only if both have the same target vocabulary."""
    from encdec.data.prepare import load_meta

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{key}={str(run_dir)!r}: not a run directory (no config.yaml)")
    if "decoder" in parts and data_dir is not None:
        _check_same_targets(run_dir, Path(data_dir), key)
    source_cfg = Config.load(run_dir / "config.yaml")
    source = model_for_data(source_cfg.model, load_meta(run_dir / "data"))
    checkpoint.load_weights(source, checkpoint.resolve(run_dir, "best"))
    # state_dict, not named_parameters: a tied output layer is there under both its names
    src = source.state_dict()
    prefixes = tuple(p for part in parts for p in model.PARTS[part])
    wanted = {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}
    src_names = {n for n, _ in source.named_parameters() if n.startswith(prefixes)}
    if not wanted:
        raise ConfigError(f"train.init_parts={list(parts)}: this model has no such parameters")
    extra = sorted(src_names - set(wanted))
    for name, param in wanted.items():
        if name not in src:
            raise ConfigError(f"{key}={str(run_dir)!r}: its model has no parameter {name} "
                              f"(shape {tuple(param.shape)} here); compare model.* of both "
                              "configs, or leave that part out of train.init_parts")
        if src[name].shape != param.shape:
            raise ConfigError(f"{key}={str(run_dir)!r}: parameter {name} has shape "
                              f"{tuple(src[name].shape)} there but {tuple(param.shape)} here; "
                              "the models' model.* settings differ")
    if extra:
        raise ConfigError(f"{key}={str(run_dir)!r}: its parameter {extra[0]} (shape "
                          f"{tuple(src[extra[0]].shape)}) has no place in this model "
                          f"({len(extra)} such); the models' model.* settings differ")
    with torch.no_grad():
        for name, param in wanted.items():
            param.copy_(src[name])
    return len(wanted)


class MetricsLog:
    """metrics.jsonl in the run directory, plus TensorBoard events when tensorboard is installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each layer of the model's ``encoder`` and ``decoder`` stacks in place
    (``train.compile``); parameter names and checkpoints are unchanged. Returns how many."""
    layers = [layer for name in ("encoder", "decoder")
              if isinstance(stack := getattr(model, name, None), torch.nn.ModuleList) for layer in stack]
    if not layers:
        raise ConfigError(f"train.compile: model.arch={type(model).__name__} has no encoder or "
                          "decoder layer stack to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, log=print, progress: bool = True):
        self.cfg = cfg
        self.progress = progress  # the tqdm bar (on the main process)
        t = cfg.train
        self.device = pick_device(t.device)
        self.dist = dist.init(self.device.type)
        if self.device.type == "cuda":
            self.device = pick_device(t.device, self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.run_dir = Path(t.run_dir)
        self.assets = load_assets(cfg.data.dir)
        meta = self.assets.meta
        self.speech = self.assets.speech
        self.tts = self.assets.tts
        # Text only: audio batches (frames) change shape from step to step far more than token
        # batches, and a heap that keeps every freed block grew to 6.2 GB in an asr-small hour
        # (4.0 GB by update 200 against 1.8 GB with glibc's defaults); see encdec/host.py.
        # tcmalloc, when it serves the process (`encdec train` preloads it for audio data,
        # train.allocator), needs neither setting: both are for glibc's malloc
        self.allocator = allocator()
        glibc = self.device.type == "cpu" and self.allocator == "system"
        if glibc and t.retain_freed_memory and not (self.speech or self.tts):
            retain_freed_memory()
        self._trim_every = t.trim_every if glibc and (self.speech or self.tts) else 0
        if self.tts:
            from encdec.data.tts import TTSSplit

            rate = meta["sample_rate"]
            self.train_split = TTSSplit(cfg.data.dir, "train", rate)
            self.dev_split = TTSSplit(cfg.data.dir, "dev", rate)
            self.dev_eval = self.dev_split.entries
        elif self.speech:
            from encdec.data.utterances import Augmenter, UtteranceSplit

            rate = meta["sample_rate"]
            self.train_split = UtteranceSplit(cfg.data.dir, "train", rate)
            self.dev_split = UtteranceSplit(cfg.data.dir, "dev", rate)
            self.dev_eval = [{"audio": str(self.dev_split.audio_path(i)), "refs": [e["text"]]}
                             for i, e in enumerate(self.dev_split.entries)]
            self.augmenter = Augmenter(cfg.augment, rate)
        else:
            self.train_split = BinarizedSplit(cfg.data.dir, "train")
            self.dev_split = BinarizedSplit(cfg.data.dir, "dev")
            self.dev_eval = read_eval(cfg.data.dir, "dev")
        if not self.dev_eval or not len(self.dev_split):
            raise DataError(f"{cfg.data.dir}: the dev split is empty, so validation would score "
                            "nothing and keep the first checkpoint as best; prepare the data "
                            "again with a --dev file (encdec prepare now refuses an empty split)")
        if not len(self.train_split):
            raise DataError(f"{cfg.data.dir}: the train split is empty")
        if t.valid_max_inputs:
            self.dev_eval = self.dev_eval[: t.valid_max_inputs]
        self.metric = meta["metric"]
        if self.tts:  # no decoding in validation: the dev frames' L1 after the post-net
            self.metric_key, self.higher_better = "mel_l1", False
        else:
            _, self.metric_key, self.higher_better = METRICS[self.metric]

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = model_for_data(cfg.model, meta).to(self.device)
        if self.device.type == "cpu" and t.packed_linear:
            pack_linear_weights(self.model)
        if t.init_from and not resume:  # resumed runs have these weights in their checkpoint
            copied = copy_parts(self.model, t.init_from, t.init_parts, data_dir=cfg.data.dir)
            self.log(f"init: copied {copied} tensors ({', '.join(t.init_parts)}) from "
                     f"{t.init_from}")
        if t.init_decoder_from and not resume:
            copied = copy_parts(self.model, t.init_decoder_from, ("decoder",),
                                key="train.init_decoder_from", data_dir=cfg.data.dir)
            self.log(f"init: copied {copied} tensors (decoder) from {t.init_decoder_from}")
        self.teacher = self._load_teacher(t.durations_from) if t.durations_from else None
        self.optimizer = make_optimizer(self.model, t)
        # the weight average that validation, checkpoints and decoding use (train.ema_decay)
        self.ema = None
        if t.ema_decay:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(t.ema_decay))
            self.ema.module.eval()
        if t.compile:  # after the weight average's copy, which stays eager
            if t.packed_linear:
                raise ConfigError("train.compile and train.packed_linear do not go together: "
                                  "the compiled layers choose their own kernels; set one of "
                                  "them to false")
            n = compile_layers(self.model)
            self.log(f"compile: {n} layers with torch.compile (dynamic shapes); the first steps "
                     "compile them")
        self.ddp_model = self.model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the CTC warm-up leaves the decoder out of the first updates
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=t.ctc_warmup_steps > 0)
        self.autocast_dtype = None
        if t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda"):
            self.autocast_dtype = torch.bfloat16
        torch.manual_seed(t.seed * 1000 + self.dist.rank)  # dropout differs between ranks

        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed": 0.0,
                      "best": None, "bad_validations": 0, "tokens_seen": 0,
                      # sums since the last metrics line, so a resumed run logs the same lines
                      "window": {"loss": 0.0, "nll": 0.0, "tokens": 0, "steps": 0,
                                 "audio_s": 0.0}}
        self._saved_step = -1  # the step of the newest checkpoint this process wrote or loaded
        self._lr_elapsed = 0.0  # seconds into the run as the schedule sees them (all processes)
        self._lr = 0.0  # the rate of the latest step
        self._signal = 0  # the signal (SIGINT, SIGTERM) that asked training to stop
        self._prepare_run_dir(resume)

    def _load_teacher(self, run_dir: str):
        """fastspeech with train.durations_from: the autoregressive run whose attention gives
        the durations (its best checkpoint, frozen, in eval mode; each utterance read once)."""

        if self.cfg.model.arch != "fastspeech":
            raise ConfigError(f"train.durations_from={run_dir!r} is for model.arch=fastspeech, "
                              f"not {self.cfg.model.arch!r}")
        teacher_cfg = Config.load(Path(run_dir) / "config.yaml")
        if teacher_cfg.model.arch not in AUTOREGRESSIVE_TTS:
            raise ConfigError(f"train.durations_from={run_dir!r}: durations come from an "
                              f"autoregressive TTS run ({' or '.join(AUTOREGRESSIVE_TTS)}), and "
                              f"this one is {teacher_cfg.model.arch!r}")
        teacher_meta = load_assets(Path(run_dir) / "data").meta
        if teacher_meta.get("src_vocab_size") != self.assets.meta["src_vocab_size"] or \
                teacher_meta.get("src_tokenizer") != self.assets.meta["src_tokenizer"]:
            raise ConfigError(f"train.durations_from={run_dir!r} was trained on other inputs "
                              f"than {self.cfg.data.dir}; train the teacher on the same data")
        teacher = model_for_data(teacher_cfg.model, teacher_meta)
        checkpoint.load_weights(teacher, checkpoint.resolve(run_dir, "best"))
        self.log(f"durations: from the attention of {run_dir}")
        from encdec.models.tts import TeacherDurations

        return TeacherDurations(teacher.to(self.device).eval().requires_grad_(False))

    # ---- run directory / resume ---------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        has_ckpt = (self.run_dir / "checkpoints" / "last").exists()
        if resume:
            if not has_ckpt:
                raise checkpoint.CheckpointError(f"{self.run_dir}: nothing to resume (no checkpoint)")
            self._load(checkpoint.resolve(self.run_dir, "last"))
            self.log(f"resumed from {checkpoint.resolve(self.run_dir, 'last')} "
                     f"(step {self.state['step']}, epoch {self.state['epoch']})")
        elif has_ckpt:
            raise ConfigError(f"{self.run_dir} already holds a trained run; pass --resume to "
                              "continue it or set train.run_dir to a new directory")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.run_dir / "config.yaml")
            copy_assets(self.cfg.data.dir, self.run_dir / "data")
            if not resume and (self.run_dir / "metrics.jsonl").exists():
                (self.run_dir / "metrics.jsonl").unlink()
            if resume:
                self._drop_records_after(self.state["step"])
        dist.barrier(self.dist)
        self.metrics = MetricsLog(self.run_dir, self.dist.is_main)

    def _drop_records_after(self, step: int) -> None:
        """Forget metrics lines written after the checkpoint being resumed (a crash or a kill
        after it): the resumed run writes them again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] > step:
                    continue
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
            kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))

    def _load(self, ckpt_dir: Path) -> None:
        checkpoint.load_weights(self.model, ckpt_dir)
        tensors, info = checkpoint.load_trainer_state(ckpt_dir)
        raw = {k[len("raw."):]: v for k, v in tensors.items() if k.startswith("raw.")}
        if self.ema is not None:  # model.safetensors holds the average
            self.ema.module.load_state_dict(self.model.state_dict())
            self.ema.n_averaged.fill_(int(tensors.get("ema.n_averaged", torch.tensor(0))))
        if raw:  # the weights the optimizer steps (the average's run resumed with or without it)
            self.model.load_state_dict(raw)
        elif self.ema is not None:
            self.log(f"ema: {ckpt_dir} was saved without a weight average; it starts from the "
                     "checkpoint's weights")
        checkpoint.restore_optimizer(self.optimizer, tensors, info)
        for key in self.state:
            if key in info:  # checkpoints of older versions lack the newer keys
                self.state[key] = info[key]
        self._saved_step = self.state["step"]
        rank = self.dist.rank
        if f"rng.{rank}" not in tensors:
            self.log(f"warning: {ckpt_dir} has no random state for process {rank} (saved with "
                     "fewer processes); dropout and masking will differ from an uninterrupted run")
            return
        torch.set_rng_state(tensors[f"rng.{rank}"])
        if self.device.type == "cuda":
            if f"cuda_rng.{rank}" not in tensors:
                self.log(f"warning: {ckpt_dir} has no CUDA random state for process {rank} "
                         "(saved on CPU)")
            else:
                torch.cuda.set_rng_state(tensors[f"cuda_rng.{rank}"], self.device)

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """Every generator training draws from (dropout, masks, sampling), on this process."""
        states = {"rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return states

    def _save(self, is_best: bool) -> None:
        """Checkpoint the current step, with every process's random state. A failed write ends
        training on every process with CheckpointError; the previous checkpoint stays current."""
        gathered = dist.gather(self._rng_states(), self.dist)
        tensors = {f"{name}.{rank}": state for rank, states in enumerate(gathered)
                   for name, state in states.items()}
        if self.ema is not None:
            # copies: tied weights share storage, which safetensors will not write twice
            tensors.update({f"raw.{k}": v.detach().clone()
                            for k, v in self.model.state_dict().items()})
            tensors["ema.n_averaged"] = self.ema.n_averaged.detach().clone()
        error = None
        if self.dist.is_main:
            try:
                checkpoint.save_checkpoint(self.run_dir, self.state["step"], self._eval_model(),
                                           self.optimizer, json.loads(json.dumps(self.state)),
                                           tensors,
                                           is_best=is_best, keep=self.cfg.train.keep_checkpoints)
            except checkpoint.CheckpointError as err:
                error = str(err)
        error = dist.broadcast(error, self.dist)
        if error:
            raise checkpoint.CheckpointError(error)
        self._saved_step = self.state["step"]

    # ---- batches ------------------------------------------------------------------------
    def _length_batches(self, split, **kwargs) -> list:
        """Length-bucketed batches: of at most train.max_tokens padded tokens (text), or of
        train.max_frames padded feature frames (speech, whose frames outnumber its tokens)."""
        t = self.cfg.train
        if self.tts:
            return token_batches(split.src_lens, split.frames, t.max_frames, **kwargs)
        if self.speech:
            return token_batches(split.frames, split.tgt_lens, t.max_frames, **kwargs)
        return token_batches(split.src_lens, split.tgt_lens, t.max_tokens, max_len=t.max_len,
                             **kwargs)

    def _collate(self, split, indices, augment_seed: tuple | None = None):
        """A batch; for speech, ``augment_seed`` turns training augmentation on."""
        if self.tts:
            from encdec.data.tts import collate_tts

            return collate_tts(split, indices, self.assets.audio_front)
        if not self.speech:
            return collate(split, indices)
        from encdec.data.utterances import collate_speech

        augment = self.augmenter if augment_seed is not None else None
        return collate_speech(split, indices, self.assets.audio_front, augment,
                              augment_seed or (0,))

    def _epoch_batches(self, epoch: int) -> list:
        t = self.cfg.train
        batches = self._length_batches(self.train_split, seed=t.seed, epoch=epoch)
        return shard(batches, self.dist.rank, self.dist.world_size)

    def _next_batches(self):
        """The next ``accum_steps`` batches, advancing the saved data position."""
        out = []
        for _ in range(self.cfg.train.accum_steps):
            if self.state["batch_in_epoch"] >= len(self._batches):
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0
                self._batches = self._epoch_batches(self.state["epoch"])
                if not self._batches:
                    raise ConfigError("train.max_tokens is too small or the training split is empty")
            seed = (self.cfg.train.seed, self.state["epoch"], self.state["batch_in_epoch"],
                    self.dist.rank)
            if self.state["step"] < self.cfg.augment.start_step:
                seed = None  # clean audio until augment.start_step
            out.append(self._collate(self.train_split, self._batches[self.state["batch_in_epoch"]],
                                     augment_seed=seed))
            self.state["batch_in_epoch"] += 1
        return out

    # ---- one optimizer step -------------------------------------------------------------
    def _train_step(self, batches) -> tuple[float, float, int]:
        t = self.cfg.train
        lr = lr_at(self.state["step"], t, self._lr_elapsed)
        self._lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_tokens = sum(b.num_tgt_tokens for b in batches)
        # speech: seconds of (augmented) audio in this step, 10 ms per feature frame
        self._step_audio_s = 0.0
        if self.speech:
            self._step_audio_s = sum(float(b.src_lengths.sum()) for b in batches) * 0.01
        elif self.tts:  # frames generated
            self._step_audio_s = sum(b.num_tgt_tokens for b in batches) * 0.01
        # The gradient is the loss summed over every process's batches divided by their total
        # target tokens, as one process would compute it over the same global batch. DDP
        # averages gradients over processes, hence the factor world_size.
        global_tokens = dist.sum_int(total_tokens, self.dist, self.device)
        scale = self.dist.world_size / global_tokens
        loss_sum = nll_sum = 0.0
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1
            # Gradients are all-reduced once, after the last batch. A no_sync() context is a
            # generator and cannot be entered twice: one context spans forward and backward.
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 \
                else self.ddp_model.no_sync()
            with sync:
                amp = torch.autocast(self.device.type, dtype=self.autocast_dtype) \
                    if self.autocast_dtype else contextlib.nullcontext()
                with amp:
                    loss, nll = self._loss(self.ddp_model, batch)
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            nll_sum += float(nll)
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
            for avg, cur in zip(self.ema.module.buffers(), self.model.buffers()):
                avg.copy_(cur)  # buffers (normalisation statistics) follow the model
        self.state["step"] += 1
        self.state["tokens_seen"] += global_tokens
        return loss_sum, nll_sum, total_tokens

    def _loss(self, model, batch):
        t = self.cfg.train
        sampling = sampling_prob(self.state["step"], t) if model.training else 0.0
        if self.tts:
            return tts_loss(model, batch, self.state["step"], self.teacher, sampling=sampling,
                            passes=t.ss_passes)
        return sequence_loss(model, batch, t.label_smoothing, sampling=sampling,
                             ctc_only=model.training and self.state["step"] < t.ctc_warmup_steps,
                             chunked=t.chunked_loss)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> dict:
        """Dev loss and the task metric. Its random draws (the NAT loss masks) come from a
        fixed seed on forked generators: dev losses compare across validations, and training's
        random stream is the same whether or not a validation ran (exact resume)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.train.seed)
            return self._validate()

    def _eval_model(self) -> torch.nn.Module:
        """The weights validated, saved as model.safetensors and decoded with: the average
        under train.ema_decay, else the trained weights."""
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def _validate(self) -> dict:
        model = self._eval_model()
        model.eval()
        forget_packed_weights(model)  # the optimizer changed the weights since the last one
        loss_sum = nll_sum = tokens = 0
        for idx in self._length_batches(self.dev_split, seed=0, epoch=0, shuffle=False):
            batch = self._collate(self.dev_split, idx).to(self.device)
            loss, nll = self._loss(model, batch)
            loss_sum += float(loss)
            nll_sum += float(nll)
            tokens += batch.num_tgt_tokens
        if self.tts:
            self.model.train()
            return {"valid_loss": loss_sum / max(tokens, 1), "valid_mel_l1": nll_sum / max(tokens, 1)}
        d = self.cfg.decode
        # Greedy for autoregressive models; the run's Mask-Predict settings for NAT; CTC best
        # path for speech models without a decoder.
        method = "nat" if d.method == "nat" else "greedy"
        if self.speech and self.cfg.model.ctc_weight == 1.0:
            method = "ctc"
        decode_cfg = DecodeConfig(method=method, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                                  batch_size=max(64, d.batch_size), iterations=d.iterations,
                                  length_beam=d.length_beam, length_scale=d.length_scale)
        if self.speech:
            from encdec.decoding.audio import decode_audio
            from encdec.audio.io import read_audio

            waves = [read_audio(e["audio"], self.assets.audio_front.sample_rate)
                     for e in self.dev_eval]
            # batches of the training batch's audio (train.max_frames): decoding's own default
            # of 200 s padded set the run's peak memory (README "Speech recognition")
            front = self.assets.audio_front
            batch_s = self.cfg.train.max_frames * front.opts.frame_shift_ms / 1000.0
            outputs = decode_audio(model, waves, cfg=decode_cfg, device=self.device,
                                   max_batch_s=batch_s, **self.assets.audio_kwargs())
            ctc_scores = {}
            if method == "greedy" and self.cfg.model.ctc_weight > 0:
                # the CTC head's best path too: it shows the encoder's progress while the
                # decoder is still untrained (the CTC warm-up), and costs one batched pass
                ctc_out = decode_audio(model, waves, device=self.device,
                                       cfg=DecodeConfig(method="ctc", batch_size=decode_cfg.batch_size),
                                       max_batch_s=batch_s, **self.assets.audio_kwargs())
                ctc_scores = score(self.metric, [o[0].text for o in ctc_out],
                                   [e["refs"] for e in self.dev_eval])
        else:
            outputs = decode_texts(model, [e["src"] for e in self.dev_eval], cfg=decode_cfg,
                                   device=self.device, **self.assets.text_kwargs())
        scores = score(self.metric, [o[0].text for o in outputs], [e["refs"] for e in self.dev_eval])
        self.model.train()
        result = {"valid_loss": loss_sum / max(tokens, 1), "valid_nll": nll_sum / max(tokens, 1)}
        result["valid_ppl"] = math.exp(min(result["valid_nll"], 50))
        result.update({f"valid_{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
        if self.speech:
            result.update({f"valid_ctc_{k}": v for k, v in ctc_scores.items()
                           if isinstance(v, (int, float)) and k not in ("n", "words")})
        return result

    def _validate_and_save(self) -> bool:
        """Validate, checkpoint, update early stopping. Returns True when patience ran out."""
        result = self.validate() if self.dist.is_main else None
        result = dist.broadcast(result, self.dist)
        value = result[f"valid_{self.metric_key}"]
        best = self.state["best"]
        improved = best is None or (value > best if self.higher_better else value < best)
        if improved:
            self.state["best"] = value
            self.state["bad_validations"] = 0
        else:
            self.state["bad_validations"] += 1
        self.metrics.write({"step": self.state["step"], "epoch": self.state["epoch"],
                            "elapsed_s": self.state["elapsed"], **result})
        self.log(f"step {self.state['step']}: dev loss {result['valid_loss']:.3f}, "
                 f"{self.metric_key} {value:.2f}" + (" (best)" if improved else ""))
        self._save(is_best=improved)
        patience = self.cfg.train.patience
        return bool(patience and self.state["bad_validations"] >= patience)

    # ---- the loop -----------------------------------------------------------------------
    def _should_stop(self, elapsed: float) -> str:
        t = self.cfg.train
        if t.max_steps and self.state["step"] >= t.max_steps:
            return "max_steps"
        if t.max_minutes and elapsed >= t.max_minutes * 60:
            return "max_minutes"
        if t.max_epochs:
            # The epoch counter moves on lazily, when the next batch is taken.
            done = self.state["epoch"] + (self.state["batch_in_epoch"] >= len(self._batches))
            if done >= t.max_epochs:
                return "max_epochs"
        return ""

    def _eta(self, elapsed: float, rate_steps: float) -> str:
        t = self.cfg.train
        remaining = []
        if t.max_minutes:
            remaining.append(t.max_minutes * 60 - elapsed)
        if t.max_steps and rate_steps > 0:
            remaining.append((t.max_steps - self.state["step"]) / rate_steps)
        if not remaining:
            return "?"
        secs = max(0, int(min(remaining)))
        return f"{secs // 60}:{secs % 60:02d}"

    def fit(self) -> dict:
        """Train until a stop condition; on SIGINT/SIGTERM save a resumable checkpoint at the
        current step and raise TrainingInterrupted."""
        t = self.cfg.train
        self.model.train()
        self._batches = self._epoch_batches(self.state["epoch"])
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {t.run_dir} {self.cfg.model.arch} {n_params / 1e6:.2f}M parameters, "
                 f"{len(self._batches)} batches/epoch/process, {self.dist.world_size} process(es), "
                 f"device {self.device}" + (f", allocator {self.allocator}"
                                            if self.device.type == "cpu" else ""))
        bar = tqdm(total=t.max_steps or None, initial=self.state["step"], unit="step",
                   disable=not (self.dist.is_main and self.progress), dynamic_ncols=True,
                   mininterval=1.0)
        start = time.perf_counter() - self.state["elapsed"]
        window_start = time.perf_counter()
        window = self.state["window"]
        reason = ""
        last_validated = self.state["step"] if self.state["step"] else -1
        previous = self._catch_signals()
        try:
            while True:
                elapsed = time.perf_counter() - start
                reason = self._should_stop(elapsed)
                # 0 go on, 1 a normal stop, 2 a signal: every process takes the same decision,
                # and the same time into the run for a schedule over the time budget (the
                # slowest process's, in ms) so that every process steps with the same rate
                code, elapsed_ms = dist.max_ints(
                    [2 if self._signal else (1 if reason else 0), int(elapsed * 1000)],
                    self.dist, self.device)
                self._lr_elapsed = elapsed_ms / 1000.0
                if code:
                    reason = "interrupted" if code == 2 else (reason or "another process stopped")
                    break
                loss, nll, ntok = self._train_step(self._next_batches())
                if self._trim_every and self.state["step"] % self._trim_every == 0:
                    trim_heap()
                self.state["elapsed"] = time.perf_counter() - start
                window["loss"] += loss
                window["nll"] += nll
                window["tokens"] += ntok
                window["steps"] += 1
                window["audio_s"] = window.get("audio_s", 0.0) + self._step_audio_s
                step = self.state["step"]
                if step % t.log_every == 0 or step == 1:
                    now = time.perf_counter()
                    self._log_window(window, now - window_start, bar)
                    window.update(loss=0.0, nll=0.0, tokens=0, steps=0, audio_s=0.0)
                    window_start = now
                bar.update(1)
                if step % t.valid_every == 0:
                    last_validated = step
                    stop = self._validate_and_save()
                    if self._trim_every:
                        trim_heap()  # what decoding freed
                    if stop:
                        reason = "early stopping"
                        break
        finally:
            bar.close()
            self._restore_signals(previous)
        if reason == "interrupted":
            if self._saved_step != self.state["step"]:
                self._save(is_best=False)
            self.metrics.close()
            raise TrainingInterrupted(self.run_dir, self.state["step"], self._signal or
                                      signal.SIGINT)
        if last_validated != self.state["step"]:
            self._validate_and_save()
        self.log(f"stopped ({reason}) at step {self.state['step']}, epoch {self.state['epoch']}, "
                 f"{self.state['elapsed'] / 60:.1f} min; best dev {self.metric_key} {self.state['best']:.2f}")
        self.metrics.close()
        return dict(self.state)

    def _log_window(self, window: dict, seconds: float, bar) -> None:
        step = self.state["step"]
        rate = window["tokens"] * self.dist.world_size / max(seconds, 1e-9)
        record = {"step": step, "epoch": self.state["epoch"],
                  "loss": window["loss"] / window["tokens"],
                  "nll": window["nll"] / window["tokens"],
                  "lr": self._lr, "tokens_per_s": rate,
                  "elapsed_s": self.state["elapsed"],
                  # peak resident memory of this process so far (Linux: KiB)
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        rss = resident_mb()  # and now
        if rss is not None:
            record["rss_mb"] = rss
        if self.cfg.train.scheduled_sampling != "off":  # the decoder inputs' sampling rate now
            record["sampling_prob"] = sampling_prob(step, self.cfg.train)
        if self.speech or self.tts:  # audio seconds trained on (generated) per wall-clock second
            record["audio_s_per_s"] = window.get("audio_s", 0.0) * self.dist.world_size / \
                max(seconds, 1e-9)
        self.metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{rate:,.0f}",
                        eta=self._eta(self.state["elapsed"], window["steps"] / max(seconds, 1e-9)),
                        refresh=False)

    def _catch_signals(self) -> dict:
        """SIGINT/SIGTERM ask for a stop after the current step (the handler only records it);
        a second signal acts at once, as it would without us."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def ask_to_stop(signum, frame):
            self._signal = signum
            signal.signal(signum, previous[signum])
            if self.dist.is_main:
                print(f"\nencdec: {signal.Signals(signum).name}: saving a checkpoint after this "
                      "step (send it again to quit at once)", file=sys.stderr, flush=True)

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, ask_to_stop)
        return previous

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, run_dir: Path, step: int, signum: int):
        self.exit_code = 128 + int(signum)  # what the shell reports for a death by that signal
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved a checkpoint in "
                         f"{run_dir}; continue with: encdec train {run_dir} --resume")


def wants_tcmalloc(cfg: Config) -> bool:
    """Whether ``encdec train`` should run this configuration with tcmalloc preloaded
    (``train.allocator``): always for ``tcmalloc``; for ``auto``, audio data (speech, TTS)
    trained on the CPU. False when tcmalloc or jemalloc serves the process already."""
    t = cfg.train
    if t.allocator == "system" or allocator() != "system":
        return False
    if t.allocator == "tcmalloc":
        return True
    if not sys.platform.startswith("linux"):
        return False
    if t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available()):
        return False  # tensors live in CUDA's caching allocator
    try:
        return load_assets(cfg.data.dir).meta.get("modality") in ("speech", "tts")
    except Exception:  # noqa: BLE001 - the trainer reports a missing or broken data directory
        return False


def train(cfg: Config, resume: bool = False, log=print, progress: bool = True) -> dict:
    trainer = Trainer(cfg, resume=resume, log=log, progress=progress)
    try:
        return trainer.fit()
    finally:
        dist.cleanup(trainer.dist)
