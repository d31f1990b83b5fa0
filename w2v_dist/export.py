"""The Hugging Face export: models for inference from an export *or* a DeepSpeed checkpoint, the one export
writer, the collective export of a training run, and checkpoint → HF conversion.

A checkpoint can be named by the run's ``output_dir``, its ``checkpoints/`` directory, or one tag
directory (``checkpoints/step_00001000``). ZeRO 1-3 checkpoints hold the fp32 master weights in per-rank
``*_optim_states.pt`` partitions, which DeepSpeed's ``zero_to_fp32`` gathers; a ZeRO-0 checkpoint has no
such partitions, and its full weights are the ``module`` entry of ``mp_rank_00_model_states.pt``. The
architecture and processor come from the run's ``config.yaml`` (``model.name_or_path``), exactly as the
run built them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCTC, PreTrainedModel, Wav2Vec2Processor

from w2v_dist import dist
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.checkpoint.tags import LATEST, TAG_PREFIX, lost_latest, resumable_tag
from w2v_dist.config import Config, load_config, to_yaml
from w2v_dist.faults import pause_point
from w2v_dist.inputs import train_vocabulary
from w2v_dist.model_card import model_card

if TYPE_CHECKING:
    from w2v_dist.engine import Engine

log = logging.getLogger("w2v_dist.export")
ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"


class ExportWriteError(OSError):
    """An export that could not be written (full disk, quota, I/O error); nothing was left under its name."""


class ModelSourceError(ValueError):
    """A ``--model``/``--checkpoint`` path that is neither a Hugging Face export nor a DeepSpeed
    checkpoint."""


@dataclass(frozen=True)
class CheckpointRef:
    root: Path
    """The directory holding ``latest`` and the tag directories."""
    tag: str
    config: Path | None
    """The run's ``config.yaml``; ``None`` falls back to the copy stored inside the checkpoint."""

    @property
    def directory(self) -> Path:
        return self.root / self.tag


def is_hf_export(path: str | Path) -> bool:
    """A ``save_pretrained`` directory (what ``<output_dir>/final`` and ``w2v-dist export`` write)."""
    return (Path(path) / "config.json").is_file()


def is_hub_id(source: str | Path) -> bool:
    """``org/name`` naming no local path: a Hugging Face Hub model, loaded from the HF cache (``HF_HOME``)
    or, unless ``HF_HUB_OFFLINE=1``, the hub; so a published model can be a baseline for
    ``evaluate``/``transcribe``."""
    return not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) is not None


