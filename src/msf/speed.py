"""Speed levers for the DiT on the CPU: none changes a result beyond bf16 rounding.

``models.py`` is the network; this module is how it runs fast where PyTorch's defaults
leave time on the table (measured in ``benchmarks/backbone.py`` and ``sampling_cost.py``,
tested in ``tests/test_speed_levers.py``):

* ``Linear``: for bf16 inference on the CPU, the bias is added inside oneDNN's product;
* ``norm_input``: under CPU bf16 autocast, LayerNorm normalises a bf16 copy of the fp32
  residual stream;
* ``attention``: SDPA, except bf16 training on the CPU, where two matmuls and a softmax
  have the faster backward;
* ``inference_copy`` / ``compile_for_inference``: bf16 weight copies for sampling, compiled
  with inductor's weight freezing;
* ``tf32``: on a GPU, fp32 sampling's matrix products in TF32 (as DiT samples its FID sets).

(The contiguous residual stream after the patch embedding is one ``.contiguous()`` in
``DiT.forward``.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm_input(x: Tensor) -> Tensor:
    """The residual stream as its LayerNorm's input: bf16 under bf16 autocast on the CPU.

    The stream itself stays fp32 (it sums every block's output). CPU autocast runs
    LayerNorm in its input's dtype, so normalising the fp32 stream costs three fp32
    passes (norm, modulation, the Linear's cast) where one cast and two bf16 passes do;
    the result enters a bf16 product either way (8% of an XL forward, 3% of training).
    CUDA autocast runs LayerNorm in fp32 whatever its input, so there it is left alone.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return x.to(torch.get_autocast_dtype("cpu"))
    return x


def _onednn_bf16() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
                and bool(mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_BF16 = _onednn_bf16()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) that, for bf16 inference on the CPU,
    adds its bias inside oneDNN's matrix product.

    aten's ``addmm`` first copies the broadcast bias into its output, then accumulates
    the product onto it: 15% of a bf16 Linear at DiT-XL sizes on this CPU
    (``benchmarks/backbone.py``). oneDNN's own linear, the kernel inductor uses, adds
    the bias in the product's epilogue. It has no backward, so training, fp32 (where it
    is slower), other devices and ``torch.compile`` (which fuses on its own) take
    ``F.linear``; so does a forward-mode JVP (``torch.func.jvp``, MeanFlow's target), whose tangent
    oneDNN's op would silently drop: it has no forward-mode rule.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (_ONEDNN_BF16 and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and self.weight.dtype == torch.bfloat16
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention over (B, heads, N, head_dim).

    ``scaled_dot_product_attention`` everywhere except bf16 training on the CPU: there
    its flash kernel's backward is 2-4x slower than two batched matmuls and a softmax
    (benchmarks/backbone.py), while its forward, and fp32, are as fast or faster.
    """
    if (q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_grad_enabled()
            and q.requires_grad):
        # scale q, not the N x N scores: a pass over N / head_dim times fewer elements
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def inference_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """An eval-mode copy of ``model`` with its weights in ``dtype`` and no gradients.

    For sampling on the CPU, bf16 weights beat bf16 autocast over fp32 weights by
    1.04-1.16x per evaluation (``benchmarks/sampling_cost.py``): autocast casts every
    weight once per autocast region, keeps an fp32 residual stream, and its Linears
    cannot take ``Linear``'s fused-bias path. The residual stream is then bf16 too.
    """
    return copy.deepcopy(model).to(dtype).eval().requires_grad_(False)


def compile_for_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """:func:`inference_copy` compiled with ``torch.compile`` and inductor's weight freezing.

    Freezing turns the weights into constants (prepacked for oneDNN on the CPU, bias
    fused) and the elementwise ops are fused. Call it under ``torch.no_grad()``. The
    first call for each input shape compiles (seconds for a few blocks, minutes for
    paper sizes); the copy does not follow later changes to ``model``'s weights.
    """
    return torch.compile(inference_copy(model, dtype), options={"freezing": True})


@contextmanager
def tf32(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """fp32 matrix products and convolutions in TF32 on a CUDA ``device``; elsewhere nothing.

    PyTorch leaves TF32 off for matrix products: an fp32 sample set then runs several
    times slower on an A100/H100. DiT's ``sample_ddp.py`` turns it on for its FID sets.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
