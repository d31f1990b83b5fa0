"""The README's "Real runs" block, run as written: download (from a local mirror of synthetic LibriSpeech
archives), shard every set, verify, dump the config, train, evaluate test-clean, report, export; then the
export's model card example, as written.

Only what a user would change is changed: ``/data`` (in the block and in ``configs/base.yaml``, copied), the
GPU count (one CPU rank, on a free port: other tests share the machine), the run's sizes and the model (a
tiny random one) through ``key=value`` overrides, and the mirror through
``LIBRISPEECH_MIRROR``/``LIBRISPEECH_CHECKSUMS``. ``PATH`` lacks ``.venv/bin``: the block's own ``source
.venv/bin/activate`` must put the commands there."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support.launch import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SUBSETS = ("train-clean-100", "dev-clean", "dev-other", "test-clean")
SIZES = ["data.max_batch_seconds=8", "trainer.update_seconds=8", "data.num_workers=1",
         "data.min_seconds=0.2", "model.mask_feature_length=8", "trainer.max_steps=2",
         "trainer.eval_every=2", "trainer.save_every=2", "trainer.log_every=1"]


def readme_block() -> list[str]:
    """The commands of the fenced bash block under "## Real runs", comments removed."""
    section = (REPO / "README.md").read_text().split("## Real runs\n", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "README.md: no bash block under '## Real runs'"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line]


def on_data(text: str, data: Path) -> str:
    return re.sub(r"(?<![\w/.])/data(?=/|\s|$)", str(data), text)


@pytest.fixture(scope="module")
def mirror(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<subset>.tar.gz`` laid out like openslr's, for the sets the README names (dev-other and test-clean
    hold dev-clean's audio under their own names) and their ``md5sum.txt``."""
    served = tmp_path_factory.mktemp("mirror")
    sums = []
    for subset in SUBSETS:
        source = corpus / ("train-clean-100" if subset == "train-clean-100" else "dev-clean")
        archive = served / f"{subset}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(source.rglob("*")):
                tar.add(path, f"LibriSpeech/{subset}/{path.relative_to(source).as_posix()}", recursive=False)
        sums.append(f"{hashlib.md5(archive.read_bytes()).hexdigest()}  {archive.name}\n")
    (served / "md5sum.txt").write_text("".join(sums))
    return served


@pytest.fixture(scope="module")
def readme_run(mirror: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path,
                                                                                                  Path]:
    """Runs the block in a fresh directory laid out like the checkout; returns (that directory, the data
    root)."""
    work = tmp_path_factory.mktemp("readme")
    data = work / "data"
    for name in ("train.py", ".venv"):
        (work / name).symlink_to(REPO / name)
    (work / "configs").mkdir()
    (work / "configs" / "base.yaml").write_text(on_data((REPO / "configs" / "base.yaml").read_text(), data))
    script = ["PS4='+ ${EPOCHREALTIME} '", "set -euxo pipefail"]  # each command's start time, in the trace
    for line in readme_block():
        line = on_data(line, data).replace("--num_gpus 8", f"--num_gpus 1 --master_port {free_port()}")
        if "train.py --config configs/base.yaml" in line:
            line += " " + " ".join([f"model.name_or_path={tiny_model}", *SIZES])
        script.append(line)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"PATH": "/usr/local/bin:/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "LIBRISPEECH_MIRROR": mirror.as_uri(),
            "LIBRISPEECH_CHECKSUMS": str(mirror / "md5sum.txt")}
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    if os.environ.get("W2V_README_TRACE"):
        Path(os.environ["W2V_README_TRACE"]).write_text(proc.stderr)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    return work, data


def test_the_readme_real_run_block_runs_as_written(readme_run: tuple[Path, Path]) -> None:
    work, data = readme_run
    for subset in SUBSETS:
        assert (data / "shards" / subset / "index.json").is_file(), subset
    run = work / "runs" / "base_100h"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    evals = [r for r in records if "dev/dev-clean/wer" in r]
    assert evals and "dev/dev-other/wer" in evals[-1]  # both of base.yaml's dev sets, sharded by the block
    test_clean = json.loads((data / "shards" / "test-clean" / "index.json").read_text())["totals"]["written"]
    assert len((work / "test-clean.jsonl").read_text().splitlines()) == test_clean
    assert (run / "report" / "report.md").is_file()
    assert (work / "base_100h-latest" / "model.safetensors").is_file()


def test_the_model_cards_example_runs_as_written(readme_run: tuple[Path, Path]) -> None:
    """Only the two placeholders are replaced; ``PATH`` has no ffmpeg (nor does this machine)."""
    work, data = readme_run
    export = work / "base_100h-latest"
    card = (export / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S)
    assert code, "the model card has no python example"
    flac = next((data / "LibriSpeech" / "test-clean").rglob("*.flac"))
    example = code.group(1).replace("path/to/this/directory", str(export)).replace("audio.flac", str(flac))
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": "/nonexistent",
                                                                  "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", example], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines(), "the example printed no transcription"
