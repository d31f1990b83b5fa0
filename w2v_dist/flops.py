"""Analytic FLOPs of a ``Wav2Vec2ForCTC`` training step, for throughput in TFLOP/s and MFU (in training's
metrics and in the benchmarks).

Per utterance of ``n`` samples, with hidden size d, feed-forward size f, L layers, T frames, vocabulary V:

- conv feature encoder, layer i (kernel k_i, stride s_i): ``2 · c_in · c_out · k_i · T_i`` with
  ``T_i = (T_{i-1} - k_i) // s_i + 1`` and ``T_0 = n``. Frozen when fine-tuning: forward only.
- feature projection ``2 · c_last · d · T``; positional conv ``2 · d · (d / groups) · K · T``;
  CTC head ``2 · d · V · T``.
- each transformer layer ``2 · T · (4 d² + 2 d f) + 4 · T² · d`` (Q/K/V/O projections, feed-forward,
  QKᵀ and attention × V).
- training: the frozen conv encoder's forward, plus 3 × the forward of everything trainable (backward costs
  twice the forward). Norms, activations, dropout and the CTC loss are ignored (well under 1 %).

A multiply-add counts as 2 FLOPs, as in the published MFU figures (PaLM appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Wav2Vec2Config


@dataclass(frozen=True)
class StepFlops:
    conv_forward: float
    """Frozen conv feature encoder, forward only."""
    transformer: float
    """Transformer layers, forward + backward."""
    other: float
    """Feature projection, positional conv and CTC head, forward + backward."""

    @property
    def total(self) -> float:
        return self.conv_forward + self.transformer + self.other

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.conv_forward + other.conv_forward, self.transformer + other.transformer,
                         self.other + other.other)


def frames(config: Wav2Vec2Config, num_samples: int) -> list[int]:
    """Output length of every conv layer (the last is the transformer's sequence length)."""
    lengths, length = [], num_samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        lengths.append(length)
    return lengths


def forward_flops(config: Wav2Vec2Config, num_samples: int) -> tuple[float, float, float]:
    """(conv encoder, transformer layers, other) forward FLOPs for one utterance."""
    lengths = frames(config, num_samples)
    channels_in = [1, *config.conv_dim[:-1]]
    conv = sum(2.0 * c_in * c_out * k * t for c_in, c_out, k, t in
               zip(channels_in, config.conv_dim, config.conv_kernel, lengths))
    d, f, t = config.hidden_size, config.intermediate_size, lengths[-1]
    layer = 2.0 * t * (4 * d * d + 2 * d * f) + 4.0 * t * t * d
    groups, kernel, vocab = (int(config.num_conv_pos_embedding_groups), int(config.num_conv_pos_embeddings),
                             int(config.vocab_size or 0))
    other = 2.0 * t * (config.conv_dim[-1] * d + d * (d // groups) * kernel + d * vocab)
    return conv, layer * config.num_hidden_layers, other


def training_flops(config: Wav2Vec2Config, num_samples: int,
                   freeze_feature_encoder: bool = True) -> StepFlops:
    """FLOPs of one utterance through a training step (forward + backward)."""
    conv, transformer, other = forward_flops(config, num_samples)
    return StepFlops(conv if freeze_feature_encoder else 3 * conv, 3 * transformer, 3 * other)


def batch_flops(config: Wav2Vec2Config, lengths: list[int],
                freeze_feature_encoder: bool = True) -> StepFlops:
    return sum((training_flops(config, n, freeze_feature_encoder) for n in lengths),
               StepFlops(0.0, 0.0, 0.0))


COUNTED_FAMILIES = ("wav2vec2", "hubert", "wavlm", "unispeech", "unispeech-sat")
"""Encoders with wav2vec2's layer structure, which the formulas above describe (conformer, SEW and
data2vec-audio differ)."""


def step_flops(config: Any, lengths: list[int], freeze_feature_encoder: bool, layerdrop: float
               ) -> float | None:
    """Useful FLOPs of one training step over utterances of ``lengths`` samples (padding excluded),
    LayerDrop's skipped transformer layers left out (in expectation); ``None`` for a family the formulas do
    not describe."""
    if config.model_type not in COUNTED_FAMILIES:
        return None
    total = batch_flops(config, lengths, freeze_feature_encoder)
    return total.conv_forward + total.other + total.transformer * (1.0 - layerdrop)


DENSE_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0,
                     "A10G": 70.0, "L4": 121.0}
"""Datasheet dense (no sparsity) bf16 tensor-core peaks by device-name fragment, first match wins."""


def peak_tflops(device_name: str) -> float | None:
    return next((peak for fragment, peak in DENSE_BF16_TFLOPS.items() if fragment in device_name), None)
