"""Linear layers for CPU inference through oneDNN, with each weight packed once.

For fp32 on the CPU, ``F.linear`` calls the BLAS that PyTorch is built with (MKL). For the
shapes of incremental decoding (a few to a few hundred rows against a 256-wide layer, or
against a vocabulary-sized output layer) oneDNN's inner product on a weight reordered into its
own blocked layout does the same product at up to 3x the rate on the CPUs measured
(``benchmarks/decode_speed.py --engines encdec,encdec-unpacked``). ``pack_linear_weights``
turns a model's ``nn.Linear`` modules into ``PackedLinear`` in place: same parameters, same
``state_dict``; each packs its weight on first use and packs it again whenever the weight has
changed (loaded, averaged, trained: PyTorch counts in-place changes in ``_version``).

The packed path is taken only where it computes the same thing: no autograd (inference or
``torch.no_grad``), fp32 on the CPU, no autocast; and only for products of at least
``MIN_MACS`` multiply-adds, below which oneDNN's cost per call outweighs its kernel. Everything else goes through ``F.linear``,
so a packed model still trains and still moves to a GPU. Results differ from ``F.linear`` only
in rounding (another summation order, ~1e-6 relative).

Memory: oneDNN keeps a compiled kernel per input shape (rows x layer), up to its cache sizes
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` and PyTorch's ``LRU_CACHE_CAPACITY``, 1024 each by
default), about 0.6 MB each; decoding a test set grows the resident size by 100-200 MB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_available: bool | None = None

# Below this many multiply-adds per call, oneDNN's fixed cost per call (~15 us) outweighs its
# faster kernel and F.linear stays quicker (e.g. one row against a 256 x 256 layer).
MIN_MACS = 1 << 20


def available() -> bool:
    """Whether this PyTorch build can pack a weight for oneDNN and use it (checked once)."""
    global _available
    if _available is None:
        try:
            ops = torch.ops.mkldnn
            w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8), 2)
            y = ops._linear_pointwise(torch.ones(2, 8), w, torch.zeros(4), "none", [], "")
            _available = bool(torch.backends.mkldnn.is_available()) and bool((y == 8).all())
        except (AttributeError, RuntimeError, NotImplementedError):
            _available = False
    return _available


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose no-grad fp32 CPU forward uses a oneDNN-packed copy of the weight."""

    _packed: tuple | None = None  # (weight version, data pointer, packed weight)

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        # (inference tensors have no version counter; they change in place only under
        # inference_mode, where encdec never loads weights)
        key = (-1 if w.is_inference() else w._version, w.data_ptr())
        if self._packed is None or self._packed[:2] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 64)
            self._packed = (*key, packed)
        return self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or x.numel() * self.out_features < MIN_MACS):
            return F.linear(x, self.weight, self.bias)
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), bias, "none", [], "")


def pack_linear_weights(model: nn.Module) -> int:
    """Make every ``nn.Linear`` of ``model`` a ``PackedLinear`` (in place); returns how many.
    Does nothing (0) where this PyTorch build has no oneDNN inner product."""
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            n += 1
    return n


def unpack_linear_weights(model: nn.Module) -> int:
    """Undo ``pack_linear_weights``: plain ``nn.Linear`` again, packed copies dropped."""
    n = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("_packed", None)
            n += 1
    return n
