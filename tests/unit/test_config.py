from __future__ import annotations

import dataclasses
import math
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from w2v_dist.config import (
    _BOUNDS,
    _CHOICES,
    _SECTIONS,
    Config,
    ConfigError,
    field_docs,
    load_config,
    save_config,
)
from w2v_dist.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.output_dir


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_steps: 7\n  seed: 3\ndata:\n  dev_shards:\n    a: /x\n")
    cfg = load_config(path, ["trainer.max_steps=9", "optim.lr=0.5"])
    assert (cfg.trainer.max_steps, cfg.trainer.seed, cfg.optim.lr) == (9, 3, 0.5)
    assert cfg.data.dev_shards == {"a": "/x"}
    assert cfg.model.freeze_feature_encoder is True  # untouched default


def test_typo_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("trainer:\n  max_step: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "trainer.max_step" in str(err.value) and str(path) in str(err.value)
    assert "did you mean 'trainer.max_steps'" in str(err.value)


def test_typo_in_override_is_named() -> None:
    with pytest.raises(ConfigError, match="logging.wandb.mdoe.*did you mean 'logging.wandb.mode'"):
        load_config(None, ["logging.wandb.mdoe=offline"])


@pytest.mark.parametrize("override, key", [
    ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_steps=many", "trainer.max_steps"),
    ("schedule.phase_ratio=[0.5,0.5,0.5]", "schedule.phase_ratio"),
    ("data.shard_command=curl x", "data.shard_command"),
    ("model.layerdrop=1.5", "model.layerdrop"),
    ("model.attention=flash3", "model.attention"),
    ("data.num_workers=-2", "data.num_workers"),
])
def test_bad_values_fail_at_load_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("trainer.collective_timeout_minutes=0", "'trainer.collective_timeout_minutes' from the command line: "
                                             "must be > 0, got 0.0"),
    ("trainer.collective_timeout_minutes=-1", "'trainer.collective_timeout_minutes' from the command line: "
                                              "must be > 0, got -1.0"),
    ("optim.lr=inf", "'optim.lr' from the command line: every number must be finite, got inf"),
    ("optim.lr=nan", "'optim.lr' from the command line: every number must be finite, got nan"),
    ("data.prefetch_factor=0", "'data.prefetch_factor' from the command line: must be > 0, got 0"),
    ("optim.betas=[2,3]",
     "'optim.betas' from the command line: every value must be in [0, 1), got [2.0, 3.0]"),
    ("optim.eps=0", "'optim.eps' from the command line: must be > 0"),
    ("trainer.seed=-1", "'trainer.seed' from the command line: must be in [0, 4294967295]"),
    ("schedule.phase_ratio=[0.5,0.5]", "'schedule.phase_ratio' from the command line: TupleConfig length 2 "
                                       "does not match type hint length 3; expected tuple[float, float, "
                                       "float] (tri_stage: fractions of trainer.max_steps"),
    ("trainer.max_steps=many", "'trainer.max_steps' from the command line: Value 'many' of type 'str' could "
                               "not be converted to Integer; expected int"),
    ("data.dev_shards={a: x", "cannot parse the value of 'data.dev_shards' from the command line ('{a: x'): "
                              "did not find expected ',' or '}'"),
    ("data.max_seconds=0.3", "'data.min_seconds' (its default) and 'data.max_seconds' from the command "
                             "line: need min_seconds < max_seconds, got 0.5, 0.3"),
])
def test_bad_values_name_the_key_its_source_and_what_is_expected(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_each_value_is_blamed_on_its_own_source(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .inf\ndata:\n  max_seconds: 20.0\n")
    with pytest.raises(ConfigError,
                       match=f"bad value for 'optim.lr' from {path}: every number must be finite"):
        load_config(path)
    with pytest.raises(ConfigError, match="bad value for 'optim.lr' from the command line: must be > 0"):
        load_config(path, ["optim.lr=0"])
    with pytest.raises(ConfigError, match="bad value for 'trainer.max_steps' from the command line"):
        load_config(path, ["optim.lr=1e-4", "trainer.max_steps=0"])
    with pytest.raises(ConfigError, match=f"'data.min_seconds' from the command line and 'data.max_seconds' "
                                          f"from {path}: need min_seconds < max_seconds"):
        load_config(path, ["optim.lr=1e-4", "data.min_seconds=30"])


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  max_steps: 7\n  seed: [1\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:4:6: YAML syntax error: did not find expected ',' or ']' "
                                     "(while parsing a flow sequence that starts at 3:9)"), err.value


def _numeric_keys(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Every key whose type holds a number (int or float, alone or in a list, tuple or dict), with its
    type."""
    found = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.type, str) and f.type in _SECTIONS:
            found |= _numeric_keys(_SECTIONS[f.type], f"{prefix}{f.name}.")
        elif re.search(r"\b(int|float)\b", str(f.type)):
            found[f"{prefix}{f.name}"] = str(f.type)
    return found


def test_every_numeric_key_has_a_range() -> None:
    unchecked = sorted(set(_numeric_keys()) - set(_BOUNDS) - set(_CHOICES))
    assert not unchecked, f"give these keys bounds in w2v_dist/config.py (_BOUNDS): {unchecked}"


def _with(default: object, element: object) -> str:
    """An override value shaped like ``default`` (a scalar, a list, a tuple or a dict) holding
    ``element``."""
    if isinstance(default, dict):
        return f"{{/data/x: {element}}}"
    if isinstance(default, (list, tuple)):
        return str([element, *list(default)[1:]])
    return str(element)


@pytest.mark.parametrize("key", sorted(_BOUNDS))
def test_every_range_refuses_what_lies_outside_it(key: str) -> None:
    bounds, default = _BOUNDS[key], operator.attrgetter(key)(Config())
    outside = [bounds.low if bounds.open_low else bounds.low - 1,
               bounds.high if bounds.open_high else bounds.high + 1]
    for value in [v for v in outside if math.isfinite(v)]:
        value = int(value) if "float" not in _numeric_keys()[key] else value
        with pytest.raises(ConfigError, match=f"bad value for '{re.escape(key)}' from the command line: "):
            load_config(None, [f"{key}={_with(default, value)}"])


@pytest.mark.parametrize("key", sorted(k for k, kind in _numeric_keys().items() if "float" in kind))
def test_every_float_must_be_finite(key: str) -> None:
    default = operator.attrgetter(key)(Config())
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError,
                           match=f"'{re.escape(key)}' from the command line: every number must be finite"):
            load_config(None, [f"{key}={_with(default, value)}"])


def test_required_key_names_exist() -> None:
    cfg = load_config(None, ["output_dir=o", "data.train_shards=t", "data.dev_shards={d: x}",
                             "model.name_or_path=m", "trainer.max_steps=1", "trainer.eval_every=1",
                             "trainer.save_every=1", "trainer.seed=1", "logging.wandb.mode=offline"])
    assert cfg.data.dev_shards == {"d": "x"} and cfg.logging.wandb.mode == "offline"


def test_every_field_has_a_docstring() -> None:
    for cls in [Config, *_SECTIONS.values()]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "base.yaml", ["trainer.max_steps=11"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_deepspeed_json_is_derived_and_extra_merges() -> None:
    cfg = load_config(REPO / "configs" / "base.yaml", ["optim.grad_clip=2.0",
                                                         "deepspeed.extra={zero_optimization: "
                                                         "{overlap_comm: true}}"])
    ds = deepspeed_config(cfg, grad_accum=4)  # base.yaml's 8 data streams on 2 ranks
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 2.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}


def test_a_mix_is_checked_at_load() -> None:
    assert (load_config(None, ["data.train_mix={/d/a: 0.5, /d/b: 1.0}"]).data.train_mix == {"/d/a": 0.5,
                                                                                            "/d/b": 1.0})
    with pytest.raises(ConfigError, match="train_shards or data.train_mix, not both"):
        load_config(None, ["data.train_shards=/d/a", "data.train_mix={/d/b: 1.0}"])
    with pytest.raises(ConfigError, match=r"every value must be in \(0, 1\], got {'/d/b': 2.0}"):
        load_config(None, ["data.train_mix={/d/b: 2.0}"])
    with pytest.raises(ConfigError, match="shard_command"):
        load_config(None, ["data.train_mix={/d/b: 1.0}", "data.shard_command=pipe:cat {shard}"])


def test_the_global_batch_is_given_once() -> None:
    with pytest.raises(ConfigError, match="trainer.grad_accum.*update_seconds"):
        load_config(REPO / "configs" / "base.yaml", ["trainer.grad_accum=4"])
    with pytest.raises(ConfigError, match="whole multiple of data.max_batch_seconds"):
        load_config(None, ["trainer.update_seconds=300", "data.max_batch_seconds=200"])


def test_extra_may_not_redefine_owned_keys() -> None:
    with pytest.raises(ConfigError, match="deepspeed.extra"):
        load_config(None, ["deepspeed.extra={gradient_clipping: 5}"])


def test_dump_config_cli_prints_resolved_yaml() -> None:
    # It prints the config whether or not its data exists here (tests/unit/test_inputs.py: it exits 2 if
    # not).
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/debug.yaml", "--dump-config",
                          "trainer.max_steps=3"], cwd=REPO, capture_output=True, text=True).stdout
    assert "max_steps: 3" in out and "train_shards: work/demo/shards/train-clean-100" in out


def test_cli_reports_config_errors_with_exit_code_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "w2v_dist", "train", "--config", "configs/debug.yaml",
                           "trainer.max_stesp=3"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'trainer.max_steps'" in proc.stderr


def test_configuration_reference_in_docs_is_current() -> None:
    from w2v_dist.config import config_reference

    assert (REPO / "docs" / "configuration.md").read_text().strip() == config_reference().strip(), \
        "regenerate with: w2v-dist config-docs > docs/configuration.md"


def test_values_from_the_environment_are_written_unresolved_and_secrets_redacted(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("W2V_TEST_SHARDS_TOKEN", "tok-0123456789abcdefXYZ")
    cfg = load_config(None, ["data.train_shards=https://u:${oc.env:W2V_TEST_SHARDS_TOKEN}@host/train",
                             "data.shard_command='pipe:curl -H \"Authorization: Bearer literal-0123456789\" "
                             "https://host/{shard}'"])
    assert cfg.data.train_shards == "https://u:tok-0123456789abcdefXYZ@host/train"  # resolved for the run
    save_config(cfg, tmp_path / "config.yaml")
    written = (tmp_path / "config.yaml").read_text()
    assert "train_shards: https://u:${oc.env:W2V_TEST_SHARDS_TOKEN}@host/train" in written
    assert "tok-0123456789abcdefXYZ" not in written and "literal-0123456789" not in written
    assert load_config(tmp_path / "config.yaml").data.train_shards == cfg.data.train_shards
    monkeypatch.delenv("W2V_TEST_SHARDS_TOKEN")
    with pytest.raises(ConfigError, match="W2V_TEST_SHARDS_TOKEN"):
        load_config(None, ["data.train_shards=${oc.env:W2V_TEST_SHARDS_TOKEN}"])


def test_a_dict_given_on_the_command_line_replaces_the_files_dict() -> None:
    """base.yaml names dev-clean and dev-other; pointing the recipe at one's own corpus must not keep
    them."""
    cfg = load_config(REPO / "configs/base.yaml", ["data.dev_shards={mine: /x/dev}"])
    assert cfg.data.dev_shards == {"mine": "/x/dev"}
    # one entry still adds one
    cfg = load_config(REPO / "configs/base.yaml", ["data.dev_shards.mine=/x/dev"])
    assert cfg.data.dev_shards == {"dev-clean": "/data/shards/dev-clean",
                                   "dev-other": "/data/shards/dev-other", "mine": "/x/dev"}
    cfg = load_config(REPO / "configs/base.yaml", ["trainer={max_steps: 7}"])  # a section still merges
    assert cfg.trainer.max_steps == 7 and cfg.trainer.log_every == load_config(REPO / "configs/base.yaml"
                                                                                ).trainer.log_every


def test_tilde_deletes_an_entry_or_every_entry_and_overrides_apply_in_order() -> None:
    base = REPO / "configs/base.yaml"
    assert load_config(base, ["~data.dev_shards.dev-other"]).data.dev_shards == {"dev-clean":
                                                                                   "/data/shards/dev-clean"}
    assert load_config(base, ["~data.dev_shards"]).data.dev_shards == {}
    assert load_config(base, ["~data.dev_shards", "data.dev_shards.a=/a"]).data.dev_shards == {"a": "/a"}
    assert load_config(base, ["data.dev_shards.a=/a", "~data.dev_shards.a"]).data.dev_shards["dev-other"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.dev_shards.dev-other=null"],
     "bad value for 'data.dev_shards.dev-other' from the command line: an entry cannot be null; to delete "
     "it write ~data.dev_shards.dev-other"),
    (["~data.dev_shards.nope"],
     "cannot delete 'data.dev_shards.nope' from the command line: 'data.dev_shards' has no entry 'nope' (it "
     "has ['dev-clean', 'dev-other'])"),
    (["~trainer.max_steps"], "cannot delete 'trainer.max_steps' from the command line: only the entries of "
                             "['data.train_mix', 'data.dev_shards', 'deepspeed.extra'] can be deleted"),
    (["~data.dev_shards=x"], "overrides must look like key=value (or ~key to delete an entry)"),
    (["checkpoint.best_metric=dev-other", "~data.dev_shards.dev-other"],
     "'dev-other' is not a key of data.dev_shards ['dev-clean']"),
])
def test_replace_and_delete_errors_are_one_line_without_omegaconf_internals(overrides: list[str],
                                                                            message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/base.yaml", overrides)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert not re.search(r"full_key|object_type|omegaconf|Incompatible value", text, re.IGNORECASE), text
