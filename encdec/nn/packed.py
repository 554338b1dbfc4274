"""Linear layers on the CPU through oneDNN, with each weight packed once per change.

For fp32 on the CPU, ``F.linear`` calls the BLAS that PyTorch is built with (MKL). For the
shapes of incremental decoding (a few to a few hundred rows against a 256-wide layer, or
against a vocabulary-sized output layer) oneDNN's inner product on a weight reordered into its
own blocked layout does the same product at up to 3x the rate on the CPUs measured
(``benchmarks/linear_kernels.py``; whole decoding: ``benchmarks/decode_speed.py --engines
encdec,encdec-unpacked``); for training-sized products
the gain is smaller, largest on the output layer. ``pack_linear_weights`` turns a model's
``nn.Linear`` modules into ``PackedLinear`` in place: same parameters, same ``state_dict``;
in eval mode each packs its weight on first use and again whenever the weight has changed
(loaded, averaged: PyTorch counts in-place changes in ``_version``; a fused optimizer's update
does not count, so the trainer drops the packed copies before validating); in training mode
every forward packs afresh (a copy of each weight per step, small beside the step). Inference
(``Translator``) always packs on the CPU; training does with ``train.packed_linear``.

The packed path is taken only for fp32 on the CPU without autocast, and only for products of
at least ``MIN_MACS`` multiply-adds, below which oneDNN's cost per call outweighs its kernel;
everything else goes through ``F.linear``, so a packed model still moves to a GPU. With
autograd, the product and the input's gradient use oneDNN and the weight's gradient PyTorch's
BLAS (``_PackedLinearFunction``). Results differ from ``F.linear`` only in rounding (another
summation order, ~1e-6 relative).

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


def _pack(w: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = w.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
    return packed, (torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 64)
                    if transposed else None)


def _inner_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b for training: oneDNN for the product and for the input's gradient
    (grad_y W, through the packed W^T); the weight's gradient grad_y^T x stays with F.linear's
    BLAS, which was as fast or faster for that shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed, packed_t):
        ctx.save_for_backward(x)
        ctx.packed_t = packed_t
        ctx.has_bias = bias is not None
        return _inner_product(x, packed, bias.detach() if bias is not None else None)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        rows = grad.reshape(-1, grad.size(-1))
        if ctx.needs_input_grad[0]:
            grad_x = _inner_product(grad.contiguous(), ctx.packed_t, None)
        if ctx.needs_input_grad[1]:
            grad_w = rows.t() @ x.reshape(-1, x.size(-1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b, None, None


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU products use oneDNN on packed copies of the weight."""

    _packed: tuple | None = None  # (weight version, data pointer, packed W, packed W^T or None)

    def _packed_weights(self, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W packed for ``_inner_product`` and, with ``transposed``, W^T (for grad_y W)."""
        w = self.weight
        if self.training:
            # Packed afresh for every forward: the weights change every step, and a fused
            # optimizer (AdamW(fused=True), encdec's) updates them without bumping _version.
            return _pack(w, transposed)
        # (inference tensors have no version counter; they change in place only under
        # inference_mode, where encdec never loads weights)
        key = (-1 if w.is_inference() else w._version, w.data_ptr())
        if (self._packed is None or self._packed[:2] != key
                or (transposed and self._packed[3] is None)):
            self._packed = (*key, *_pack(w, transposed))
        return self._packed[2], self._packed[3]

    def __getstate__(self):
        # copies (deepcopy, pickle) pack again on first use: oneDNN's packed tensors are opaque
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state.pop("_packed", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or x.numel() * self.out_features < MIN_MACS):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            packed, packed_t = self._packed_weights(transposed=True)
            return _PackedLinearFunction.apply(x, self.weight, self.bias, packed, packed_t)
        bias = self.bias.detach() if self.bias is not None else None
        return _inner_product(x, self._packed_weights(transposed=False)[0], bias)


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


def forget_packed_weights(model: nn.Module) -> None:
    """Drop the packed copies kept for eval mode, for weights changed in place without a
    ``_version`` bump (fused optimizers): the trainer calls it before every validation."""
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__dict__.pop("_packed", None)


def unpack_linear_weights(model: nn.Module) -> int:
    """Undo ``pack_linear_weights``: plain ``nn.Linear`` again, packed copies dropped."""
    n = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("_packed", None)
            n += 1
    return n
