"""The Python API of text runs: ``Translator.from_run(path).translate([...])`` (`encdec
translate` is ``encdec.commands.translate``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from encdec import checkpoint
from encdec.config import Config, DecodeConfig
from encdec.data.assets import load_assets
from encdec.data.dataset import pad, teacher_forcing
from encdec.data.vocab import PAD
from encdec.decoding import generate
from encdec.decoding.texts import Translation, decode_texts
from encdec.models import model_for_data
from encdec.models.base import EncoderOut
from encdec.nn.packed import pack_linear_weights

ENGINES = ("encdec", "ctranslate2")


def inference_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise the device named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Translator:
    """A trained model with its tokenizers, vocabularies and decoding defaults.

    ``search`` (None: encdec's own, ``encdec.decoding.generate``) finds the hypotheses; the
    ctranslate2 engine's runs a CTranslate2 export of the same weights instead."""

    def __init__(self, model, assets, cfg: Config, device: torch.device, checkpoint_dir: Path,
                 search=None):
        self.model = model.eval()
        if device.type == "cpu" and search is None:
            pack_linear_weights(self.model)
        self.assets = assets
        self.cfg = cfg
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.search = search

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint_name: str = "best",
                 device: str = "cpu", engine: str = "encdec",
                 export_dir: str | Path | None = None) -> "Translator":
        """``engine="ctranslate2"``: decode with CTranslate2 on the export ``export_dir``
        (made from this checkpoint), by default RUN/export/ctranslate2, which is exported on
        first use and again once the checkpoint's weights changed."""
        run_dir = Path(run_dir)
        if engine not in ENGINES:
            from encdec.config import ConfigError
            raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if not (run_dir / "config.yaml").exists():
            raise checkpoint.CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = Config.load(run_dir / "config.yaml")
        if engine == "ctranslate2":
            from encdec.export import check_exportable
            check_exportable(cfg, run_dir)  # before anything loads
        assets = load_assets(run_dir / "data")
        if assets.tts:
            from encdec.config import ConfigError
            raise ConfigError(f"{run_dir} is a text-to-speech run: speak with it "
                              f"(encdec speak {run_dir} \"text\" -o out.wav, or "
                              "encdec.speak.Speaker; judge it with encdec evaluate); it does "
                              "not translate or serve")
        model = model_for_data(cfg.model, assets.meta)
        ckpt = checkpoint.resolve(run_dir, checkpoint_name)
        checkpoint.load_weights(model, ckpt)
        dev = inference_device(device)
        search = None
        if engine == "ctranslate2":
            from encdec.decoding.ctranslate2 import CTranslate2Search
            from encdec.export import ensure_export
            path = ensure_export(run_dir, ckpt, export_dir)
            search = CTranslate2Search(path, device, threads=torch.get_num_threads())
            if (search.src_vocab.itos, search.tgt_vocab.itos) != (assets.src_vocab.itos,
                                                                  assets.tgt_vocab.itos):
                from encdec.config import ConfigError
                raise ConfigError(f"{path}: its vocabularies are not those of {run_dir}; "
                                  f"export the run again (encdec export {run_dir})")
        return cls(model.to(dev), assets, cfg, dev, ckpt, search)

    @property
    def engine(self) -> str:
        """What decodes: encdec (its own search on the PyTorch model) or ctranslate2."""
        return getattr(self.search, "engine", "encdec")

    def decode_config(self, **overrides) -> DecodeConfig:
        """The run's decoding defaults with ``overrides`` (None values ignored) applied."""
        values = dataclasses.asdict(self.cfg.decode)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("beam_size") is not None and overrides.get("method") is None:
            values["method"] = "beam" if overrides["beam_size"] > 1 else "greedy"
        if values["method"] != "beam" and overrides.get("ctc_weight") is None:
            values["ctc_weight"] = 0.0  # the run's joint-decoding weight is for beam search
        cfg = DecodeConfig(**values)
        Config(model=self.cfg.model, decode=cfg)  # validates (ConfigError names the key)
        if self.search is not None:
            self.search.check(cfg)  # what the engine cannot do
        return cfg

    @property
    def max_src_tokens(self) -> int:
        """Longest input (in source tokens) the model was trained on; longer ones are split."""
        return int(self.assets.meta.get("max_len") or self.cfg.train.max_len)

    def translate_nbest(self, inputs: list[str], need_attention: bool = False, progress=None,
                        warn=None, long_inputs: str = "split", rerank: "Translator | None" = None,
                        **decode_overrides) -> list[list[Translation]]:
        """n-best translations per input, best first.

        ``rerank``: another (autoregressive) model that re-orders the candidates by its own
        score (``score_candidates``), which becomes each output's score. The candidates are
        all beams (beam search) or all candidate lengths (nat), so this is the noisy parallel
        decoding of Gu et al. (2018) for non-autoregressive models.
        """
        if self.assets.speech:
            from encdec.config import ConfigError
            raise ConfigError(f"{self.checkpoint_dir.parent.parent} is a speech recognizer: it "
                              "takes audio, not text (encdec transcribe RUN FILE..., or "
                              "encdec.transcribe.Transcriber in Python)")
        cfg = self.decode_config(**decode_overrides)
        if self.search is not None:
            self.search.check(cfg, need_attention)
        wanted = cfg.nbest
        if rerank is not None:
            if cfg.method == "nat" and cfg.length_beam > 1:
                cfg = dataclasses.replace(cfg, nbest=cfg.length_beam)
            elif cfg.method == "beam" and cfg.beam_size > 1:
                cfg = dataclasses.replace(cfg, nbest=cfg.beam_size)
            else:
                from encdec.config import ConfigError
                raise ConfigError("reranking needs several candidates per input: a length beam "
                                  "above 1 (nat) or a beam above 1")
            rerank._check_reranker()
        results = decode_texts(self.model, list(inputs), cfg=cfg, device=self.device,
                               need_attention=need_attention, progress=progress,
                               max_src_tokens=self.max_src_tokens, long_inputs=long_inputs,
                               warn=warn, search=self.search or generate,
                               **self.assets.text_kwargs())
        if rerank is None:
            return results
        scores = rerank.score_candidates(list(inputs), [[t.text for t in nb] for nb in results],
                                         batch_size=cfg.batch_size)
        reranked = []
        for nb, sc in zip(results, scores):
            order = sorted(range(len(nb)), key=lambda i: -sc[i])[:wanted]  # stable on ties
            reranked.append([dataclasses.replace(nb[i], score=sc[i]) for i in order])
        return reranked

    def _check_reranker(self) -> None:
        if getattr(self.model, "non_autoregressive", False):
            from encdec.config import ConfigError
            raise ConfigError("a reranking model must be autoregressive (model.arch transformer "
                              "or a recurrent one), not nat")

    @torch.no_grad()
    def score_candidates(self, sources: list[str], candidates: list[list[str]],
                         batch_size: int | None = None) -> list[list[float]]:
        """This model's score of each candidate output given its source, teacher-forced:
        the log-probability of its tokens and </s>, divided by (tokens + 1) **
        decode.length_penalty, as beam search scores its hypotheses. Each source is encoded
        once for all of its candidates. Inputs that tokenize to nothing score 0."""
        self._check_reranker()
        if len(sources) != len(candidates):
            raise ValueError(f"{len(sources)} sources but {len(candidates)} candidate lists")
        a = self.assets
        src_ids = [a.src_vocab.encode(a.src_tokenizer.encode(s)) for s in sources]
        tgt_ids = [[a.tgt_vocab.encode(a.tgt_tokenizer.encode(c)) for c in cands]
                   for cands in candidates]
        alpha = self.cfg.decode.length_penalty
        scores = [[0.0] * len(c) for c in candidates]
        todo = sorted((i for i, s in enumerate(src_ids) if s and candidates[i]),
                      key=lambda i: -len(src_ids[i]))
        step = batch_size or self.cfg.decode.batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                rows = [(r, i, j) for r, i in enumerate(chunk) for j in range(len(tgt_ids[i]))]
                tgt_in, tgt_out = teacher_forcing([tgt_ids[i][j] for _, i, j in rows])
                enc = self.model.encode(pad([src_ids[i] for i in chunk]).to(self.device))
                which = torch.tensor([r for r, _, _ in rows], device=self.device)
                enc = EncoderOut(enc.memory.index_select(0, which),
                                 enc.memory_mask.index_select(0, which))
                hidden, _ = self.model.decode(tgt_in.to(self.device), enc)
                tgt_out = tgt_out.to(self.device)
                real = tgt_out.ne(PAD)
                log_probs = torch.log_softmax(self.model.logits(hidden[real]).float(), dim=-1)
                token_lp = torch.zeros(real.shape, device=self.device)
                token_lp[real] = log_probs.gather(1, tgt_out[real][:, None])[:, 0]
                lengths = real.sum(1)
                total = (token_lp.sum(1) / lengths.float() ** alpha).tolist()
                for n, (_, i, j) in enumerate(rows):
                    scores[i][j] = total[n]
        finally:
            self.model.train(was_training)
        return scores

    def translate(self, inputs: list[str], **decode_overrides) -> list[str]:
        """The best output string for each input, in input order."""
        return [n[0].text for n in self.translate_nbest(inputs, **decode_overrides)]
