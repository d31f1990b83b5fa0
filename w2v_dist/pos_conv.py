"""The positional convolution's kernel (``model.pos_conv``): the same weight-normed grouped ``Conv1d``,
computed another way.

wav2vec 2.0's positional embedding is a grouped convolution (768 channels, 16 groups, kernel 128 in the base
model) that takes about 30 % of a bf16 training step on a GPU, where it runs on cuDNN's legacy grouped
kernels (``shared/anchors/gpu-step-research.md``). The variants compute the same function:

- ``hf``: Hugging Face's module unchanged.
- ``fp32``: the convolution in fp32 inside a bf16 model, as NVIDIA's wav2vec 2.0 recipe runs it (TF32
  engines).
- ``channels_last``: the convolution as a ``conv2d`` on a ``(B, C, 1, T)`` view of the ``(B, T, C)`` hidden
  states, whose strides are already channels-last: cuDNN's NHWC engines, and no transposed copy.
- ``fft``: an FFT convolution in fp32: per frequency, one small complex matrix product per group.

Only the kernel changes: the module, its weight norm and its parameter names stay Hugging Face's (checkpoints
and exports load with ``from_pretrained`` unchanged, and ZeRO-3 gathers the same parameters), and every
variant is checked against the module it replaces, forward and every gradient
(``tests/unit/test_pos_conv.py``).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ConvKernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", int, int], torch.Tensor]
"""``(x (B, C, T), weight (C_out, C_in / groups, K), bias, padding, groups) ->
(B, C_out, T + 2 padding - K + 1)``: exactly ``F.conv1d``'s contract."""


def conv_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int
              ) -> torch.Tensor:
    y = F.conv1d(x.float(), weight.float(), None if bias is None else bias.float(), padding=padding,
                 groups=groups)
    return y.to(x.dtype)


def conv_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
                       groups: int
                       ) -> torch.Tensor:
    weight_2d = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    return F.conv2d(x.unsqueeze(2), weight_2d, bias, padding=(0, padding), groups=groups).squeeze(2)


def fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= ``n``: the lengths FFT libraries transform fastest."""
    best = 1 << (n - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            length = power35
            while length < n:
                length *= 2
            best = min(best, length)
            power35 *= 3
        power5 *= 5
    return best


def conv_fft(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int
             ) -> torch.Tensor:
    """``y[b, o, t] = bias[o] + sum_{i, k} weight[o, i, k] x[b, g(o) i, t + k - padding]``, through the
    product of spectra: a linear (not circular) convolution, because the transform is at least ``T + K - 1``
    long."""
    batch, channels, frames = x.shape
    out_channels, group_channels, kernel = weight.shape
    length = fft_length(frames + kernel - 1)
    out_frames = frames + 2 * padding - kernel + 1
    spectrum = torch.fft.rfft(x.float(), n=length)  # (B, C, F)
    spectrum = spectrum.view(batch, groups, group_channels, -1).permute(3, 1, 0, 2)  # (F, G, B, C_in/G)
    # correlation = convolution with the flipped kernel
    filters = torch.fft.rfft(weight.float().flip(-1), n=length)
    # (F, G, in, out)
    filters = filters.view(groups, out_channels // groups, group_channels, -1).permute(3, 0, 2, 1)
    product = torch.matmul(spectrum, filters).permute(2, 1, 3, 0).reshape(batch, out_channels, -1)
    start = kernel - 1 - padding
    y = torch.fft.irfft(product, n=length)[..., start:start + out_frames]
    if bias is not None:
        y = y + bias.float()[:, None]
    return y.to(x.dtype)


KERNELS: dict[str, ConvKernel] = {"fp32": conv_fp32, "channels_last": conv_channels_last, "fft": conv_fft}
VARIANTS = ("hf", *KERNELS)


def positional_conv(model: nn.Module) -> nn.Conv1d:
    """The encoder's positional convolution (``<base>.encoder.pos_conv_embed.conv`` in every family we
    train)."""
    base = getattr(model, str(model.base_model_prefix))
    conv = getattr(getattr(base.encoder, "pos_conv_embed", None), "conv", None)
    if not isinstance(conv, nn.Conv1d):
        raise ValueError(f"{type(model).__name__} has no positional Conv1d at encoder.pos_conv_embed.conv: "
                         "set model.pos_conv=hf")
    return conv


def use_pos_conv(model: nn.Module, variant: str) -> None:
    """Compute ``model``'s positional convolution with ``variant``'s kernel. The convolution module is kept,
    with its weight norm: its forward still computes the normed weight and calls
    ``_conv_forward(x, weight, bias)``, and only that call is replaced, on this one module."""
    if variant == "hf":
        return
    conv = positional_conv(model)
    kernel = KERNELS[variant]
    padding, groups = conv.padding[0], conv.groups
    if (conv.padding_mode != "zeros" or conv.stride != (1,) or conv.dilation != (1,)
            or not isinstance(padding, int)):
        raise ValueError(f"model.pos_conv={variant} computes a zero-padded, unstrided convolution; this "
                         f"model's is {conv}: set model.pos_conv=hf")

    def conv_forward(self: nn.Conv1d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor:
        return kernel(x, weight, bias, padding, groups)

    conv._conv_forward = types.MethodType(conv_forward, conv)  # type: ignore[method-assign]
    conv.pos_conv_variant = variant  # type: ignore[assignment]
