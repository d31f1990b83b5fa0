"""model.pos_conv (w2v_dist/pos_conv.py): every kernel equals the weight-normed grouped Conv1d it replaces,
forward and every gradient, on odd and even kernels and lengths; a model keeps its parameter names and trains
with the same losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCTC, PreTrainedModel

from w2v_dist.config import _CHOICES, ModelConfig
from w2v_dist.model import TINY
from w2v_dist.pos_conv import KERNELS, VARIANTS, conv_fft, fft_length, positional_conv, use_pos_conv

TOLERANCE = 1e-5
"""Of the largest value, in fp32: the FFT's rounding is of the order of 1e-7 per term of a 128 x 48 sum."""


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize(("kernel", "frames"), [(16, 37), (16, 40), (15, 37), (128, 200)])
def test_kernel_equals_grouped_conv1d_forward_and_gradients(name: str, kernel: int, frames: int) -> None:
    generator = torch.Generator().manual_seed(kernel * frames)
    channels, groups = 32, 4
    x = torch.randn(3, channels, frames, generator=generator)
    weight = torch.randn(channels, channels // groups, kernel, generator=generator) / kernel
    bias = torch.randn(channels, generator=generator)
    upstream = torch.randn(3, channels, frames + 2 * (kernel // 2) - kernel + 1, generator=generator)
    results = []
    for fn in (lambda *a: F.conv1d(*a[:3], padding=a[3], groups=a[4]), KERNELS[name]):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(*inputs, kernel // 2, groups)
        out.backward(upstream)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        assert relative_error(got, want) < TOLERANCE


def test_fft_is_linear_not_circular() -> None:
    """A transform shorter than T + K - 1 wraps the end of the signal onto its start: an impulse at the last
    frame must not reach the first outputs."""
    assert all(fft_length(n) >= n for n in range(1, 3000))
    x = torch.zeros(1, 1, 50)
    x[..., -1] = 1.0
    out = conv_fft(x, torch.ones(1, 1, 16), None, 8, 1)
    assert out[..., :30].abs().max() < 1e-6 and out[..., -1].item() == pytest.approx(1.0, abs=1e-6)


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    geometry = dict(TINY, conv_dim=(64,) * 7, hidden_dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, mask_time_prob=0.0, layerdrop=0.0)
    return AutoModelForCTC.from_config(AutoConfig.for_model(family, vocab_size=12, pad_token_id=0,
                                                            **geometry))


def loss_and_grads(model: PreTrainedModel, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(2, 8000, generator=generator)
    labels = torch.randint(1, 12, (2, 6), generator=generator)
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout draws for both models
    loss = model(audio, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm"])
@pytest.mark.parametrize("variant", sorted(KERNELS))
def test_a_model_keeps_its_names_and_computes_the_same_loss_and_gradients(family: str, variant: str) -> None:
    reference = tiny_model(family)
    model = copy.deepcopy(reference)
    use_pos_conv(model, variant)
    assert positional_conv(model).pos_conv_variant == variant  # type: ignore[comparison-overlap]
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.train(), reference.train()
    want_loss, want_grads = loss_and_grads(reference)
    got_loss, got_grads = loss_and_grads(model)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=TOLERANCE)
    assert got_grads.keys() == want_grads.keys()
    conv_grads = [n for n in want_grads if ".pos_conv_embed." in n]
    assert len(conv_grads) == 3  # bias and both halves of the weight norm
    scale = max(float(g.abs().max()) for g in want_grads.values())
    for name in want_grads:  # an absolute floor: k_proj's bias has a gradient of 0 in exact arithmetic
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("variant", sorted(KERNELS))
def test_training_with_a_kernel_follows_the_same_losses(variant: str) -> None:
    """Ten AdamW updates: the losses stay within 1e-3 (relative) of Hugging Face's module (issue 27's
    bound)."""
    runs = []
    for chosen in ("hf", variant):
        model = tiny_model("wav2vec2")
        use_pos_conv(model, chosen)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for update in range(10):
            loss, _ = loss_and_grads(model, seed=update)
            losses.append(loss.item())
            optimizer.step()
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=1e-3)
    assert runs[0][-1] < runs[0][0]  # it trained


def test_fp32_kernel_computes_in_fp32_inside_a_bf16_model() -> None:
    x = torch.randn(2, 16, 30).bfloat16()
    weight, bias = (torch.randn(16, 4, 8) / 8).bfloat16(), torch.randn(16).bfloat16()
    out = KERNELS["fp32"](x, weight, bias, 4, 4)
    exact = F.conv1d(x.float(), weight.float(), bias.float(), padding=4, groups=4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.bfloat16())  # rounded once, at the end


def test_unknown_layouts_are_refused_and_hf_changes_nothing() -> None:
    assert VARIANTS == _CHOICES["model.pos_conv"] and VARIANTS[0] == ModelConfig.pos_conv
    model = tiny_model("wav2vec2")
    use_pos_conv(model, "hf")
    assert not hasattr(positional_conv(model), "pos_conv_variant")
    positional_conv(model).stride = (2,)
    with pytest.raises(ValueError, match="set model.pos_conv=hf"):
        use_pos_conv(model, "fft")
