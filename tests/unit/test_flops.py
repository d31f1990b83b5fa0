"""The analytic FLOPs model agrees with PyTorch's own FLOP counter on a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from w2v_dist.flops import batch_flops, forward_flops, frames, peak_tflops
from w2v_dist.model import TINY


def counted(model: Wav2Vec2ForCTC, inputs: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(input_values=inputs).logits
        if backward:
            out.float().pow(2).mean().backward()
    counts = counter.get_flop_counts()
    # The counter's grouped-convolution backward formula ignores groups (5x the forward for the positional
    # conv here); take the textbook 2x forward for that one op instead.
    pos_conv = counts["Wav2Vec2ForCTC.wav2vec2.encoder.pos_conv_embed.conv"]
    grouped_backward = pos_conv.get(torch.ops.aten.convolution_backward, 0)
    fixed = 2 * pos_conv[torch.ops.aten.convolution] if grouped_backward else 0
    return counter.get_total_flops() - grouped_backward + fixed


@pytest.mark.parametrize("num_samples", [16_000, 37_123])
def test_forward_flops_match_the_flop_counter(num_samples: int) -> None:
    config = Wav2Vec2Config(vocab_size=32, **TINY, attn_implementation="eager")
    model = Wav2Vec2ForCTC(config).eval()
    conv, transformer, other = forward_flops(config, num_samples)
    with torch.no_grad():
        measured = counted(model, torch.randn(2, num_samples), backward=False)
    assert measured == pytest.approx(2 * (conv + transformer + other), rel=0.02)


def test_training_flops_match_the_flop_counter_with_a_frozen_encoder() -> None:
    config = Wav2Vec2Config(vocab_size=32, **TINY, attn_implementation="eager", layerdrop=0.0)
    model = Wav2Vec2ForCTC(config).train()
    model.freeze_feature_encoder()
    measured = counted(model, torch.randn(3, 24_000), backward=True)
    assert measured == pytest.approx(batch_flops(config, [24_000] * 3).total, rel=0.03)


def test_frames_follow_the_conv_strides() -> None:
    config = Wav2Vec2Config()
    assert frames(config, 16_000)[-1] == 49  # wav2vec2's 20 ms frames, minus the receptive field
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("some CPU") is None


def test_gpu_bench_batches_respect_the_seconds_budget() -> None:
    from benchmarks.gpu import planned_batches

    batches = planned_batches(200.0, 5, 32)
    assert len(batches) == 5
    for batch in batches:
        rows, width = batch.input_values.shape
        assert rows * width <= 200 * 16_000 and int(batch.input_lengths.max()) == width
        real = (batch.labels >= 0).sum(dim=1)
        assert (real > 0).all() and (batch.labels[:, :1] >= 4).all()


def test_step_flops_leave_out_dropped_layers_and_uncounted_families() -> None:
    from transformers import AutoConfig

    from w2v_dist.flops import step_flops

    config = Wav2Vec2Config()
    full = batch_flops(config, [32_000, 48_000])
    assert step_flops(config, [32_000, 48_000], True, 0.0) == pytest.approx(full.total)
    assert (step_flops(config, [32_000, 48_000], True,
                       0.1) == pytest.approx(full.total - 0.1 * full.transformer))
    assert step_flops(AutoConfig.for_model("wav2vec2-conformer"), [32_000], True, 0.0) is None
