from __future__ import annotations

import pytest

from w2v_dist.redact import redact, redact_values


@pytest.mark.parametrize(("text", "expected"), [
    ("https://alice:s3cr3t-pw@data.example.org/shards", "https://***@data.example.org/shards"),
    ("https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AKIA/1&X-Amz-Signature=abc123&part=2",
     "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=***&X-Amz-Signature=***&part=2"),
    ("https://acct.blob.core.windows.net/c/x.tar?sig=Zm9vYmFy&token=t0k3n",
     "https://acct.blob.core.windows.net/c/x.tar?sig=***&token=***"),
    ('pipe:curl -H "Authorization: Bearer abcdefghij0123" https://h/{shard}',
     'pipe:curl -H "Authorization: Bearer ***" https://h/{shard}'),
    ("hf token hf_abcdefghijklmnopqrstuvwxyz012345 here", "hf token *** here"),
    ("ghp_0123456789abcdefghijABCDEFGHIJ and AKIAIOSFODNN7EXAMPLE", "*** and ***"),
])
def test_credentials_and_token_shapes_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(redact(text)) == expected  # idempotent


def test_values_of_secret_named_environment_variables_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789abcdefXYZ")
    monkeypatch.setenv("SHORT_KEY", "abc")  # too short to redact without hitting ordinary text
    assert redact("pipe:fetch --auth tok-0123456789abcdefXYZ {shard}") == "pipe:fetch --auth *** {shard}"
    assert (redact_values({"a": ["x tok-0123456789abcdefXYZ", 3], "b": ("abc",)}) == {"a": ["x ***", 3],
                                                                                      "b": ("abc",)})


@pytest.mark.parametrize("text", ["/data/LibriSpeech/train-clean-100", "s3://bucket/prefix/{shard}",
                                  "pipe:aws s3 cp s3://b/{shard} -", "https://host:8080/shards/index.json",
                                  "1.0e-3", "step_00000004", "dev/dev-clean/wer"])
def test_ordinary_values_are_left_alone(text: str) -> None:
    assert redact(text) == text
