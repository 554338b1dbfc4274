"""train.compile: the layer stacks under torch.compile train as the eager ones do, and the
checkpoints keep their parameter names."""

import shutil

import pytest
from safetensors import safe_open

from conftest import needs_system, train_metrics, write_config
from encdec import checkpoint
from encdec.cli import main
from encdec.config import ConfigError, ModelConfig
from encdec.models.recurrent import RecurrentSeq2Seq
from encdec.train import compile_layers

needs_compiler = needs_system([] if shutil.which("g++") else ["g++"],
                              "train.compile on the CPU (TorchInductor compiles C++)")


@needs_compiler
def test_compiled_training_follows_eager_training(tiny_data, tmp_path):
    """Same losses and dev loss as eager training up to rounding, over batches of changing
    shapes (dynamic shapes), and the same tensor names in the checkpoint. Fails if compile
    wraps the layers (``_orig_mod.`` names) or changes what they compute."""
    records, names = {}, {}
    for compiled in (True, False):
        run, records[compiled] = train_metrics(tmp_path, tiny_data, str(compiled), max_steps=20,
                                               valid_every=20, log_every=5, compile=compiled)
        step_dir = checkpoint.resolve(run, "last")
        names[compiled] = []
        for file in ("model.safetensors", "trainer.safetensors"):
            with safe_open(str(step_dir / file), "pt") as f:
                names[compiled] += sorted(f.keys())
    assert names[True] == names[False]
    compiled_run, eager_run = records[True], records[False]
    assert [r["step"] for r in compiled_run] == [r["step"] for r in eager_run]
    assert any("valid_loss" in r for r in compiled_run)
    for a, b in zip(compiled_run, eager_run):
        for key in ("loss", "valid_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (a["step"], key)


def test_compile_refuses_a_model_without_layer_stacks():
    model = RecurrentSeq2Seq(ModelConfig(arch="lstm", d_model=16, enc_layers=1, dec_layers=1),
                             10, 10)
    with pytest.raises(ConfigError, match="train.compile"):
        compile_layers(model)


def test_compile_refuses_packed_linear(tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "both.yaml", tiny_data, tmp_path / "run", max_steps=2,
                       compile=True, packed_linear=True)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.compile and train.packed_linear" in err and "Traceback" not in err
