"""A step that never waits for the device: the CTC loss from host lengths (w2v_dist/ctc.py) and SpecAugment
applied without boolean indexing (w2v_dist/spec_augment.py) equal transformers', and a training forward, loss
and backward read nothing from the device (w2v_dist/host_syncs.py counts it; transformers' own path reads
several times). The whole train step's single read is counted in tests/e2e/equivalence_worker.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCTC, PreTrainedModel

from w2v_dist.ctc import ctc_loss_sum, logit_lengths
from w2v_dist.data.collate import CTCBatch, CTCCollator
from w2v_dist.host_syncs import HostSyncCounter
from w2v_dist.model import TINY
from w2v_dist.spec_augment import use_sync_free_masking


def tiny_model(**changes: object) -> PreTrainedModel:
    torch.manual_seed(0)
    config = AutoConfig.for_model("wav2vec2", vocab_size=12, pad_token_id=0, ctc_loss_reduction="sum",
                                  ctc_zero_infinity=True, **{**TINY, **changes})
    return AutoModelForCTC.from_config(config).eval()


def batch(masked: bool, lengths: tuple[int, ...] = (8000, 5000, 6400)) -> CTCBatch:
    rng = np.random.default_rng(0)
    values = np.zeros((len(lengths), max(lengths)), dtype=np.float32)
    for row, n in enumerate(lengths):
        values[row, :n] = rng.standard_normal(n)
    labels = [list(rng.integers(1, 12, size=size)) for size in (7, 3, 5)[:len(lengths)]]
    return CTCCollator(return_attention_mask=masked).assemble(values, list(lengths), labels,
                                                              [f"u{i}" for i in lengths],
                                                              [""] * len(lengths))


@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_gradients_equal_hugging_faces(masked: bool) -> None:
    model, data = tiny_model(), batch(masked)
    inputs = data.model_inputs("cpu", with_labels=False)
    theirs = model(**inputs, labels=data.labels).loss
    theirs.backward()
    their_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    ours = ctc_loss_sum(model(**inputs).logits, data, model.config)
    ours.backward()
    assert ours.item() == theirs.item()  # the same kernel on the same numbers
    for got, want in zip([p.grad for p in model.parameters() if p.grad is not None], their_grads,
                         strict=True):
        assert torch.equal(got, want)


def test_logit_lengths_follow_the_mask_and_the_adapter() -> None:
    data = batch(masked=True)
    model = tiny_model()
    frames = model._get_feat_extract_output_lengths(data.input_lengths).tolist()  # Hugging Face's count
    assert logit_lengths(data, model.config, 99) == tuple(frames)
    assert logit_lengths(batch(masked=False), model.config, 24) == (24, 24, 24)  # base: the padded row
    adapted = tiny_model(add_adapter=True, num_adapter_layers=2, adapter_stride=2, output_hidden_size=64)
    want = adapted._get_feat_extract_output_lengths(data.input_lengths).tolist()
    assert logit_lengths(data, adapted.config, 99) == tuple(want) != tuple(frames)


def test_the_batch_carries_host_lengths_and_targets() -> None:
    data = batch(masked=False)
    assert data.target_lengths == (7, 3, 5) and data.targets == 15
    assert data.sample_lengths == (8000, 5000, 6400)
    assert data.flat_targets.tolist() == [t for row in data.labels.tolist() for t in row if t >= 0]


def masked_pair(masked: bool, **masks: object) -> tuple[PreTrainedModel, PreTrainedModel, CTCBatch,
                                                          dict[str, torch.Tensor]]:
    """transformers' model in training mode with SpecAugment ``masks``, its copy masking without a host sync,
    a batch (with an attention mask when ``masked``) and its model inputs."""
    reference = tiny_model(layerdrop=0.0, **masks).train()
    model = copy.deepcopy(reference)
    assert use_sync_free_masking(model)
    data = batch(masked)
    return reference, model, data, data.model_inputs("cpu", with_labels=False)


@pytest.mark.parametrize("masked", [False, True])
def test_forward_loss_and_backward_read_nothing_from_the_device(masked: bool) -> None:
    """As training loads the model: transformers' LayerDrop off (w2v_dist.layerdrop draws on the host),
    SpecAugment on. With an attention mask (large-style models) transformers itself reads twice: whether SDPA
    may skip the mask, and the mask's row sums that SpecAugment's draw takes."""
    reference, model, data, inputs = masked_pair(masked, mask_time_prob=0.3, mask_time_length=2,
                                                 mask_feature_prob=0.2, mask_feature_length=4)
    with HostSyncCounter() as ours:
        ctc_loss_sum(model(**inputs).logits, data, model.config).backward()
    assert (ours.by_op == ({"aten._local_scalar_dense.default": 1, "Tensor.tolist": 1} if masked
                           else {})), ours.by_op
    with HostSyncCounter() as theirs:  # the counter sees what we removed
        reference(**inputs, labels=data.labels).loss.backward()
    assert (theirs.by_op["aten.masked_select.default"] == 1
            and theirs.by_op["aten._local_scalar_dense.default"] >= 1)
    assert theirs.by_op["aten.index.Tensor"] >= 1 or theirs.by_op["aten.nonzero.default"] >= 1, theirs.by_op


@pytest.mark.parametrize("masked", [False, True])
def test_spec_augment_draws_the_same_masks_and_trains_the_same(masked: bool) -> None:
    reference, model, data, inputs = masked_pair(masked, mask_time_prob=0.4, mask_time_length=3,
                                                 mask_feature_prob=0.3, mask_feature_length=8)
    results = []
    for candidate in (reference, model):
        np.random.seed(3)  # the masks' draws (numpy, as in transformers)
        torch.manual_seed(3)  # dropout
        loss = ctc_loss_sum(candidate(**inputs).logits, data, candidate.config)
        loss.backward()
        results.append((loss.detach(),
                        {n: p.grad for n, p in candidate.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    assert want_grads["wav2vec2.masked_spec_embed"].abs().sum() > 0  # masks were drawn and applied
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.eval()  # and evaluation masks nothing
    np.random.seed(3)
    assert torch.equal(model(**inputs).logits, reference.eval()(**inputs).logits)


def test_families_without_transformers_masking_are_left_alone() -> None:
    assert not use_sync_free_masking(torch.nn.Linear(2, 2))


def test_the_counter_counts_reads_and_data_dependent_shapes_and_can_pause() -> None:
    values = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        values.sum().item()
        values.tolist()
        values[values > 2]
        values.nonzero()
        bool(values.any())
        with syncs.paused():
            values.max().item()
        values[1:3] * 2  # slicing and arithmetic: no read
    assert syncs.by_op == {"aten._local_scalar_dense.default": 2, "Tensor.tolist": 1, "aten.index.Tensor": 1,
                           "aten.nonzero.default": 1}, syncs.by_op
    assert torch.Tensor.tolist is not None and values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_an_update_reads_its_gradient_norm_only_when_it_is_logged() -> None:
    from w2v_dist.engine import UpdateOutcome

    with HostSyncCounter() as syncs:
        outcome = UpdateOutcome(True, torch.tensor(2.5), engine_skipped=False)
        skipped = UpdateOutcome(False, None, engine_skipped=False)
    assert syncs.total == 0
    with HostSyncCounter() as syncs:
        assert outcome.grad_norm == 2.5 and skipped.grad_norm is None
    assert syncs.total == 1
