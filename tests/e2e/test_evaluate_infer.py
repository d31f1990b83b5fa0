"""After training: offline evaluation (1 and 2 ranks, export or checkpoint), decoders, transcription, report,
export.

One short 2-rank ZeRO-2 run is shared by the module; its last checkpoint (step 4) holds the weights of its
final export, so every route to "the model" must give the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.support.launch import run_deepspeed, run_single
from tests.support.runs import check, overrides
from w2v_dist.data.index import load_shard_set

BIN = Path(sys.executable).parent
STEPS = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(shard_dirs: dict, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_run") / "run"
    check(run_deepspeed(["--config", "configs/demo.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"deepspeed.zero_stage": 2, "trainer.max_steps": STEPS,
                                        "trainer.eval_every": 2, "trainer.save_every": STEPS,
                                        # What is tested here is scoring and decoding, on a model that fits
                                        # the corpus' words in STEPS updates: no warm-up, masks or LayerDrop.
                                        "schedule.name": "constant", "model.mask_time_prob": 0.0,
                                        "model.layerdrop": 0.0})]))
    return out


@pytest.fixture(scope="module")
def single_eval(run_dir: Path, shard_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict,
                                                                                                    list]:
    """``w2v-dist evaluate`` on the export, one process: (stdout summary, JSONL rows)."""
    out = tmp_path_factory.mktemp("eval_single") / "utts.jsonl"
    proc = subprocess.run([str(BIN / "w2v-dist"), "evaluate", "--model", str(run_dir / "final"), "--shards",
                           str(shard_dirs["dev-clean"]), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    check(proc)
    summary = json.loads(proc.stdout)  # stdout is exactly the summary line: no library chatter
    assert "worst" in proc.stderr and "REF:" in proc.stderr
    return summary, [json.loads(line) for line in out.read_text().splitlines()]


def dev_flacs(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.rglob("*.flac") if "dev-clean" in p.parts)


@pytest.mark.slow
def test_evaluate_export_counts_every_dev_utterance_once(single_eval: tuple[dict, list],
                                                         shard_dirs: dict) -> None:
    summary, rows = single_eval
    dev = load_shard_set(str(shard_dirs["dev-clean"]))
    expected_keys = sorted(u.key for shard in dev.utterances for u in shard)
    assert sorted(r["key"] for r in rows) == expected_keys
    stats = summary["sets"]["dev-clean"]
    assert stats["utterances"] == len(rows) == dev.total_samples
    assert stats["unscored"] == 0 == len(stats["unscored_keys"])
    words = sum(len(r["reference"].split()) for r in rows)
    assert stats["words"] == words == sum(r["words"] for r in rows)
    assert stats["wer"] == pytest.approx(sum(r["errors"] for r in rows) / words, abs=1e-12)
    assert stats["cer"] == pytest.approx(sum(r["char_errors"] for r in rows) / sum(r["chars"] for r in rows))
    assert all(set(r) >= {"set", "key", "reference", "hypothesis", "errors", "words", "char_errors", "chars"}
               for r in rows)
    assert any(r["hypothesis"] for r in rows), "the tiny model should emit something to make the test bite"


@pytest.mark.slow
def test_two_ranks_give_the_same_results_as_one(single_eval: tuple[dict, list], run_dir: Path,
                                                shard_dirs: dict, tmp_path: Path) -> None:
    out = tmp_path / "utts.jsonl"
    proc = run_deepspeed(["evaluate", "--model", str(run_dir / "final"), "--shards",
                          str(shard_dirs["dev-clean"]), "--out", str(out)],
                         program=("--no_local_rank", "--module", "w2v_dist"))
    check(proc)
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"sets"')]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2, "only rank 0 prints the summary"
    single_summary, single_rows = single_eval
    assert summaries[0]["sets"] == single_summary["sets"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and rows == single_rows


@pytest.mark.slow
def test_checkpoint_forms_resolve_and_score_like_the_export(single_eval: tuple[dict, list], run_dir: Path,
                                                            shard_dirs: dict) -> None:
    from w2v_dist.dist import World
    from w2v_dist.evaluation import EvalOptions, evaluate_sets
    from w2v_dist.export import find_checkpoint

    tag = f"step_{STEPS:08d}"
    refs = {find_checkpoint(p) for p in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / tag)}
    assert refs == {find_checkpoint(run_dir, tag=tag)} and next(iter(refs)).config == run_dir / "config.yaml"
    summary = evaluate_sets(EvalOptions(model=str(run_dir), shards=[str(shard_dirs["dev-clean"])],
                                        workers=0),
                            World(0, 0, 1), torch.device("cpu"))
    assert summary is not None and summary["sets"] == single_eval[0]["sets"]


@pytest.mark.slow
def test_beam_search_with_and_without_a_kenlm_model(run_dir: Path, shard_dirs: dict, tmp_path: Path) -> None:
    pytest.importorskip("pyctcdecode")
    from w2v_dist.dist import World
    from w2v_dist.evaluation import EvalOptions, evaluate_sets
    from w2v_dist.prep.synth import LEXICON

    def run(**extra: object) -> dict:
        opts = EvalOptions(model=str(run_dir / "final"), shards=[str(shard_dirs["dev-clean"])], workers=0,
                           decoder="beam", beam_width=8, out=str(tmp_path / "beam.jsonl"),
                           **extra)  # type: ignore[arg-type]
        summary = evaluate_sets(opts, World(0, 0, 1), torch.device("cpu"))
        assert summary is not None
        return summary["sets"]["dev-clean"]

    assert run()["utterances"] == 12
    pytest.importorskip("kenlm")
    # uniform bigram LM over the corpus' words: hypotheses become lexicon words
    arpa = tmp_path / "lexicon.arpa"
    pairs = [("<s>", w) for w in LEXICON] + [(a, b) for a in LEXICON for b in (*LEXICON, "</s>")]
    arpa.write_text("\n".join(["\\data\\", f"ngram 1={len(LEXICON) + 3}", f"ngram 2={len(pairs)}", "",
                               "\\1-grams:", "-1.3\t</s>", "-99\t<s>\t0", "-99\t<unk>\t0",
                               *[f"-1.3\t{w}\t0" for w in LEXICON], "", "\\2-grams:",
                               *[f"-1.3\t{a} {b}" for a, b in pairs], "", "\\end\\", ""]))
    with_lm = run(lm=str(arpa), alpha=2.0)
    hyps = [json.loads(line)["hypothesis"] for line in (tmp_path / "beam.jsonl").read_text().splitlines()]
    assert with_lm["utterances"] == 12
    assert all(word in LEXICON for h in hyps for word in h.split())


@pytest.mark.slow
def test_transcribe_plain_json_and_chunked_long_audio(run_dir: Path, tiny_model: Path, corpus: Path,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from w2v_dist.cli import main

    flac = dev_flacs(corpus)[0]
    assert main(["transcribe", "--model", str(run_dir / "final"), str(flac)]) == 0
    path, _, text = capsys.readouterr().out.rstrip("\n").partition("\t")
    assert path == str(flac) and "\n" not in text

    # ~70 s, stereo, 22.05 kHz: down-mixed, resampled, and cut into 30 s chunks with 2 s of context per side.
    audio = np.concatenate([sf.read(f, dtype="float32")[0] for f in dev_flacs(corpus)])
    audio = np.resize(audio, 70 * 16_000)
    import torchaudio.functional as F

    stereo = F.resample(torch.from_numpy(audio), 16_000, 22_050).numpy()
    long_file = tmp_path / "long.wav"
    sf.write(long_file, np.stack([stereo, stereo], axis=1), 22_050)
    # The randomly initialised model emits characters everywhere, so timestamps must span the whole file.
    assert main(["transcribe", "--model", str(tiny_model), "--json", str(flac), str(long_file)]) == 0
    short, long = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for result in (short, long):
        words = result["words"]
        assert result["text"].split() == [w["word"] for w in words] and words
        assert all(0 <= w["start"] <= w["end"] <= result["seconds"] + 0.05 for w in words)
        assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert long["seconds"] == pytest.approx(70.0, abs=1e-3)
    assert long["words"][-1]["end"] > 60.0, "the last chunk's words must carry the chunk's offset"


@pytest.mark.slow
def test_report_writes_readable_pngs_and_a_summary(run_dir: Path, tmp_path: Path) -> None:
    from w2v_dist.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert {p.stem for p in pngs} == {"loss", "lr", "grad_norm", "dev_error_rates", "throughput", "skipped"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000 for p in pngs)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"last step {STEPS}; finished" in markdown and "| dev-clean |" in markdown
    assert all(f"]({p.name})" in markdown for p in pngs)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_export_from_checkpoint_matches_the_runs_own_export(stage: int, run_dir: Path, shard_dirs: dict,
                                                            tiny_model: Path, corpus: Path, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    """...and says only what it wrote: no load report, bars or DeepSpeed conversion narrative."""
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from w2v_dist.cli import main

    if stage == 2:
        run = run_dir  # 2 ranks: the fp32 master weights are split over two optimizer-state files
    else:
        run = tmp_path / "run"
        check(run_single(["--config", "configs/debug.yaml", *overrides(
            shard_dirs, tiny_model, run, **{"trainer.max_steps": 3, "trainer.save_every": 3,
                                            "trainer.eval_every": 0, "data.num_workers": 0})]))
    capfd.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0
    said = capfd.readouterr()
    assert said.out == f"wrote {tmp_path / 'exported'}\n"
    assert not any(noise in said.err for noise in ("LOAD REPORT", "Loading weights", "Writing model shards",
                                                    "zero checkpoint",
                                                   "Loading checkpoint shards")), said.err
    processor = Wav2Vec2Processor.from_pretrained(tmp_path / "exported")
    inputs = processor(sf.read(dev_flacs(corpus)[0], dtype="float32")[0], sampling_rate=16_000,
                       return_tensors="pt")
    with torch.no_grad():
        ours = Wav2Vec2ForCTC.from_pretrained(tmp_path / "exported").eval()(inputs.input_values).logits
        theirs = Wav2Vec2ForCTC.from_pretrained(run / "final").eval()(inputs.input_values).logits
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    card = (tmp_path / "exported" / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "No dev set was scored" in card
    assert "name_or_path: " + str(tiny_model) in card  # the training config it came from


def test_decoders_keep_ctc_repeats_and_exclude_special_tokens() -> None:
    from w2v_dist.data.text import librispeech_vocab
    from w2v_dist.decoding import GreedyDecoder, banned_token_ids, beam_labels
    from w2v_dist.model import processor_from_vocab

    tokenizer = processor_from_vocab(librispeech_vocab()).tokenizer
    vocab = tokenizer.get_vocab()
    labels = beam_labels(tokenizer)
    assert labels[vocab["<pad>"]] == "" and labels[vocab["|"]] == " " and labels[vocab["E"]] == "E"
    assert sorted(banned_token_ids(tokenizer)) == sorted(vocab[t] for t in ("<s>", "</s>", "<unk>"))
    # Frames: L L <pad> L <unk> O  -> "LLO" (a blank separates a real repeat; <unk> loses to the runner-up
    # O).
    path = ["L", "L", "<pad>", "L", "<unk>", "O"]
    logits = torch.full((1, len(path), len(vocab)), -5.0)
    for frame, token in enumerate(path):
        logits[0, frame, vocab[token]] = 5.0
    logits[0, 4, vocab["O"]] = 1.0
    assert GreedyDecoder(tokenizer)(logits, torch.tensor([len(path)])) == ["LLO"]
    assert GreedyDecoder(tokenizer)(logits, torch.tensor([2])) == ["L"]
