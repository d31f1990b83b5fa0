from __future__ import annotations

import pytest
import torch

from w2v_dist.config import ScheduleConfig
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import LABEL_PAD, CTCCollator
from w2v_dist.data.text import TranscriptError, build_vocab, librispeech_vocab, normalize
from w2v_dist.decoding import greedy_ids
from w2v_dist.metrics import ErrorCounts
from w2v_dist.schedule import lr_at


def test_normalize_policy() -> None:
    assert normalize("  hello,   world-wide! it's ") == "HELLO WORLD WIDE IT'S"
    with pytest.raises(TranscriptError, match="empty"):
        normalize(" ... ")
    with pytest.raises(TranscriptError, match="'3'"):
        normalize("chapter 3")


def test_text_policies_for_other_languages() -> None:
    from w2v_dist.data.text import TextPolicy
    from w2v_dist.scoring import normalized

    french = TextPolicy(alphabet="any")
    raw = "Bonjour, le café « numéro » – ÇA VA ? L’été"
    assert french.normalize(raw) == "BONJOUR LE CAFÉ NUMÉRO ÇA VA L'ÉTÉ"
    with pytest.raises(TranscriptError, match="'ÇÉ'"):
        normalize(raw)  # LibriSpeech's policy: A-Z only
    # NFKC folds the ligature
    assert TextPolicy(alphabet="any", case="lower").normalize("ГДЕ ﬁlm?") == "где film"
    assert TextPolicy(alphabet="any", digits="keep").normalize("Numéro 1") == "NUMÉRO 1"
    assert TextPolicy(alphabet="any", punctuation="keep").normalize("Ça va?") == "ÇA VA?"
    with pytest.raises(TranscriptError, match="'@'"):
        french.normalize("a@b")  # symbols are not punctuation to strip
    with pytest.raises(ValueError, match="alphabet='greek'"):
        TextPolicy(alphabet="greek")
    # Scoring applies the dev set's policy to hypotheses: under LibriSpeech's, a French one would score as
    # empty.
    assert normalized("ça va", french) == "ÇA VA" and normalized("ça va") == ""


def test_vocab_matches_wav2vec2_960h_layout() -> None:
    vocab = librispeech_vocab()
    assert len(vocab) == 32
    assert ([vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "Z")] == [0, 1, 2, 3, 4, 5,
                                                                                          6, 31])
    assert list(build_vocab(["BAD"])) == ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "D", "B"]


def test_encoder_geometry_matches_wav2vec2() -> None:
    geometry = EncoderGeometry()
    assert geometry.receptive_field == 400 and geometry.inputs_to_logits_ratio == 320
    assert geometry.frames(399) == 0 and geometry.frames(400) == 1 and geometry.frames(16_000) == 49