def find_checkpoint(path: str | Path, tag: str | None = None,
                    config: str | Path | None = None) -> CheckpointRef:
    """Resolve a run dir, a ``checkpoints/`` dir or a tag dir to (root, tag, config.yaml). Without a tag:
    the one resume would take (:func:`~w2v_dist.checkpoint.tags.resumable_tag`, checksums verified), never
    a torn or damaged ``latest``."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    elif any(path.glob("*model_states.pt")):
        root, tag = path.parent, tag or path.name
    elif (path / LATEST).is_file() or any(path.glob(f"{TAG_PREFIX}*")):
        root = path
    else:
        raise ModelSourceError(f"{path} is neither a Hugging Face export (no config.json) nor a DeepSpeed "
                               f"checkpoint (a run's output_dir, its checkpoints/ dir, or a step_XXXXXXXX "
                               f"dir)")
    if tag is None:
        tag = resumable_tag(root, verify=True)
        if tag is None:
            lost = lost_latest(root, verify=True)
            raise ModelSourceError(f"{lost}; name an older tag with --tag if one is left" if lost else
                                   f"{root} holds no complete checkpoint")
    if not (root / tag).is_dir():
        raise ModelSourceError(f"checkpoint tag {tag!r} not found under {root}")
    run_config = Path(config) if config else root.parent / "config.yaml"
    if config and not run_config.is_file():
        raise ModelSourceError(f"config file not found: {config}")
    return CheckpointRef(root, tag, run_config if run_config.is_file() else None)


def _load_states(path: Path) -> dict:
    from w2v_dist.checkpoint.files import safe_load  # imports DeepSpeed: only on the checkpoint path

    return safe_load(path, map_location="cpu")


def checkpoint_config(ref: CheckpointRef) -> Config:
    """The run config: ``config.yaml`` when present, else the YAML the trainer stores in every checkpoint."""
    if ref.config is not None:
        return load_config(ref.config)
    states = sorted(ref.directory.glob("*model_states.pt"))
    if not states:
        raise ModelSourceError(f"{ref.directory} has no model states file")
    embedded = SavedRun.read(ref.directory).with_client_state(_load_states(states[0])).config
    if not embedded:
        raise ModelSourceError(f"no config.yaml next to {ref.root} and none stored in the checkpoint; use "
                               f"--config")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(embedded)
        handle.flush()
        return load_config(handle.name)


def checkpoint_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, ZeRO partitions gathered."""
    directory = ref.directory
    if any(directory.glob("*_optim_states.pt")):
        from w2v_dist.checkpoint.files import zero_checkpoint_weights

        return zero_checkpoint_weights(ref.root, ref.tag)  # its progress print()s: callers redirect stdout
    states = directory / ZERO0_MODEL_STATES
    if not states.is_file():
        raise ModelSourceError(f"{directory} has neither ZeRO optimizer partitions nor {ZERO0_MODEL_STATES}")
    module = _load_states(states)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def model_from_checkpoint(ref: CheckpointRef) -> tuple[PreTrainedModel, Wav2Vec2Processor]:
    """The run's architecture and processor (built as the trainer built them) with the checkpoint's
    weights."""
    from w2v_dist.model import load_model, load_processor

    cfg = checkpoint_config(ref)
    processor = load_processor(cfg.model, train_vocabulary(cfg.data))
    model = load_model(cfg.model, processor).float()  # fp32 inference whatever dtype name_or_path records
    state = checkpoint_state_dict(ref)
    if cfg.deepspeed.precision != "fp32":
        # A 16-bit run's checkpoint holds frozen weights only as 16-bit copies (the optimiser has no fp32
        # master for them). They never changed, so the fp32 values just loaded from model.name_or_path are
        # the exact ones; the run's own export writes the same (Engine.full_state_dict).
        state |= {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    model.load_state_dict(state, strict=True)
    return model.eval(), processor


def load_for_inference(source: str | Path, config: str | Path | None = None, tag: str | None = None
                       ) -> tuple[PreTrainedModel, Wav2Vec2Processor]:
    """Model (eval mode, fp32, CPU) and processor from an HF export dir or any form of DeepSpeed
    checkpoint."""
    # DeepSpeed logs to stdout, from a handler bound at its import; callers keep stdout for results.
    with contextlib.redirect_stdout(sys.stderr):
        if is_hf_export(source) or is_hub_id(source):
            try:
                # fp32 whatever config.json's dtype says: a bf16 run's export records "bfloat16" there, and
                # transformers 5 would load its fp32 weights rounded to bf16.
                model = AutoModelForCTC.from_pretrained(source, dtype=torch.float32)
                return model.eval(), Wav2Vec2Processor.from_pretrained(source)
            except OSError as err:
                if not is_hub_id(source):
                    raise
                raise ModelSourceError(
                    f"{source} is no local path, and as a Hugging Face Hub id it is neither in the HF cache "
                    f"nor reachable ({str(err).splitlines()[0]}); on a node without network, download it "
                    f"where there is one (`hf download {source}`, into the same HF_HOME) and set "
                    f"HF_HUB_OFFLINE=1") from None
        return model_from_checkpoint(find_checkpoint(source, tag, config))


def write_export(model: PreTrainedModel, processor: Wav2Vec2Processor, out_dir: Path,
                 state: dict[str, torch.Tensor] | None = None, card: str = "") -> bool:
    """The one Hugging Face export writer (training's final/ and best/, ``w2v-dist export``):
    ``save_pretrained`` safetensors in fp32 (``state`` when given, else the model's own weights), the
    processor and the model card (README.md, :mod:`w2v_dist.model_card`), written beside ``out_dir`` and
    renamed into place, so a crash never leaves a half-written export under the real name. Refuses NaN or
    Inf weights, and finite weights whose logits on a probe batch are not (:func:`nonfinite_logits`):
    returns False, leaves nothing written."""
    weights = {k: v.float() if v.is_floating_point() else v
               for k, v in (state or model.state_dict()).items()}
    bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        log.error("not exporting %s: the weights contain NaN or Inf (%s...)", out_dir, bad[:3])
        return False
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        config = copy.deepcopy(model.config)
        # save_pretrained records a 16-bit module's dtype; the weights written are fp32
        config.dtype = "float32"
        if (layer_drop := getattr(model, "layer_drop", None)) is not None:
            # the model's own is 0: w2v_dist.layerdrop draws it instead
            config.layerdrop = layer_drop.probability
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if card:
            (tmp / "README.md").write_text(card)
    except (OSError, SafetensorError) as err:
        # safetensors reports a full disk as a SafetensorError, naming no path
        from w2v_dist.checkpoint.commit import write_failure  # imports DeepSpeed: only now

        # its space back; a previous export under out_dir is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportWriteError(f"writing {out_dir}: {write_failure(err, out_dir.parent)}") from err
    if bad_logits := nonfinite_logits(tmp, processor):
        shutil.rmtree(tmp, ignore_errors=True)
        log.error("not exporting %s: its weights are finite, but %d of its logits on a probe batch (a "
                  "second of silence and one of noise) are NaN or Inf", out_dir, bad_logits)
        return False
    pause_point(f"export-{out_dir.name}", 0)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("exported Hugging Face model to %s", out_dir)
    return True


def export_hf(engine: Engine, processor: Wav2Vec2Processor, out_dir: Path, is_main: bool, card: str = ""
              ) -> bool:
    """Collective: gather the full fp32 weights (every rank), write the export on rank 0
    (:func:`write_export`); whether it was written (on every rank: refused when the weights, or the logits
    of a probe batch, are not finite)."""
    state = engine.full_state_dict()
    written = write_export(engine.module, processor, out_dir, state, card) if is_main else True
    return bool(dist.all_gather_objects(written)[0])


def nonfinite_logits(directory: Path, processor: Wav2Vec2Processor) -> int:
    """How many logits of the export written in ``directory`` are NaN or Inf on a probe batch: a second of
    silence and a second of noise, through the export's own feature extractor. Weights can be finite and
    still overflow (a diverged run's). Loads what was written, as a user would; the global RNGs are left
    as they were."""
    extractor = processor.feature_extractor
    rate = extractor.sampling_rate
    audio = [np.zeros(rate, np.float32), 0.1 * np.random.default_rng(0).standard_normal(rate, np.float32)]
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        model = AutoModelForCTC.from_pretrained(directory, dtype=torch.float32).eval()
        logits = model(**extractor(audio, sampling_rate=rate, return_tensors="pt")).logits
    return int((~torch.isfinite(logits)).sum())


def export_checkpoint(source: str | Path, out_dir: str | Path, tag: str | None = None,
                      config: str | Path | None = None) -> Path:
    """Write a ``save_pretrained`` export (safetensors + processor) of a DeepSpeed checkpoint; refuses
    NaN/Inf."""
    out = Path(out_dir)
    if out.exists() and not is_hf_export(out) and any(out.iterdir()):
        raise ModelSourceError(f"{out} exists and is not a Hugging Face export; refusing to replace it")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's chatter to stderr (see load_for_inference)
        ref = find_checkpoint(source, tag, config)
        model, processor = model_from_checkpoint(ref)
        cfg = checkpoint_config(ref)
    card = model_card(name=out.name, base_model=cfg.model.name_or_path,
                      step=int(ref.tag.rpartition("_")[2] or 0), config_yaml=to_yaml(cfg), results={})
    if not write_export(model, processor, out, card=card):
        raise ValueError(f"{ref.directory}: the weights, or the logits on a probe batch, are NaN or Inf; "
                         f"not exporting")
    return out
