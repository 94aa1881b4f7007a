"""OpenAI's request schema: every bad value is a 400 naming its param in OpenAI's words."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshgate.openai import OpenAIError, context_exceeded, parse

USER = [{"role": "user", "content": "hi"}]


def refusal(body: Any, endpoint: str = "chat/completions") -> OpenAIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(OpenAIError) as caught:
        parse(raw, endpoint)
    return caught.value


@pytest.mark.parametrize(
    ("extra", "param", "code", "words"),
    [
        ({"max_tokens": -1}, "max_tokens", "integer_below_min_value",
         "Expected a value >= 1, but got -1 instead."),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value", ">= 1"),
        ({"max_tokens": "ten"}, "max_tokens", "invalid_type",
         "expected an integer, but got a string instead"),
        ({"max_tokens": 10**30}, "max_tokens", "integer_above_max_value", "<= 2147483647"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type", "got a decimal"),
        ({"max_tokens": True}, "max_tokens", "invalid_type", "got a boolean"),
        ({"max_completion_tokens": -5}, "max_completion_tokens", "integer_below_min_value", ""),
        ({"temperature": 5}, "temperature", "decimal_above_max_value",
         "Expected a value <= 2, but got 5 instead."),
        ({"temperature": -0.5}, "temperature", "decimal_below_min_value", ">= 0"),
        ({"top_p": 1.5}, "top_p", "decimal_above_max_value", "<= 1"),
        ({"n": 0}, "n", "integer_below_min_value", ">= 1"),
        ({"n": 500}, "n", "integer_above_max_value", "<= 128"),
        ({"presence_penalty": 3}, "presence_penalty", "decimal_above_max_value", "<= 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "decimal_below_min_value", ">= -2"),
        ({"top_logprobs": 21}, "top_logprobs", "integer_above_max_value", "<= 20"),
        ({"logit_bias": {"15": 101}}, "logit_bias.15", "decimal_above_max_value", "<= 100"),
        ({"stop": 3}, "stop", "invalid_type", "a string or an array of strings"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length", "length 5"),
        ({"stream": "yes"}, "stream", "invalid_type", "expected a boolean"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
         "invalid_type", "expected a boolean"),
        ({"seed": "x"}, "seed", "invalid_type", "expected an integer"),
        ({"tool_choice": 5}, "tool_choice", "invalid_type", "'auto'"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value",
         "Supported values are: 'text', 'json_object' or 'json_schema'"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name",
         "missing_required_parameter", "Missing required parameter"),
        ({"temperature": None, "model": 7}, "model", "invalid_type", "expected a string"),
        ({"model": ""}, "model", "empty_string", "empty string"),
        ({"messages": []}, "messages", "empty_array", "Expected an array with minimum length 1"),
        ({"messages": "hi"}, "messages", "invalid_type", "expected an array"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type", "expected an object"),
        ({"messages": [{"role": "bob", "content": "x"}]}, "messages[0].role", "invalid_value",
         "'bob'"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter", ""),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter",
         ""),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
         "missing_required_parameter", ""),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type",
         "content parts"),
    ],
)
def test_each_bad_chat_value_is_a_400_naming_its_param(
    extra: dict[str, Any], param: str, code: str, words: str
) -> None:
    error = refusal({"model": "m", "messages": USER, **extra})
    assert (error.status, error.param, error.code) == (400, param, code)
    assert words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert "Input should" not in error.message  # pydantic's own words never leak


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_a_missing_field_is_named(missing: str) -> None:
    body = {"model": "m", "messages": USER}
    del body[missing]
    error = refusal(body)
    assert error.message == f"Missing required parameter: '{missing}'."
    assert error.param == missing


def test_unknown_fields_are_kept_as_openai_sdks_send_new_ones_first() -> None:
    parsed = parse(json.dumps({"model": "m", "messages": USER, "reasoning_effort": "low",
                               "store": True, "metadata": {"a": "b"}}).encode(),
                   "chat/completions")
    assert parsed.body["reasoning_effort"] == "low"
    assert parsed.model == "m"


def test_usage_chunk_is_asked_only_with_include_usage_on_a_stream() -> None:
    def asked(**extra: Any) -> bool:
        raw = json.dumps({"model": "m", "messages": USER, **extra}).encode()
        return parse(raw, "chat/completions").include_usage

    assert not asked(stream=True)
    assert not asked(stream=True, stream_options={"include_usage": False})
    assert not asked(stream=True, stream_options=None)
    assert not asked(stream_options={"include_usage": True})  # not a stream: no chunks
    assert asked(stream=True, stream_options={"include_usage": True})


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"not json", "could not parse the JSON body"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "m"} trailing', "could not parse"),
        (b'{"model": "m", "messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "nested too deeply"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
         "finite number"),
        (b"\xff\xfe", "could not parse"),
    ],
)
def test_malformed_bodies_are_400_never_500(raw: bytes, words: str) -> None:
    error = refusal(raw)
    assert error.status == 400
    assert words in error.message


def test_an_oversize_body_is_413() -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(b"{" + b" " * 100 + b"}", "chat/completions", max_bytes=50)
    assert caught.value.status == 413


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "prompt", "missing_required_parameter"),
        ({"model": "m", "prompt": {"a": 1}}, "prompt", "invalid_type"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens",
         "integer_below_min_value"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs", "integer_above_max_value"),
        ({"model": "m", "prompt": "x", "echo": "yes"}, "echo", "invalid_type"),
    ],
)
def test_completions_are_checked_against_their_schema(
    body: dict[str, Any], param: str, code: str
) -> None:
    error = refusal(body, "completions")
    assert (error.status, error.param, error.code) == (400, param, code)


def test_completions_take_every_prompt_shape_and_zero_max_tokens() -> None:
    for prompt in ("x", ["x", "y"], [1, 2, 3], [[1, 2], [3]], ""):
        raw = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 0}).encode()
        assert parse(raw, "completions").max_tokens == 0


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "input", "missing_required_parameter"),
        ({"model": "m", "input": ""}, "input", "invalid_value"),
        ({"model": "m", "input": ["a", ""]}, "input", "invalid_value"),
        ({"model": "m", "input": 5}, "input", "invalid_type"),
        ({"model": "m", "input": ["a"] * 2049}, "input", "array_above_max_length"),
        ({"model": "m", "input": "a", "encoding_format": "hex"}, "encoding_format",
         "invalid_value"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions", "integer_below_min_value"),
    ],
)
def test_embeddings_are_checked_against_their_schema(
    body: dict[str, Any], param: str, code: str
) -> None:
    error = refusal(body, "embeddings")
    assert (error.status, error.param, error.code) == (400, param, code)


def test_embeddings_take_a_list_and_base64_as_the_openai_sdk_sends() -> None:
    raw = json.dumps({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}).encode()
    parsed = parse(raw, "embeddings")
    assert parsed.body["input"] == ["a", "b"]
    assert not parsed.stream


def test_the_prompt_estimate_grows_with_the_prompt_and_never_undercounts_english() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 100  # ~1000 BPE tokens
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    assert parse(raw, "chat/completions").prompt_tokens_estimate() >= 1000
    raw = json.dumps({"model": "m", "prompt": "hi"}).encode()
    assert parse(raw, "completions").prompt_tokens_estimate() < 10


def test_context_exceeded_says_the_real_numbers_the_way_openai_does() -> None:
    error = context_exceeded(2048, 6000, 16, param="messages", hop="runner")
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    assert error.message == (
        "This model's maximum context length is 2048 tokens. However, you requested 6016 "
        "tokens (6000 in the messages, 16 in the completion). Please reduce the length of the "
        "messages or completion.")
