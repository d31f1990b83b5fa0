"""LayerDrop every rank agrees on: the skipped layers are a function of (seed, update) only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from w2v_dist.config import load_config
from w2v_dist.data.collate import CTCBatch
from w2v_dist.layerdrop import SharedLayerDrop
from w2v_dist.model import init_model, load_model, load_processor
from w2v_dist.trainer import seed_randomness


def layers_run(model: torch.nn.Module, inputs: torch.Tensor) -> list[int]:
    ran: list[int] = []
    encoder = getattr(model, model.base_model_prefix).encoder
    handles = [layer.register_forward_hook(lambda *_, i=i: ran.append(i))
               for i, layer in enumerate(encoder.layers)]
    model(input_values=inputs)
    for handle in handles:
        handle.remove()
    return ran


def batch(update: int, stream: int) -> CTCBatch:
    return CTCBatch(input_values=torch.zeros(1, 8000), input_lengths=torch.tensor([8000]),
                    labels=torch.ones(1, 2, dtype=torch.long), keys=("k",), texts=("a",), seconds=0.5,
                    normalize=True, update=update, stream=stream)


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_the_skipped_layers_depend_on_seed_and_update_only(tmp_path: Path, family: str) -> None:
    init_model(tmp_path, "tiny", family=family)
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", "model.layerdrop=0.5"])
    model = load_model(cfg.model, load_processor(cfg.model, None))
    assert model.config.layerdrop == 0.0, "transformers' own LayerDrop would draw per rank"
    assert isinstance(model.layer_drop, SharedLayerDrop)
    model.train()
    inputs = torch.randn(1, 8000)
    seen = []
    for update in range(12):
        expected = None
        for stream in range(3):  # every stream of an update (any rank, any world size) skips the same layers
            torch.manual_seed(stream * 1000 + update)  # whatever the global RNG holds
            seed_randomness(1, batch(update, stream), model)
            ran = layers_run(model, inputs)
            assert expected is None or ran == expected
            expected = ran
            assert ran == [i for i in range(2) if i not in model.layer_drop.skipped]
        seen.append(tuple(expected or ()))
    assert len(set(seen)) > 1, "LayerDrop never changed over 12 updates"
    if family == "wavlm":  # its first layer computes the position bias the others reuse
        assert all(0 in ran for ran in seen)
    else:
        assert any(0 not in ran for ran in seen)
    model.eval()
    assert layers_run(model, inputs) == [0, 1], "evaluation runs every layer"


def test_draws_follow_the_probability_and_nothing_is_skipped_before_the_first(tmp_path: Path) -> None:
    layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    drop = SharedLayerDrop(layers, 0.1)
    assert drop.skipped == frozenset()
    assert drop.draw(3, 7) == SharedLayerDrop(torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4)),
                                              0.1).draw(3, 7)
    rate = sum(len(drop.draw(1, update)) for update in range(5000)) / (4 * 5000)
    assert rate == pytest.approx(0.1, abs=0.01)


def test_the_export_records_the_recipes_layerdrop(tmp_path: Path) -> None:
    from w2v_dist.export import write_export

    init_model(tmp_path / "init", "tiny")
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'init'}", "model.layerdrop=0.1"])
    processor = load_processor(cfg.model, None)
    model = load_model(cfg.model, processor)
    assert write_export(model, processor, tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").layerdrop == 0.1
    # Hugging Face's parameter names: load_model's weight check refuses missing or unexpected ones.
    reloaded = load_model(load_config(None, [f"model.name_or_path={tmp_path / 'out'}"]).model, processor)
    assert list(reloaded.state_dict()) == list(model.state_dict())
