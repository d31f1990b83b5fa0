"""The CTC loss of a batch, from lengths the host already knows.

Hugging Face's ``*ForCTC`` computes the same loss when given labels (``transformers/loss/loss_ctc.py``), but
it reads the device three times on every forward: ``labels.max()`` against the vocabulary, the target
lengths, and ``labels.masked_select`` (a data-dependent shape). On a GPU each read waits for every kernel
queued before it. Here the model runs without labels and the loss takes the batch's host-side lengths and
flattened targets, made by the loader worker (:class:`~w2v_dist.data.collate.CTCBatch`): no read at all. The
label range needs no check per step: labels come from the processor's tokenizer, whose size the model's
``vocab_size`` equals (:func:`~w2v_dist.model.check_model`, at start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import CTCBatch


def logit_lengths(batch: CTCBatch, config: PretrainedConfig, frames: int) -> tuple[int, ...]:
    """The frames of each row the loss aligns, as Hugging Face counts them: the real samples' frames with an
    attention mask, else the whole padded row's ``frames`` (base models are trained without a mask: their
    padding is zeros after normalisation). An empty row of a grid shape has none: it adds nothing to the
    loss."""
    if batch.attention_mask is None:
        return tuple(frames if samples else 0 for samples in batch.sample_lengths)
    geometry = EncoderGeometry.from_model_config(config)
    lengths = [geometry.frames(n) for n in batch.sample_lengths]
    if getattr(config, "add_adapter", False):  # each adapter layer: a kernel-1 convolution with its stride
        for _ in range(config.num_adapter_layers):
            lengths = [(n - 1) // config.adapter_stride + 1 for n in lengths]
    return tuple(lengths)


def ctc_loss_sum(logits: torch.Tensor, batch: CTCBatch, config: PretrainedConfig) -> torch.Tensor:
    """The batch's summed CTC loss (fp32 log-softmax; cuDNN's CTC off, as Hugging Face runs it): equal to
    ``*ForCTC(..., labels=batch.labels).loss`` with ``ctc_loss_reduction="sum"``."""
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    targets = batch.flat_targets.to(logits.device, non_blocking=True)
    frames = logit_lengths(batch, config, logits.shape[1])
    with torch.backends.cudnn.flags(enabled=False):
        # lengths as int tuples: documented, but typed as tensors
        return F.ctc_loss(log_probs, targets, frames, batch.target_lengths,  # type: ignore[arg-type]
                          blank=config.pad_token_id, reduction="sum", zero_infinity=config.ctc_zero_infinity)
