"""coordinator.toml: upstreams, aliases, task routes, dispatch limits; every mistake named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import (
    ConfigError,
    DispatchConfig,
    load_config,
    parse_config,
    resolve_config,
)
from coordinator.routing import parse_route

GOOD = """
[dispatch]
max_tries = 2
queue_size = 0
deadline_s = 30

[aliases]
fast-chat = ["smollm2", "gpt-4o-mini"]
one = "smollm2"

[routes]
summarize = ["fast-chat", "big"]

[[upstream]]
name = "openai"
base_url = "https://api.example.com/v1/"
api_key_env = "MG_TEST_KEY"
models = { smollm2 = "gpt-4o-mini", big = "gpt-4o" }
price_per_1k_prompt = 0.15
price_per_1k_completion = 0.6
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def test_a_full_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MG_TEST_KEY", "sk-secret-value")
    config = load_config(write(tmp_path, GOOD))
    (up,) = config.upstreams
    assert up.base_url == "https://api.example.com/v1"
    assert up.api_key == "sk-secret-value"
    assert up.models == {"smollm2": "gpt-4o-mini", "big": "gpt-4o"}
    assert (up.price_per_1k_prompt, up.price_per_1k_completion) == (0.15, 0.6)
    assert config.dispatch == DispatchConfig(max_tries=2, queue_size=0, deadline_s=30.0)
    assert config.aliases["one"] == ["smollm2"]
    routing = config.routing()
    assert routing.resolve(parse_route("qg://task=summarize")) == ["smollm2", "gpt-4o-mini", "big"]
    assert routing.resolve(parse_route("fast-chat")) == ["smollm2", "gpt-4o-mini"]


def test_the_upstream_key_is_never_in_a_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             ) -> None:
    monkeypatch.setenv("MG_TEST_KEY", "sk-secret-value")
    config = load_config(write(tmp_path, GOOD))
    assert "sk-secret-value" not in repr(config)
    assert "sk-secret-value" not in str(config.upstreams)


def test_the_key_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "up.key").write_text("sk-from-file\n")
    text = GOOD.replace('api_key_env = "MG_TEST_KEY"', 'api_key_file = "up.key"')
    assert load_config(write(tmp_path, text)).upstreams[0].api_key == "sk-from-file"


@pytest.mark.parametrize(("change", "message"), [
    (('api_key_env = "MG_TEST_KEY"', 'api_key = "sk-inline"'), "not in the file"),
    (('api_key_env = "MG_TEST_KEY"', 'api_key_env = "MG_TEST_UNSET"'), "MG_TEST_UNSET is not set"),
    (('api_key_env = "MG_TEST_KEY"', 'api_key_file = "missing.key"'), "cannot read"),
    (('base_url = "https://api.example.com/v1/"', 'base_url = "ftp://x"'), "base_url"),
    (("models = { smollm2", "modelz = { smollm2"), "unknown key 'modelz'"),
    (("max_tries = 2", "max_tries = -1"), "dispatch.max_tries"),
    (("max_tries = 2", "max_retries = 2"), "unknown key 'max_retries'"),
    (("max_tries = 2", "max_tries = 2.5"), "dispatch.max_tries: expected a whole number, not 2.5"),
    (('one = "smollm2"', "one = []"), "aliases.one"),
    (("[routes]", "[route]"), "unknown section 'route'"),
    (("price_per_1k_prompt = 0.15", 'price_per_1k_prompt = "cheap"'), "expected a number"),
])
def test_mistakes_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            change: tuple[str, str], message: str) -> None:
    monkeypatch.setenv("MG_TEST_KEY", "sk")
    monkeypatch.delenv("MG_TEST_UNSET", raising=False)
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(("section", "key"), [
    ("dispatch", "queue_size"), ("dispatch", "node_slots"), ("relay", "per_node"),
    ("stream", "tick_streams")])
def test_a_whole_number_setting_refuses_a_fraction(section: str, key: str) -> None:
    """2.5 (or 2.0) is refused as the node's config refuses it, never cut to 2."""
    for value in (2.5, 2.0, "2"):
        with pytest.raises(ConfigError, match=f"{section}.{key}: expected a whole number"):
            parse_config({section: {key: value}})
    assert getattr(getattr(parse_config({section: {key: 2}}), section), key) == 2


def test_not_toml_and_a_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[[upstream]\nname ="))
    with pytest.raises(ConfigError, match="cannot read config"):
        resolve_config(tmp_path / "nope.toml")


def test_two_upstreams_of_one_name_are_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MG_TEST_KEY", "sk")
    section = GOOD[GOOD.index("[[upstream]]"):]
    with pytest.raises(ConfigError, match="defined twice"):
        load_config(write(tmp_path, GOOD + section))


@pytest.mark.parametrize(("text", "says"), [
    ("[routes]\nsummarize = 3\n", "routes.summarize"),
    ("[stream]\ntick_streams = 2.5\n", "stream.tick_streams: expected a whole number, not 2.5"),
])
def test_serve_refuses_a_bad_config_before_listening(tmp_path: Path, text: str,
                                                     says: str) -> None:
    path = write(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--state-dir", str(tmp_path / "s"),
         "--config", str(path), "--api-port", "1", "--tunnel-port", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert f"error: config {path}: {says}" in result.stderr
