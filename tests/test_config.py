from pathlib import Path

import pytest

from encdec.config import Config, ConfigError


def test_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\nmodel:\n  d_model: 64\n  n_heads: 4\n")
    cfg = Config.load(path, ["train.lr=3e-4", "model.norm=post", "train.betas=[0.9, 0.99]"])
    assert cfg.train.lr == 3e-4 and cfg.model.norm == "post" and cfg.train.betas == (0.9, 0.99)
    cfg.save(tmp_path / "saved.yaml")
    assert Config.load(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("train.lr=fast", "'train.lr' must be a number"),
    ("model.norm=middle", "model.norm='middle': choose one of pre, post"),
    ("model.n_heads=3", "divisible by model.n_heads=3"),
    ("train.schedule=cosine", "needs train.max_steps or train.max_minutes"),
    ("train.schedule=linear", "needs train.max_steps or train.max_minutes"),
    ("train.decay_fraction=0", "train.decay_fraction=0.0: must be in (0, 1]"),
    ("model.tts_guided_sigma=0", "model.tts_guided_sigma=0.0: must be > 0"),
    ("model.tts_attention_keys=decoder", "model.tts_attention_keys=.decoder.: choose encoder or"),
    ("model.tts_postnet_layers=1", "model.tts_postnet_layers=1: 0 .no post-net. or >= 2"),
    ("model.tts_postnet_layers=-2", "model.tts_postnet_layers=-2: 0 .no post-net. or >= 2"),
    ("train.trim_every=-1", "train.trim_every=-1: must be 0 .never. or positive"),
    ("lr=1", "section.name"),
])
def test_bad_config_names_the_key(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Config.load(path, [override])


def test_every_shipped_config_loads():
    """configs/*.yaml: each one a valid config (unknown keys and bad values are refused)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        Config.load(path)
