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
from safetensors.torch import load_file, save_file

from encdec.files import atomic_write_text, fsync_dir, fsync_file, write_error


class CheckpointError(RuntimeError):
    pass


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


def _same_memory_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names grouped by the memory they read: tied weights (one tensor under several names)
    fall in one group. Views into one buffer at different places (cuDNN packs an RNN's
    weights into one flat buffer on the GPU) are separate groups."""
    groups: dict[tuple, list[str]] = {}
    for name, value in state.items():
        key = (value.device, value.data_ptr(), tuple(value.shape), tuple(value.stride()),
               value.dtype) if value.numel() else (name,)  # empty tensors share no memory
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's weights as safetensors writes them: tied weights once, under the first of
    their names in sorted order (the metadata maps each other name to it, as safetensors'
    ``save_model`` does, so files of either writer load the same way), and every tensor in
    memory of its own (a view into a packed buffer is copied out)."""
    state = model.state_dict()
    tensors, metadata = {}, {}
    for names in _same_memory_groups(state):
        keep = sorted(names)[0]
        for other in names:
            if other != keep:
                metadata[other] = keep
        value = state[keep].detach()
        whole = (value.is_contiguous() and value.storage_offset() == 0 and
                 value.untyped_storage().nbytes() == value.numel() * value.element_size())
        tensors[keep] = value if whole else value.clone(memory_format=torch.contiguous_format)
    return tensors, metadata


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer,
                    trainer_state: dict, state_tensors: dict[str, torch.Tensor], *, is_best: bool,
                    keep: int) -> Path:
    """Write ``step-NNNNNNN`` (the weights to decode with, the optimizer, ``state_tensors`` by
    name: random states and, under a weight average, the raw weights; the trainer state) and
    point ``last`` (and ``best``) at it. Every file and directory is flushed to disk before the
    rename that makes it count; on a write error (a full disk) the partial directory is removed,
    the previous checkpoint stays current, and CheckpointError says where and how much space
    is left."""
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step-{step:07d}"

    def write(tmp: Path) -> None:
        weights, metadata = model_tensors(model)
        save_file(weights, str(tmp / "model.safetensors"), metadata=metadata or None)
        tensors, info = optimizer_tensors(optimizer)
        tensors.update({k: v.detach().to("cpu", copy=True) for k, v in state_tensors.items()})
        save_file(tensors, str(tmp / "trainer.safetensors"))
        info.update(trainer_state)
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1), encoding="utf-8")

    final = _write_dir(ckpt_root, name, write)
    try:
        atomic_write_text(ckpt_root / "last", name + "\n")
        if is_best:
            atomic_write_text(ckpt_root / "best", name + "\n")
    except OSError as err:
        raise CheckpointError(write_error("the checkpoint pointer", ckpt_root / "last", err)) from None
    _prune(ckpt_root, keep)
    return final


def _write_dir(ckpt_root: Path, name: str, write) -> Path:
    """Build ``ckpt_root/name`` with ``write(tmp_dir)`` under a temporary name, flush it to
    disk, then rename it into place (replacing an older directory of that name only after the
    new one is complete)."""
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        for path in tmp.iterdir():
            fsync_file(path)
        fsync_dir(tmp)
        if final.exists():  # the same step written again: swap, then drop the old copy
            old = ckpt_root / f".tmp-old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(write_error("checkpoint", final, err)) from None
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
    """Copy a checkpoint's weights into ``model`` in place. A name the file leaves out is
    fine when it is tied to a name the file has (the same memory in the model)."""
    tensors = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    state = model.state_dict()
    unexpected = [name for name in tensors if name not in state]
    missing = [name for names in _same_memory_groups(state)
               if not any(n in tensors for n in names) for name in names]
    if not missing and not unexpected:
        model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: weights do not match the model "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def trainer_info(ckpt_dir: str | Path) -> dict:
    """The trainer's state at a checkpoint without its tensors: ``step``, ``epoch``,
    ``elapsed`` (training seconds), ``best`` and the optimizer's scalars."""
    return json.loads((Path(ckpt_dir) / "trainer.json").read_text(encoding="utf-8"))


def load_trainer_state(ckpt_dir: str | Path) -> tuple[dict, dict]:
    tensors = load_file(str(Path(ckpt_dir) / "trainer.safetensors"))
    return tensors, trainer_info(ckpt_dir)


def check_average_name(ckpt_root: Path, name: str, force: bool = False) -> None:
    """An averaged checkpoint gets a plain name of its own: never a step directory's (training
    would prune it or resume from it), a pointer's, a path, or an existing checkpoint that is
    not an average (unless ``force``)."""
    if not name or name in ("last", "best", ".", "..") or "/" in name or "\\" in name \
            or name.startswith(("step-", ".")):
        raise CheckpointError(f"--name {name!r}: give a plain directory name that does not start "
                              "with 'step-' or '.', and is not 'last' or 'best' (e.g. avg-last5)")
    target = ckpt_root / name
    if target.exists() and not force and not (target / "averaged.json").exists():
        raise CheckpointError(f"{target} exists and is not an averaged checkpoint; choose "
                              "another --name, or pass --force to replace it")


def raw_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint saved under a weight average (train.ema_decay),
    named as in its model.safetensors (which holds the average)."""
    names = set(load_file(str(ckpt_dir / "model.safetensors")))
    tensors = load_file(str(ckpt_dir / "trainer.safetensors"))
    raw = {k[len("raw."):]: v for k, v in tensors.items() if k.startswith("raw.")}
    if not raw:
        raise CheckpointError(f"{ckpt_dir}: no raw weights (the run was trained without "
                              "train.ema_decay, so model.safetensors holds the trained weights)")
    return {k: v for k, v in raw.items() if k in names}


def average_checkpoints(run_dir: str | Path, last: int, name: str | None = None,
                        force: bool = False, raw: bool = False) -> Path:
    """Average the weights of the run's ``last`` newest step checkpoints into a new checkpoint
    directory (default ``avg-last{N}``, ``raw-avg-last{N}`` with ``raw``), usable as
    ``--checkpoint avg-lastN``. ``raw``: the trained weights of a run with a weight average
    (train.ema_decay) rather than the average; ``last=1`` takes them out as they are.

    The mean is taken in float64 and stored in each tensor's own dtype. The result is written
    under a temporary name and renamed, like every checkpoint. An existing directory of that
    name is replaced only if it is an earlier average, or with ``force``.
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
    name = name or f"{'raw-' if raw else ''}avg-last{last}"
    check_average_name(ckpt_root, name, force)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in chosen:
        weights = raw_weights(path) if raw else load_file(str(path / "model.safetensors"))
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

    def write(tmp: Path) -> None:
        save_file(averaged, str(tmp / "model.safetensors"),
                  metadata={"averaged": ",".join(p.name for p in chosen)})
        (tmp / "averaged.json").write_text(
            json.dumps({"checkpoints": [p.name for p in chosen], "raw": raw}) + "\n",
            encoding="utf-8")

    return _write_dir(ckpt_root, name, write)
