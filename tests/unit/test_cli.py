"""The CLI surface: help with defaults, a fast `--help`, `--version`, one-line errors and `make clean`."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from w2v_dist import __version__
from w2v_dist.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_a_one_line_description_and_its_default(name: str) -> None:
    parser = subcommands()[name]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "\n" not in action.help, f"{name} {action.dest}: no description"
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False,
                                                            argparse.SUPPRESS) and action.help and \
                action.help != argparse.SUPPRESS:
            assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {action.dest}"


def test_shard_help_shows_defaults() -> None:
    text = " ".join(subcommands()["shard"].format_help().split())
    assert "target size of each tar shard (default: 256.0)" in text


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    code = ("import sys, contextlib, io\nfrom w2v_dist.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    "
            "main(['--help'])\nheavy = sorted({'torch', 'deepspeed', 'transformers', 'webdataset'} & "
            "set(sys.modules))\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    start = time.perf_counter()
    proc = subprocess.run([str(REPO / ".venv/bin/w2v-dist"), "--help"], capture_output=True, text=True,
                          timeout=60)
    took = time.perf_counter() - start
    assert proc.returncode == 0 and "transcribe" in proc.stdout
    assert took < 1.0, f"w2v-dist --help took {took:.2f} s"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"w2v-dist {__version__}"


def test_shard_names_a_missing_subset_and_lists_those_found(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for subset in ("dev-clean", "train-clean-100"):
        (tmp_path / "LibriSpeech" / subset).mkdir(parents=True)
    assert (main(["shard", "--librispeech", str(tmp_path), "--subset", "dev-other", "--out",
                  str(tmp_path / "s")]) == 2)
    err = capsys.readouterr().err
    assert err == (f"shard: subset 'dev-other' not found under {tmp_path / 'LibriSpeech'}, which holds "
                   f"dev-clean, train-clean-100\n")
    assert (main(["shard", "--librispeech", str(tmp_path / "nope"), "--subset", "dev-clean", "--out",
                  "x"]) == 2)
    assert capsys.readouterr().err.count("\n") == 1


def test_transcribe_names_missing_files_in_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    here = tmp_path / "here.flac"
    here.write_bytes(b"")
    assert main(["transcribe", "--model", str(tmp_path), str(here), str(tmp_path / "a.flac"), "b.wav"]) == 2
    assert capsys.readouterr().err == f"transcribe: no such audio file: {tmp_path / 'a.flac'}, b.wav\n"


def test_transcribe_refuses_what_is_no_model_in_one_line(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    audio = tmp_path / "a.flac"
    audio.write_bytes(b"")
    assert main(["transcribe", "--model", str(tmp_path / "nothing"), str(audio)]) == 2
    err = capsys.readouterr().err  # after DeepSpeed's accelerator warning, when no DS_ACCELERATOR is set
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"transcribe: {tmp_path / 'nothing'} is neither a "
                                                   f"Hugging Face")


def test_make_clean_removes_what_the_build_wrote_and_keeps_the_users_data(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    made = [tmp_path / p
            for p in ("work/demo/run/metrics.jsonl", ".pytest_cache/x", ".mypy_cache/x", ".ruff_cache/x")]
    kept = [tmp_path / p for p in ("work/shards/dev-clean/index.json", "lm/train.arpa", ".venv/bin/python")]
    for path in made + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, timeout=60)
    assert [p for p in made if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert not (tmp_path / "work/demo").exists()


def test_library_prints_reach_stderr_and_the_commands_output_stdout() -> None:
    """DeepSpeed warns on stdout as it is imported (without DS_ACCELERATOR); under ``command_stdout`` that
    lands on stderr, while ``emit`` still writes the command's output to stdout."""
    code = ("from w2v_dist.console import command_stdout, emit\n"
            "with command_stdout():\n    import deepspeed\n    print('a library talking')\n    "
            "emit('{\"a\": 1}')\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == '{"a": 1}\n'
    assert "a library talking" in proc.stderr and "accelerator" in proc.stderr


def test_bench_stdout_holds_only_its_json_lines(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import loader, output

    def bench(*args: object) -> None:
        print("[WARNING] a library's warning on stdout")
        output.emit({"measure": "summary", "x": 1})

    monkeypatch.setattr(loader, "loader_benchmark", bench)
    assert main(["bench", "loader"]) == 0
    captured = capsys.readouterr()
    assert captured.out == '{"measure": "summary", "x": 1}\n'
    assert "a library's warning on stdout" in captured.err


def test_bench_gpu_refuses_on_a_machine_without_one_naming_what_it_needs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, whatever this one has
    assert main(["bench", "gpu", "--quick", "--work-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("bench gpu: bench gpu measures a CUDA GPU and "
                                                            "this machine has none")
    assert not any(tmp_path.iterdir())  # refused before preparing anything


def test_bench_gpu_quick_covers_every_candidate_and_recommends_the_fastest_of_ours() -> None:
    from benchmarks.gpu import trials, variants_table
    from w2v_dist.config import _CHOICES

    quick = trials(quick=True)
    overrides = {o for t in quick for o in t.overrides}
    assert {f"model.pos_conv={k}" for k in _CHOICES["model.pos_conv"] if k != "hf"} <= overrides
    assert {t.shape_quantum for t in quick} == {0, 16} and any(t.bare for t in quick)
    assert {"model.compile=true" in t.overrides for t in quick if not t.bare} == {True, False}

    def result(trial_index: int, rate: float) -> dict:
        trial = quick[trial_index]
        return {"variant": trial.name, "trial": {"overrides": list(trial.overrides), "bare": trial.bare,
                                                 "static_shapes": False,
                                                 "shape_quantum": trial.shape_quantum},
                "audio_seconds_per_second": rate, "mfu_datasheet": rate / 1e5, "host_syncs_counted": 1}

    bounded = next(i for i, t in enumerate(quick) if t.shape_quantum and "model.compile=true" in t.overrides)
    bare = next(i for i, t in enumerate(quick) if t.bare)
    table = variants_table([result(0, 4000.0), result(bounded, 6000.0), result(bare, 9000.0),
                            {"variant": "broken", "error": "OutOfMemoryError()"}], 0.01)
    lines = table.splitlines()
    assert lines[0].split() == ["variant", "audio-s/s", "MFU", "syncs", "data", "wait"]
    assert "6000" in lines[2] and "6.0%" in lines[2] and lines[2].endswith("0.010")
    assert "broken" in lines[4] and "failed: OutOfMemoryError()" in lines[4]
    assert lines[-1] == (f"recommended default: {quick[bounded].name} (model.compile=true "
                         "data.shape_quantum_frames=16)")
