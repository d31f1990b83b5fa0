"""model.compile on bounded shapes (data.shape_quantum_frames): a run's batches compile at most once per grid
length, and the compiled layers compute the eager layers' loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from w2v_dist.config import ModelConfig
from w2v_dist.ctc import ctc_loss_sum
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import CTCBatch, CTCCollator
from w2v_dist.data.epoch import sorted_batches
from w2v_dist.data.index import Utterance
from w2v_dist.data.plan import BatchPolicy
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.model import load_model, load_processor

pytestmark = pytest.mark.slow


def grid_batches(grid: ShapeGrid, count: int) -> list[CTCBatch]:
    """``count`` batches of utterances 0.3-2.5 s packed on ``grid``, as the loader pads them."""
    rng = np.random.default_rng(0)
    utts = [Utterance(0, i, f"u{i}", int(rng.uniform(0.3, 2.5) * 16_000), 4) for i in range(200)]
    collator, batches = CTCCollator(return_attention_mask=False), []
    policy = BatchPolicy(grid.max_batch_samples, grid.max_batch_size, 1, 1, grid=grid)
    planned = sorted_batches(utts, policy)  # longest first: take batches from the whole range of lengths
    for plan in planned[::max(1, len(planned) // count)][:count]:
        rows, length = grid.shape(plan)
        values = np.zeros((rows, length), dtype=np.float32)
        for row, utt in enumerate(plan):
            values[row, :utt.num_samples] = rng.standard_normal(utt.num_samples)
        batches.append(collator.assemble(values, [u.num_samples for u in plan], [[5, 6, 7, 8]] * len(plan),
                                         [u.key for u in plan], [""] * len(plan)))
    return batches


def test_compiled_layers_compile_at_most_once_per_grid_length_and_match_eager(tiny_model: Path) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    # No masks, LayerDrop or dropout: compiled and eager must see the same computation to be compared; the
    # recipe (masks, LayerDrop, compile, bounded shapes) trains on 2 ranks in tests/e2e/test_recipe.py.
    cfg = ModelConfig(name_or_path=str(tiny_model), mask_time_prob=0.0, layerdrop=0.0,
                      activation_dropout=0.0)
    processor = load_processor(cfg, None)
    eager = load_model(cfg, processor).eval()
    compiled = load_model(ModelConfig(**{**cfg.__dict__, "compile": True}), processor).eval()
    grid = ShapeGrid.for_encoder(16, EncoderGeometry(), 4 * 16_000, 8)
    batches = grid_batches(grid, 12)
    lengths = {b.input_values.shape[1] for b in batches}
    assert len(lengths) >= 3 and len({tuple(b.input_values.shape) for b in batches}) == len(lengths)
    before = counters["stats"]["unique_graphs"]
    for batch in batches:
        inputs = batch.model_inputs("cpu", with_labels=False)
        with torch.no_grad():
            want = ctc_loss_sum(eager(**inputs).logits, batch, eager.config)
            got = ctc_loss_sum(compiled(**inputs).logits, batch, compiled.config)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"] - before
    layers = compiled.config.num_hidden_layers
    print(f"{graphs} graphs for {len(lengths)} grid lengths and {layers} compiled layers")
    assert 1 <= graphs <= len(lengths) * layers  # each layer compiles at most once per grid length