def test_tri_stage_schedule() -> None:
    cfg = ScheduleConfig(name="tri_stage", phase_ratio=(0.1, 0.4, 0.5), init_lr_scale=0.01,
                         final_lr_scale=0.05)
    assert lr_at(0, 1.0, 100, cfg) == pytest.approx(0.01)
    assert lr_at(10, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(49, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, cfg) == pytest.approx(0.05)
    assert 0.05 < lr_at(75, 1.0, 100, cfg) < 1.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_warmup_then_decay(name: str) -> None:
    cfg = ScheduleConfig(name=name, warmup_steps=10, final_lr_scale=0.0)
    assert lr_at(0, 1.0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 110, cfg) == pytest.approx(1.0)
    assert lr_at(110, 1.0, 110, cfg) == pytest.approx(0.0)
    assert lr_at(60, 1.0, 110, cfg) == pytest.approx(0.5)


def test_error_counts_pool_edits_not_rates() -> None:
    a, b = ErrorCounts(), ErrorCounts()
    a.add(["ONE TWO THREE FOUR"], ["ONE TWO THREE FOUR"])
    b.add(["YES"], ["NO"])
    pooled = a + b
    assert pooled.wer == pytest.approx(1 / 5)  # not the mean of per-rank rates (0.5)
    assert pooled.utterances == 2


def test_greedy_ids_cut_at_real_frames() -> None:
    logits = torch.zeros(2, 4, 3)
    logits[:, :, 2] = 1.0
    assert greedy_ids(logits, torch.tensor([4, 2])) == [[2, 2, 2, 2], [2, 2]]


def test_collator_pads_and_masks_only_when_asked() -> None:
    values = torch.zeros(2, 5)
    values[0], values[1, :3] = 1.0, 1.0
    rows = (values, [5, 3], [[7, 8], [9]], ["a", "b"], ["AB", "C"])
    batch = CTCCollator(return_attention_mask=False).assemble(*rows, skips={"too_long": 1})
    assert batch.input_values.shape == (2, 5) and batch.attention_mask is None and len(batch) == 2
    assert batch.labels.tolist() == [[7, 8], [9, LABEL_PAD]] and batch.targets == 3
    assert (batch.keys == ("a", "b") and batch.seconds == pytest.approx(8 / 16_000)
            and batch.skips == {"too_long": 1})
    masked = CTCCollator(return_attention_mask=True).assemble(*rows)
    assert masked.attention_mask is not None and masked.attention_mask.tolist()[1] == [1, 1, 1, 0, 0]
    assert set(masked.model_inputs("cpu")) == {"input_values", "attention_mask", "labels"}


def test_char_labeler_matches_the_tokenizer(tmp_path) -> None:
    from w2v_dist.data.text import CharLabeler
    from w2v_dist.model import processor_from_vocab

    tokenizer = processor_from_vocab(build_vocab(["ABC DEF'"])).tokenizer
    labeler = CharLabeler(tokenizer)
    assert labeler.vocab is not None
    for text in ["ABC", "A B C", "DEAF CAB'S", "ZZZ Q", ""]:
        assert labeler(text) == tokenizer(text).input_ids, text


def test_a_resume_that_changes_the_schedule_length_says_how_to_keep_it() -> None:
    """Extending trainer.max_steps on resume re-stretches the tri-stage schedule: the warning names both
    lengths, the lr jump at the resumed step, and schedule.steps; a fixed schedule.steps, an unchanged length
    or a constant schedule give none. The checkpoint's config is read as the trainer reads it (to_yaml, then
    YAML)."""
    import yaml

    from w2v_dist.config import load_config, to_yaml
    from w2v_dist.schedule import length_change

    def change(started: list[str], now: list[str]) -> str | None:
        saved = yaml.safe_load(to_yaml(load_config(None, started)))
        cfg = load_config(None, now)
        return length_change(saved, cfg.trainer.max_steps, cfg.schedule, 3000, cfg.optim.lr)

    message = change(["trainer.max_steps=4000", "optim.lr=1e-4"],
                     ["trainer.max_steps=8000", "optim.lr=1e-4"])
    assert message is not None
    assert "spans 8,000 updates instead of the 4,000" in message and "schedule.steps=4000" in message
    assert "at step 3,000 the lr goes from 2.24e-05 to 1.00e-04" in message
    assert change(["trainer.max_steps=4000"], ["trainer.max_steps=8000", "schedule.steps=4000"]) is None
    assert change(["trainer.max_steps=4000", "schedule.steps=8000"], ["trainer.max_steps=8000"]) is None
    assert change(["trainer.max_steps=4000"], ["trainer.max_steps=4000"]) is None
    assert change(["trainer.max_steps=4000", "schedule.name=constant"],
                  ["trainer.max_steps=8000", "schedule.name=constant"]) is None


def test_the_trainer_warns_on_rank_0_when_a_resume_changes_the_schedule_length(
        caplog: pytest.LogCaptureFixture) -> None:
    """The glue: the saved run carries its config as YAML; rank 0 says the change, once."""
    from types import SimpleNamespace

    from w2v_dist.checkpoint.saved import SavedRun
    from w2v_dist.config import load_config, to_yaml
    from w2v_dist.trainer import Trainer

    saved = SavedRun(world_size=1, step=3000, layout=None,
                     config=to_yaml(load_config(None, ["trainer.max_steps=4000"])))
    for is_main in (True, False):
        fake = SimpleNamespace(cfg=load_config(None, ["trainer.max_steps=8000"]),
                               state=SimpleNamespace(step=3000), world=SimpleNamespace(is_main=is_main))
        Trainer._check_schedule(fake, saved)  # type: ignore[arg-type]
    assert caplog.text.count("resuming at step 3000: the learning-rate schedule (tri_stage) now spans "
                             "8,000") == 1
