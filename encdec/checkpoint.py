"""Checkpoints: weights in safetensors, trainer state in safetensors + JSON, written atomically.

    RUN/checkpoints/step-000500/{model.safetensors, trainer.safetensors, trainer.json}
    RUN/checkpoints/last  RUN/checkpoints/best      (one line: the step directory's name)

A step directory is written under a temporary name and renamed when complete; the pointer
files are replaced atomically afterwards. A crash at any moment leaves the previous
checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


class CheckpointError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors (safetensors) and plain JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer,
                    trainer_state: dict, rng_states: list[torch.Tensor], *, is_best: bool,
                    keep: int) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, info = optimizer_tensors(optimizer)
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}"] = rng.cpu().contiguous()
    save_file(tensors, str(tmp / "trainer.safetensors"))
    info.update(trainer_state)
    (tmp / "trainer.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_root / "last", name + "\n")
    if is_best:
        _atomic_write_text(ckpt_root / "best", name + "\n")
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    pinned = {resolve(ckpt_root.parent, which).name for which in ("last", "best")
              if (ckpt_root / which).exists()}
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a crash during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)


def resolve(run_dir: str | Path, which: str = "best") -> Path:
    """The step directory for ``which``: "best", "last", or a step directory name."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if which in ("best", "last"):
        pointer = ckpt_root / which
        if not pointer.exists():
            if which == "best" and (ckpt_root / "last").exists():
                pointer = ckpt_root / "last"
            else:
                raise CheckpointError(f"{run_dir}: no {which!r} checkpoint (is this a run directory "
                                      "that has trained at least until its first validation?)")
        which = pointer.read_text(encoding="utf-8").strip()
    path = ckpt_root / which
    if not (path / "model.safetensors").exists():
        raise CheckpointError(f"{path}: checkpoint has no model.safetensors")
    return path


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    missing, unexpected = load_model(model, str(Path(ckpt_dir) / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: weights do not match the model "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def load_trainer_state(ckpt_dir: str | Path) -> tuple[dict, dict]:
    ckpt_dir = Path(ckpt_dir)
    tensors = load_file(str(ckpt_dir / "trainer.safetensors"))
    info = json.loads((ckpt_dir / "trainer.json").read_text(encoding="utf-8"))
    return tensors, info


def average_checkpoints(run_dir: str | Path, last: int, name: str | None = None) -> Path:
    """Average the weights of the run's ``last`` newest step checkpoints into a new checkpoint
    directory (default ``avg-last{N}``), usable as ``--checkpoint avg-lastN``.

    The mean is taken in float64 and stored in each tensor's own dtype. The result is written
    under a temporary name and renamed, like every checkpoint.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    if last < 1:
        raise CheckpointError(f"--last must be at least 1 (got {last})")
    steps = sorted(p for p in ckpt_root.glob("step-*") if (p / "model.safetensors").exists())
    if len(steps) < last:
        raise CheckpointError(
            f"{run_dir}: {len(steps)} step checkpoint(s) kept, cannot average the last {last}; "
            "train with train.keep_checkpoints >= N to keep enough")
    chosen = steps[-last:]
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in chosen:
        weights = load_file(str(path / "model.safetensors"))
        if total and set(weights) != set(total):
            raise CheckpointError(f"{path}: its tensors differ from {chosen[0]}'s; "
                                  "cannot average checkpoints of different models")
        for key, value in weights.items():
            if key in total:
                if value.shape != total[key].shape:
                    raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                          f"not {tuple(total[key].shape)}")
                total[key] += value.double()
            else:
                total[key] = value.double()
                dtypes[key] = value.dtype
    averaged = {k: (v / len(chosen)).to(dtypes[k]).contiguous() for k, v in total.items()}
    name = name or f"avg-last{last}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(averaged, str(tmp / "model.safetensors"),
              metadata={"averaged": ",".join(p.name for p in chosen)})
    (tmp / "averaged.json").write_text(json.dumps({"checkpoints": [p.name for p in chosen]}) + "\n",
                                       encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
