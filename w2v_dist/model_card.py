"""The README.md of every export (final/, best/, ``w2v-dist export``): Hugging Face model-card metadata with
the dev WER/CER as model-index results, how to load the model, and the training config it came from.

Its example reads the audio with soundfile (a dependency of transformers' audio extras and of this project)
and passes an array: a file name makes the pipeline decode with ffmpeg, which a fresh set-up does not
have."""

from __future__ import annotations

import re

import yaml

from w2v_dist.metrics import ErrorCounts

LIBRISPEECH_SPLIT = re.compile(r"^(dev|test)-(clean|other)$")


def dataset_entry(set_name: str) -> dict[str, str]:
    """LibriSpeech's dev/test sets under their Hub dataset id; any other set under its own name."""
    match = LIBRISPEECH_SPLIT.match(set_name)
    if match is None:
        return {"name": set_name, "type": set_name}
    split = "validation" if match.group(1) == "dev" else "test"
    return {"name": f"LibriSpeech ({set_name})", "type": "librispeech_asr", "config": match.group(2),
            "split": split}


def model_card(*, name: str, base_model: str, step: int, config_yaml: str,
               results: dict[str, ErrorCounts]) -> str:
    """``results``: dev set name → its error counts at ``step`` (empty when nothing was evaluated)."""
    index_results = [
        {"task": {"type": "automatic-speech-recognition", "name": "Speech recognition"},
         "dataset": dataset_entry(set_name),
         "metrics": [{"type": "wer", "name": "WER (%)", "value": round(100 * counts.wer, 2)},
                     {"type": "cer", "name": "CER (%)", "value": round(100 * counts.cer, 2)}]}
        for set_name, counts in results.items() if counts.words]
    metadata = {"tags": ["automatic-speech-recognition", "ctc", "w2v-dist"], "pipeline_tag":
                "automatic-speech-recognition", "library_name": "transformers",
                "model-index": [{"name": name, "results": index_results}]}
    rows = "".join(f"| {set_name} | {100 * c.wer:.2f} | {100 * c.cer:.2f} | {c.utterances} |\n"
                   for set_name, c in results.items() if c.words)
    scores = (f"| dev set | WER (%) | CER (%) | utterances |\n|---|---|---|---|\n{rows}" if rows
              else "No dev set was scored for this export.\n")
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False)}---

# {name}

A CTC speech recognizer fine-tuned from `{base_model}` with w2v-dist for {step} updates.
Every dev utterance is scored (greedy decoding; WER = summed word edits / summed reference words):

{scores}
## Use

```python
import soundfile as sf
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="path/to/this/directory")
audio, rate = sf.read("audio.flac", dtype="float32")  # 16 kHz mono, as in training; any soundfile format
print(asr({{"raw": audio, "sampling_rate": rate}})["text"])
```

or `w2v-dist transcribe --model path/to/this/directory audio.flac`, \
`w2v-dist evaluate --model ... --shards ...`.
The example passes an array: given a file name, the pipeline decodes it with ffmpeg, which it does not \
install.

## Training config

```yaml
{config_yaml.rstrip()}
```
"""
