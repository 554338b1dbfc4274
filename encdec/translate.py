"""`encdec translate` and the Python API: ``Translator.from_run(path).translate([...])``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from encdec import checkpoint
from encdec.config import Config, DecodeConfig
from encdec.data.assets import load_assets
from encdec.decoding.texts import Translation, decode_texts
from encdec.models import build_model


class Translator:
    """A trained model with its tokenizers, vocabularies and decoding defaults."""

    def __init__(self, model, assets, cfg: Config, device: torch.device, checkpoint_dir: Path):
        self.model = model.eval()
        self.assets = assets
        self.cfg = cfg
        self.device = device
        self.checkpoint_dir = checkpoint_dir

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint_name: str = "best",
                 device: str = "cpu") -> "Translator":
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise checkpoint.CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = Config.load(run_dir / "config.yaml")
        assets = load_assets(run_dir / "data")
        model = build_model(cfg.model, assets.meta["src_vocab_size"], assets.meta["tgt_vocab_size"])
        ckpt = checkpoint.resolve(run_dir, checkpoint_name)
        checkpoint.load_weights(model, ckpt)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        return cls(model.to(dev), assets, cfg, dev, ckpt)

    def decode_config(self, **overrides) -> DecodeConfig:
        """The run's decoding defaults with ``overrides`` (None values ignored) applied."""
        values = dataclasses.asdict(self.cfg.decode)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("beam_size") is not None and overrides.get("method") is None:
            values["method"] = "beam" if overrides["beam_size"] > 1 else "greedy"
        cfg = DecodeConfig(**values)
        Config(decode=cfg)  # validates the combination (raises ConfigError naming the key)
        return cfg

    def translate_nbest(self, inputs: list[str], need_attention: bool = False, progress=None,
                        **decode_overrides) -> list[list[Translation]]:
        return decode_texts(self.model, list(inputs), cfg=self.decode_config(**decode_overrides),
                            device=self.device, need_attention=need_attention, progress=progress,
                            **self.assets.text_kwargs())

    def translate(self, inputs: list[str], **decode_overrides) -> list[str]:
        """The best output string for each input, in input order."""
        return [n[0].text for n in self.translate_nbest(inputs, **decode_overrides)]


def run_cli(run_dir: str, *, checkpoint_name: str, input_path: str | None, output_path: str | None,
            scores: bool, device: str, overrides: dict) -> None:
    tr = Translator.from_run(run_dir, checkpoint_name, device)
    tr.decode_config(**overrides)  # bad settings fail before any input is read
    n = overrides.get("nbest") or 1

    def fmt(results):
        lines = []
        for nb in results:
            for rank, t in enumerate(nb[:n]):
                prefix = f"{rank}\t" if n > 1 else ""
                lines.append(f"{prefix}{t.text}\t{t.score:.4f}" if scores else f"{prefix}{t.text}")
        return lines

    if input_path is not None:
        from tqdm import tqdm

        from encdec.data.corpus import read_lines

        lines = read_lines(input_path)
        with tqdm(total=len(lines), unit="line", file=sys.stderr) as bar:
            results = tr.translate_nbest(lines, progress=bar.update, **overrides)
        text = "".join(line + "\n" for line in fmt(results))
        if output_path:
            Path(output_path).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return
    if sys.stdin.isatty():  # interactive prompt
        print("encdec: type an input and press Enter (Ctrl-D to quit)", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
            for out in fmt(tr.translate_nbest([line], **overrides)):
                print(out, flush=True)
    out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    try:
        # Line by line, flushed, so encdec can sit at the end of a pipe.
        for line in sys.stdin:
            for text in fmt(tr.translate_nbest([line.rstrip("\n")], **overrides)):
                out.write(text + "\n")
            out.flush()
    finally:
        if output_path:
            out.close()
