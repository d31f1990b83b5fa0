"""A command's stdout carries only what it promises (JSON lines, transcripts, a summary); libraries print to
stderr.

DeepSpeed logs through a handler bound to ``sys.stdout`` when it is imported, and warns about the accelerator
as it is imported, wherever the import happens (transformers' pipelines import it too); other libraries print
progress there as well. While a command runs under :func:`command_stdout`, ``sys.stdout`` *is*
``sys.stderr``, so whatever binds to or prints on stdout meanwhile reaches stderr, and the command writes its
own output with :func:`emit`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

_outputs: list[TextIO] = []


@contextlib.contextmanager
def command_stdout() -> Iterator[None]:
    """Run a command with stdout sent to stderr; :func:`emit` still writes to the stdout it was given."""
    _outputs.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _outputs.pop()


def emit(text: str, end: str = "\n") -> None:
    """Part of the command's output, flushed at once (a pipe's reader sees each line as it is written)."""
    print(text, end=end, file=_outputs[-1] if _outputs else sys.stdout, flush=True)


@contextlib.contextmanager
def quiet_model_loading() -> Iterator[None]:
    """transformers' per-load "Loading weights" bars and its load report, off while a command runs that loads
    models it checks itself (``export``: our own checkpoint, whose report lists SpecAugment's embedding as
    unexpected whenever the export's config has no masks; ``transcribe``, ``evaluate``)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
