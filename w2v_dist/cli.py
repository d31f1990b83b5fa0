"""The ``w2v-dist`` command (also ``python -m w2v_dist``) and the argument handling ``train.py`` shares."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, TypeVar

from w2v_dist import __version__
from w2v_dist.config import ConfigError, config_reference, load_config, to_yaml
from w2v_dist.console import command_stdout, emit, quiet_model_loading
from w2v_dist.inputs import InputError, input_problems
from w2v_dist.redact import redact

T = TypeVar("T")
_CPUS = os.cpu_count() or 1


def _fail(command: str, err: Exception | str, code: int = 2) -> int:
    print(f"{command}: {err}", file=sys.stderr)
    return code


def _options(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """``cls`` (a dataclass) from the flags named as its fields, then ``given``; other fields keep their
    defaults."""
    named = {f.name: getattr(args, f.name)
             for f in fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**named | given)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with changes from the defaults")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")


def run_train(args: argparse.Namespace) -> int:
    # What is parsed is all we need of argv; tools that record it (wandb's run metadata) see it redacted.
    sys.argv[:] = [redact(arg) for arg in sys.argv]
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail("config error", err)
    if args.dump_config:
        print(to_yaml(cfg), end="")
        problems = input_problems(cfg)
        return _fail("input error", InputError(problems)) if problems else 0
    from w2v_dist.checkpoint.resume import ResumeError
    from w2v_dist.hub import ModelUnavailable
    from w2v_dist.lock import OutputDirInUse
    from w2v_dist.trainer import train

    try:
        train(cfg, args.local_rank)
    except InputError as err:  # found on every rank before the process group (w2v_dist.run.build_run)
        return _fail("input error", err)
    except ResumeError as err:  # another model's checkpoint, or none left (w2v_dist.checkpoint.resume)
        return _fail("train", err, 1)
    except OutputDirInUse as err:
        return _fail("train", err, 1)
    except ModelUnavailable as err:  # said once, by rank 0 (w2v_dist.hub.resolve)
        return _fail("train", err, 1) if str(err) else 1
    return 0


def _synth(args: argparse.Namespace) -> int:
    from w2v_dist.prep.synth import synthesize

    root = synthesize(args.out_dir, args.utterances, args.dev_utterances, args.seed, args.workers)
    emit(f"wrote LibriSpeech-layout corpus under {root}")
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from w2v_dist.model import init_model

    out = init_model(args.out_dir, args.size, args.seed, args.family)
    emit(f"wrote a randomly initialised {args.size} {args.family} CTC model to {out}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from w2v_dist.data.text import TextPolicy
    from w2v_dist.prep.shards import NothingAccepted, ShardOptions, shard_corpus
    from w2v_dist.prep.sources import librispeech_sources, manifest_sources

    if bool(args.librispeech) == bool(args.manifest):
        return _fail("shard", "give exactly one of --librispeech ROOT (with --subset) or --manifest FILE")
    try:
        if args.librispeech:
            subsets = args.subset or ["train-clean-100"]
            sources, described = librispeech_sources(args.librispeech, subsets), {"subsets": subsets}
        else:
            sources, described = manifest_sources(args.manifest), {"manifest": Path(args.manifest).name}
    except (OSError, ValueError) as err:  # a subset or manifest that is not there, a malformed manifest line
        return _fail("shard", err)
    opts = _options(ShardOptions, args, shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed,
                    text=_options(TextPolicy, args))
    try:
        index = shard_corpus(sources, args.out, opts, described)
    except (FileExistsError, NothingAccepted) as err:
        return _fail("shard", err, 1)
    totals = index["totals"]
    verb = "would write" if args.dry_run else "wrote"
    emit(f"{totals['inputs']} inputs = {totals['written']} written + {totals['rejected']} rejected; {verb} "
         f"{totals['shards']} shards, {totals['hours']:.3f} h, {totals['bytes'] / 1e6:.1f} MB to {args.out} "
         f"in {index['elapsed_seconds']:.1f} s")
    return 0


def _download(args: argparse.Namespace) -> int:
    from w2v_dist.prep.download import DownloadError, download

    try:
        download(args.subset, args.root, args.mirror, args.checksums, args.keep_archive, log=emit)
    except DownloadError as err:
        return _fail("download failed", err, 1)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from w2v_dist.data.index import ShardIndexError
    from w2v_dist.prep.verify import verify_dir

    try:
        result = verify_dir(args.dir, args.workers, on_shard=lambda report: emit(report.line()))
    except ShardIndexError as err:
        return _fail("verify", err)
    for problem in result.problems:
        emit(f"problem: {problem}")
    emit(result.summary())
    return 0 if result.ok else 1


def _index(args: argparse.Namespace) -> int:
    import time

    from w2v_dist.data.index import ShardIndexError, is_remote
    from w2v_dist.data.offsets import ShardOffsetsError, add_offsets

    if remote := [d for d in args.dirs if is_remote(d)]:
        return _fail("index", f"{redact(remote[0])}: index rewrites local shard directories only (run it "
                              "where the shards are written, then copy index.json and its columnar copy)")
    for directory in args.dirs:
        started = time.monotonic()
        try:
            done = add_offsets(Path(directory))
        except (ShardIndexError, ShardOffsetsError, OSError) as err:
            return _fail("index", err, 1)
        emit(f"{directory}: {done.shards} shards ({done.scanned} scanned for offsets), {done.utterances} "
             f"utterances, {time.monotonic() - started:.1f} s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from w2v_dist.demo import run_demo

    return run_demo(Path(args.work_dir), args.config, args.overrides, args.utterances, args.dev_utterances)


def _transcribe(args: argparse.Namespace) -> int:
    from w2v_dist.inference import check_chunking, transcribe

    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        return _fail("transcribe", f"no such audio file: {', '.join(missing)}")
    try:
        check_chunking(args.chunk_seconds, args.overlap_seconds)
        for result in transcribe(args.model, args.files, args.chunk_seconds, args.overlap_seconds,
                                 word_timestamps=args.json, config=args.config):
            line = {"file": result.path, "text": result.text, "seconds": result.seconds,
                    "words": result.words}
            emit(json.dumps(line) if args.json else f"{result.path}\t{result.text}")
    except (ValueError, OSError) as err:
        # a model that is neither an export, a checkpoint nor a cached hub id
        return _fail("transcribe", err)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from w2v_dist.decoding import DecoderUnavailable
    from w2v_dist.evaluation import EvalOptions, evaluate_command

    opts = _options(EvalOptions, args)
    try:
        return evaluate_command(opts, args.local_rank)
    except (ValueError, DecoderUnavailable, OSError) as err:
        # bad paths, indexes, configs, options, LM files
        return _fail("evaluate", err)


def _build_lm(args: argparse.Namespace) -> int:
    from itertools import chain

    from w2v_dist.lm import build_lm, shard_transcripts, text_lines

    if not args.shards and not args.text:
        return _fail("build-lm", "give --shards and/or --text")
    sentences = chain(*(shard_transcripts(s) for s in args.shards or []),
                      *(text_lines(Path(t)) for t in args.text or []))
    try:
        summary = build_lm(sentences, Path(args.out), args.order, Path(args.binary) if args.binary else None)
    except (ValueError, OSError, RuntimeError) as err:
        # no text, bad shard sets, missing tools, lmplz errors
        return _fail("build-lm", err)
    emit(json.dumps(summary))
    return 0


def _report(args: argparse.Namespace) -> int:
    from w2v_dist.report import write_report

    try:
        emit(f"wrote {write_report(args.run_dir, args.out)}")
    except FileNotFoundError as err:
        return _fail("report", err)
    return 0


def _export(args: argparse.Namespace) -> int:
    from w2v_dist.export import export_checkpoint

    try:
        emit(f"wrote {export_checkpoint(args.checkpoint, args.out, args.tag, args.config)}")
    except (ValueError, OSError) as err:  # not a checkpoint, bad config, NaN weights, unreadable files
        return _fail("export", err)
    return 0


def _benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` of the source checkout this package runs from. The benchmarks are no part of
    the installed package: they sit next to ``w2v_dist/`` in a clone (``pip install -e .``, ``make
    setup``), whose root an editable install does not put on the path."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__init__.py").is_file():
        raise FileNotFoundError(f"'w2v-dist bench' needs a source checkout: no benchmarks/ next to "
                                f"{root / 'w2v_dist'} (clone the repository and 'pip install -e .' there)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{name}")


def _bench(args: argparse.Namespace) -> int:
    try:
        bench = _benchmark(args.what)
    except FileNotFoundError as err:
        return _fail("bench", err)
    if args.what == "loader":
        bench.loader_benchmark(Path(args.work_dir) / "loader", args.utterances, args.workers)
    elif args.what == "step":
        bench.step_benchmark(Path(args.work_dir), args.size, args.batch_seconds, args.rounds, args.steps)
    elif args.what == "shard":
        bench.shard_benchmark(Path(args.work_dir) / "loader", args.utterances, args.workers)
    elif args.what == "scaling":
        bench.scaling_benchmark(Path(args.work_dir), args.steps, args.batch_seconds)
    elif args.what == "plan":
        try:
            cfg = load_config(args.config, [])
        except ConfigError as err:
            return _fail("config error", err)
        bench.plan_benchmark(cfg, args.hours, args.ranks, args.workers, args.mix, args.speed_perturb,
                             args.audio_s_per_gpu, args.resume_updates, args.epochs)
    elif args.what == "gpu":
        sweep = [float(s) for s in args.sweep.split(",")]
        try:
            bench.gpu_benchmark(Path(args.work_dir), sweep, args.steps, args.warmup, args.probe_limit,
                                args.quick)
        except bench.BenchmarkUnavailable as err:
            return _fail("bench gpu", err)
    return 0


def _config_docs(args: argparse.Namespace) -> int:
    emit(config_reference())
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    from w2v_dist.hub import ModelUnavailable, fetch

    os.environ["HF_HOME"] = str(Path(args.cache).resolve())  # named by its messages
    try:
        path = fetch(args.name, Path(args.cache) / "hub")
    except ModelUnavailable as err:
        return _fail("fetch-model", err, 1)
    emit(str(path))  # stdout is the output (w2v_dist.console): the path, for scripts
    print(f"on every node: export HF_HOME={Path(args.cache).resolve()} HF_HUB_OFFLINE=1", file=sys.stderr)
    return 0


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's one-line help, then its default where it has one (not for flags, or options without
    one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default != argparse.SUPPRESS
                and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


class _Families:
    """``init-model --family``'s choices, read from w2v_dist.model (which imports torch and transformers)
    only when that option is parsed or its help shown: ``w2v-dist --help`` stays well under a second."""

    def _names(self) -> tuple[str, ...]:
        from w2v_dist.model import FAMILIES

        return FAMILIES

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Only light modules are imported here; each command imports what it needs."""
    from w2v_dist.data.text import ALPHABETS, CASES, UNICODE_FORMS

    parser = argparse.ArgumentParser(prog="w2v-dist",
                                     description="Fine-tune wav2vec 2.0 and its CTC kin across GPUs "
                                     "and nodes: download, shard, train, evaluate, transcribe, export.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        subparser = sub.add_parser(name, help=help, description=help, formatter_class=_HelpWithDefaults)
        subparser.set_defaults(func=func)
        return subparser

    add_train_arguments(command("train", run_train,
                                help="train (same as train.py; run it under deepspeed/torchrun for >1 "
                                     "rank)"))

    synth = command("synth", _synth, help="write a synthetic LibriSpeech-layout corpus with espeak-ng")
    synth.add_argument("out_dir", help="where LibriSpeech/<subset>/ is written")
    synth.add_argument("--utterances", type=int, default=200, help="train-clean-100 utterances")
    synth.add_argument("--dev-utterances", type=int, default=None, help="dev-clean utterances (default N/8)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the sentences and voices drawn")
    synth.add_argument("--workers", type=int, default=_CPUS, help="espeak-ng processes")

    init = command("init-model", _init_model, help="save a randomly initialised CTC model + processor")
    init.add_argument("out_dir", help="directory to save the model and processor in")
    init.add_argument("--size", choices=("tiny", "base"), default="tiny",
                      help="tiny: a few layers for tests and demos; base: wav2vec2-base's geometry")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    init.add_argument("--family", choices=_Families(), default="wav2vec2", metavar="FAMILY",
                      help="the model_type (AutoModelForCTC): %(choices)s")

    shard = command("shard", _shard,
                    help="write WebDataset shards + index.json + rejects.jsonl + vocab.json")
    shard.add_argument("--librispeech", help="LibriSpeech root (the LibriSpeech dir or its parent)")
    shard.add_argument("--subset", action="append", help="subset to shard (repeatable)")
    shard.add_argument("--manifest",
                       help="TSV (path, transcript[, speaker]) or JSONL (path, text[, key, speaker])")
    shard.add_argument("--out", required=True, help="shard directory to write (index.json goes there)")
    shard.add_argument("--shard-size-mb", type=float, default=256.0, help="target size of each tar shard")
    shard.add_argument("--workers", type=int, default=_CPUS, help="processes probing and reading the audio")
    shard.add_argument("--min-seconds", type=float, default=0.0, help="reject utterances shorter than this")
    shard.add_argument("--max-seconds", type=float, default=35.0, help="reject utterances longer than this")
    shard.add_argument("--shuffle-seed", type=int, default=0, help="order of utterances across shards; -1 "
                                                                   "keeps corpus order")
    shard.add_argument("--sort-in-shards", action=argparse.BooleanOptionalAction, default=True,
                       help="write each shard's utterances longest first, as training cuts them into "
                            "batches (a batch is then one byte range to read)")
    shard.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    shard.add_argument("--dry-run", action="store_true", help="check and count everything, write nothing")
    shard.add_argument("--check-audio", choices=("full", "tail"), default="full",
                       help="full: decode every input; tail: header and last frame only (still catches "
                            "truncation)")
    text = shard.add_argument_group("transcripts", "how transcripts are normalised (recorded in index.json "
                                                   "and used again when scoring); the defaults are "
                                                   "LibriSpeech's")
    text.add_argument("--alphabet", choices=ALPHABETS, default="latin",
                      help="latin: A-Z and apostrophe; any: the letters and marks of every script")
    text.add_argument("--case", choices=CASES, default="upper", help="letter case transcripts are mapped to")
    text.add_argument("--unicode", choices=UNICODE_FORMS, default="NFKC",
                      help="Unicode normal form of transcripts")
    text.add_argument("--punctuation", choices=("strip", "keep"), default="strip",
                      help="strip sentence punctuation and quotes (dashes become spaces), or transcribe it")
    text.add_argument("--digits", choices=("reject", "keep"), default="reject",
                      help="reject transcripts with digits (their spoken form is ambiguous), or keep them")
    text.add_argument("--min-char-count", type=int, default=1,
                      help="characters in fewer transcripts than this are left out of the vocabulary and "
                           "their transcripts rejected (named in rejects.jsonl)")

    demo = command("demo", _demo,
                   help="synth corpus -> shards -> tiny model -> 2-rank DeepSpeed -> WER -> export")
    demo.add_argument("--work-dir", default="work/demo", help="corpus, shards, model and run go here")
    demo.add_argument("--config", default="configs/demo.yaml", help="the run's config")
    demo.add_argument("--utterances", type=int, default=480, help="synthetic train-clean-100 utterances")
    demo.add_argument("--dev-utterances", type=int, default=48, help="synthetic dev-clean utterances")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")

    dl = command("download", _download, help="download, MD5-check and safely extract LibriSpeech subsets")
    dl.add_argument("--subset", action="append", required=True, help="e.g. train-clean-100 (repeatable)")
    dl.add_argument("--root", required=True,
                    help="where LibriSpeech/<subset>/ is extracted (archives go here too)")
    dl.add_argument("--mirror", default=os.environ.get("LIBRISPEECH_MIRROR"),
                    help="base URL holding <subset>.tar.gz (http(s):// or file://; $LIBRISPEECH_MIRROR; "
                         "without either: https://www.openslr.org/resources/12)")
    dl.add_argument("--checksums", default=os.environ.get("LIBRISPEECH_CHECKSUMS"),
                    help="md5sum-style file (<md5>  <subset>.tar.gz) overriding the built-in table "
                         "($LIBRISPEECH_CHECKSUMS)")
    dl.add_argument("--keep-archive", action="store_true", help="keep <subset>.tar.gz after extraction")

    verify = command("verify", _verify, help="re-read a shard directory and check it against its index.json")
    verify.add_argument("dir", help="shard directory (the one holding index.json)")
    verify.add_argument("--workers", type=int, default=2, help="processes reading shards in parallel")

    index = command("index", _index, help="record each sample's byte range in index.json (shards written "
                                           "before offsets; no audio is read or rewritten) and write the "
                                           "columnar index")
    index.add_argument("dirs", nargs="+", metavar="DIR", help="local shard directory (the one holding "
                                                              "index.json)")

    bench = command("bench", _bench,
                    help="benchmarks: one JSON line per measurement, ratios measured side by side")
    bench.add_argument("what", choices=("loader", "shard", "step", "scaling", "gpu", "plan"),
                       help="what to measure")
    bench.add_argument("--work-dir", default="work/bench",
                       help="where the benchmark corpus and shards are kept")
    bench.add_argument("--utterances", type=int, default=300, help="size of the LibriSpeech-shaped corpus")
    bench.add_argument("--workers", type=int, default=2,
                       help="loader workers (ours and the seed-style pipeline)")
    bench.add_argument("--size", choices=("tiny", "base"), default="tiny", help="step: model geometry")
    bench.add_argument("--batch-seconds", type=float, default=16.0, help="step: padded seconds per batch")
    bench.add_argument("--rounds", type=int, default=5, help="step: interleaved timing rounds")
    bench.add_argument("--steps", type=int, default=8,
                       help="step: steps per round; gpu: timed steps per variant")
    bench.add_argument("--warmup", type=int, default=3, help="gpu: untimed steps per variant (compilation)")
    bench.add_argument("--sweep", default="400,800,1600",
                       help="gpu: max_batch_seconds values to time (the last one also for the variants)")
    bench.add_argument("--quick", action="store_true",
                       help="gpu: time only the candidate variants (no data-wait run, sweep or memory "
                            "probe)")
    bench.add_argument("--probe-limit", type=float, default=20_000.0,
                       help="gpu: stop the largest-batch probe at this many seconds of worst-case audio")
    bench.add_argument("--hours", type=float, default=960.0, help="plan: hours of the synthetic corpus")
    bench.add_argument("--ranks", type=int, default=512, help="plan: ranks (one data stream each)")
    bench.add_argument("--config",
                       help="plan: the recipe whose data settings to plan with (default: the defaults)")
    bench.add_argument("--mix", action="store_true",
                       help="plan: the corpus as a mix of three parts (1, 0.5, 0.25)")
    bench.add_argument("--speed-perturb", action="store_true", help="plan: speed perturbation 0.9/1.0/1.1")
    bench.add_argument("--audio-s-per-gpu", type=float, default=11_200.0,
                       help="plan: training speed an epoch's length is reckoned at (audio seconds per GPU "
                            "second)")
    bench.add_argument("--resume-updates", type=int, default=10_000,
                       help="plan: the update a resume starts at")
    bench.add_argument("--epochs", type=int, default=3,
                       help="plan: epochs of updates over which reads are counted")

    command("config-docs", _config_docs, help="print the configuration reference (markdown)")

    fetch = command("fetch-model", _fetch_model,
                    help="download a hub model into a cache compute nodes can read "
                         "offline (prints its local path)")
    fetch.add_argument("name", help="hub id, e.g. facebook/wav2vec2-base")
    fetch.add_argument("--cache", required=True, help="the cache's root: HF_HOME=DIR on every node")

    model_help = ("HF export dir (e.g. RUN/final) or DeepSpeed checkpoint: RUN dir, RUN/checkpoints or a "
                  "step_* dir")
    config_help = "the run's config.yaml when --model is a checkpoint outside its run dir"
    transcribe = command("transcribe", _transcribe,
                         help="transcribe audio files (any soundfile format; long files chunked)")
    transcribe.add_argument("--model", required=True, help=model_help)
    transcribe.add_argument("--config", help=config_help)
    transcribe.add_argument("--json", action="store_true",
                            help="one JSON line per file, with word timestamps")
    transcribe.add_argument("--chunk-seconds", type=float, default=30.0,
                            help="files longer than this are chunked")
    transcribe.add_argument("--overlap-seconds", type=float, default=2.0,
                            help="context each chunk shares with its neighbour on each side (dropped from "
                                 "output)")
    transcribe.add_argument("files", nargs="+", help="audio files")

    evaluate = command("evaluate", _evaluate, help="WER/CER on shard sets, per utterance (JSONL) and per "
                                                   "set (stdout); runs under deepspeed/torchrun too")
    evaluate.add_argument("--model", required=True, help=model_help)
    evaluate.add_argument("--shards", action="append", required=True, help="shard directory (repeatable)")
    evaluate.add_argument("--out", help="per-utterance JSONL file")
    evaluate.add_argument("--config", help=config_help)
    evaluate.add_argument("--batch-seconds", type=float, default=100.0,
                          help="padded audio seconds per batch")
    evaluate.add_argument("--max-batch-size", type=int, default=64,
                          help="utterances per batch; models whose outputs padding changes (wav2vec2-base, "
                               "any model without attention mask: docs/evaluation.md) always take 1, as in "
                               "training")
    evaluate.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    evaluate.add_argument("--decoder", choices=("greedy", "beam"), default="greedy",
                          help="greedy: best path; beam: pyctcdecode's prefix beam search (with --lm: "
                               "shallow fusion)")
    evaluate.add_argument("--lm", help="KenLM n-gram (.arpa or .bin) for --decoder beam")
    evaluate.add_argument("--beam-width", type=int, default=100, help="beams kept by --decoder beam")
    evaluate.add_argument("--alpha", type=float, default=0.5, help="LM weight")
    evaluate.add_argument("--beta", type=float, default=1.0, help="word insertion bonus")
    evaluate.add_argument("--worst", type=int, default=10, help="list this many worst utterances on stderr")
    evaluate.add_argument("--shard-command", default="",
                          help="pipe:...{shard}... template, as data.shard_command")
    evaluate.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    lm = command("build-lm", _build_lm, help="n-gram LM (ARPA, optionally KenLM binary) from transcripts, "
                                             "for evaluate --decoder beam --lm; estimated by KenLM's lmplz")
    lm.add_argument("--out", required=True, help="ARPA file to write")
    lm.add_argument("--shards", action="append", help="shard set whose transcripts to use (repeatable)")
    lm.add_argument("--text", action="append",
                    help="text file, one sentence per line, used as written (repeatable)")
    lm.add_argument("--order", type=int, default=4, help="n-gram order (2-6)")
    lm.add_argument("--binary", help="also write KenLM's binary format here (loads much faster)")

    report = command("report", _report, help="plots (PNG) and report.md from a run's metrics.jsonl")
    report.add_argument("run_dir", help="the run's output_dir")
    report.add_argument("--out", help="output directory (default RUN_DIR/report)")

    export = command("export", _export, help="DeepSpeed checkpoint (any ZeRO stage) -> Hugging Face dir")
    export.add_argument("--checkpoint", required=True, help="RUN dir, RUN/checkpoints or a step_* dir")
    export.add_argument("--tag", help="checkpoint tag (default: latest)")
    export.add_argument("--out", required=True, help="Hugging Face directory to write")
    export.add_argument("--config", help="the run's config.yaml (default: next to the checkpoints/ dir)")
    return parser


_QUIET_LOADS = ("export", "transcribe", "evaluate")
"""Commands that load models without transformers' per-load bars and report (:func:`quiet_model_loading`)."""
_OWN_CONSOLE = ("train", "demo")
"""Commands whose stdout is a live console (logs, progress bar) rather than output that tools read."""


def run() -> NoReturn:
    """The ``w2v-dist`` console command."""
    exit_with(main())


def exit_with(code: int) -> NoReturn:
    """End the process with ``code`` as a rank must, when it started a process group
    (:func:`w2v_dist.process.end_process`)."""
    if "w2v_dist.process" not in sys.modules:  # only process.py starts a group; no need to import DeepSpeed
        sys.exit(code)
    from w2v_dist.process import end_process

    end_process(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _OWN_CONSOLE:
        return int(args.func(args))
    with command_stdout():  # what libraries print (DeepSpeed's warnings among it) goes to stderr
        if args.command in _QUIET_LOADS:
            with quiet_model_loading():
                return int(args.func(args))
        return int(args.func(args))
