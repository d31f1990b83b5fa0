"""What a run reads, checked before any process group, model or output exists: every shard set's directory
and index, and the checkpoint a relaunch would resume. Each problem is one line that names its key, and all
of them are reported at once: by ``--dump-config``, and by every rank before it starts
(:func:`w2v_dist.run.build_run`).

Remote locations (``http(s)://``) are not probed here: a probe per rank per set would add a round trip to
every start and could refuse a server that answers GET but not HEAD. Every rank reads their index next, at
startup, and a failure names the URL (credentials masked).
"""

from __future__ import annotations

from pathlib import Path

from w2v_dist.config import Config, DataConfig
from w2v_dist.data.index import INDEX_NAME, ShardIndexError, is_remote, load_shard_set, read_vocab
from w2v_dist.redact import redact


class InputError(ValueError):
    """What a run would read is missing or unusable; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"the run cannot start ({len(problems)} problem{'s' * (len(problems) > 1)}):\n"
                         + "\n".join(f"  {problem}" for problem in problems))
        self.problems = problems


def check_inputs(cfg: Config) -> None:
    """Raise :class:`InputError` listing every problem :func:`input_problems` finds."""
    if problems := input_problems(cfg):
        raise InputError(problems)


def input_problems(cfg: Config) -> list[str]:
    """One line per problem with the shard sets ``cfg`` trains and evaluates on, and with its resume."""
    data = cfg.data
    problems = []
    if not data.train_shards and not data.train_mix:
        problems.append("data.train_shards is not set: point it at a directory written by 'w2v-dist shard' "
                        "(or give data.train_mix)")
    sets = [("data.train_shards", data.train_shards, data.shard_command)] if data.train_shards else []
    sets += [("data.train_mix", location, "") for location in data.train_mix]
    sets += [(f"data.dev_shards.{name}", location, data.shard_command)
             for name, location in data.dev_shards.items()]
    for key, location, shard_command in sets:
        problems += [f"{key}: {problem}" for problem in shard_set_problems(location, shard_command)]
    return problems + resume_problems(cfg)


def train_vocabulary(data: DataConfig) -> dict[str, int] | None:
    """The training shards' vocabulary (:func:`~w2v_dist.data.index.read_vocab`), for training and for a
    model rebuilt from a checkpoint alike: ``data.train_mix``'s, whose sets must share one, else
    ``data.train_shards``'; ``None`` when the shards have none (or none are set)."""
    locations = list(data.train_mix) or ([data.train_shards] if data.train_shards else [])
    vocabularies = {location: read_vocab(location) for location in locations}
    for location, vocabulary in vocabularies.items():
        if vocabulary != vocabularies[locations[0]]:
            raise ValueError(f"data.train_mix: {redact(location)} has another vocabulary than "
                             f"{redact(locations[0])}: shard the corpora of one mix with the same "
                             "--alphabet (or vocab.json)")
    return vocabularies[locations[0]] if locations else None


def shard_set_problems(location: str, shard_command: str = "") -> list[str]:
    """What keeps a local shard set from being read: no directory, no readable or valid ``index.json``, no
    utterances, shards it lists that are not on this node. Remote sets are not probed (see the module
    docstring)."""
    if is_remote(location):
        return []
    directory = Path(location)
    if not directory.is_dir():
        return [f"{location} {'is not a directory' if directory.exists() else 'does not exist'}"]
    try:
        shards = load_shard_set(location, shard_command)
    except ShardIndexError as err:
        return [str(err)]
    except (KeyError, TypeError, ValueError) as err:
        return [f"{directory / INDEX_NAME} is malformed ({type(err).__name__}: {err})"]
    missing = [url for url in shards.urls if not is_remote(url) and not Path(url).is_file()]
    if missing:
        names = ", ".join(Path(url).name for url in missing[:3]) + (", ..." if len(missing) > 3 else "")
        return [f"{len(missing)} of the {len(shards.urls)} shards listed in {directory / INDEX_NAME} are "
                f"not readable here: {names}"]
    return []


def resume_problems(cfg: Config) -> list[str]:
    """A resume that would have nothing to do: ``trainer.max_steps`` below the step of the checkpoint it
    would resume (the run would only export that checkpoint again, under the name of a shorter run)."""
    if not cfg.checkpoint.resume or not (Path(cfg.output_dir) / "checkpoints").is_dir():
        return []
    from w2v_dist.checkpoint.commit import Checkpointer  # imports DeepSpeed: only when there is a checkpoint
    from w2v_dist.dist import World

    checkpointer = Checkpointer(Path(cfg.output_dir), World(0, 0, 1), keep_last=1)
    tag = checkpointer.resumable_tag()
    if tag is None:
        return []
    step = checkpointer.saved_run(tag).step
    if step <= cfg.trainer.max_steps:
        return []
    return [f"trainer.max_steps: {cfg.trainer.max_steps} is below step {step} of the checkpoint this run "
            f"would resume ({checkpointer.root / tag}): raise trainer.max_steps to train on, export that "
            f"checkpoint ('w2v-dist export --checkpoint {cfg.output_dir} --out DIR'), or use a new "
            f"output_dir"]
