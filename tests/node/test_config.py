"""Node config: defaults < TOML file < MESHGATE_* environment < command line; clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from node_agent.config import (
    DEFAULT_CONFIG,
    ConfigError,
    NodeOptions,
    example_config,
    load_options,
    option_names,
    read_config_file,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


GOOD = """
state_dir = "/srv/meshgate/node"
proxy_port = 12000
models = ["smol=/models/smol.gguf"]
model-dirs = ["/models", "/more-models"]
upstreams = ["big=http://127.0.0.1:8080/v1"]
n_ctx = 4096
telemetry_period = 1
connect = false
log_level = "debug"
"""


def test_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    opts = load_options({}, config=write(tmp_path, GOOD), env={})
    assert opts.state_dir == Path("/srv/meshgate/node")
    assert opts.proxy_port == 12000
    assert opts.models == ("smol=/models/smol.gguf",)
    assert opts.model_dirs == (Path("/models"), Path("/more-models"))
    assert opts.upstreams == ("big=http://127.0.0.1:8080/v1",)
    assert opts.n_ctx == 4096
    assert opts.telemetry_period == 1.0
    assert isinstance(opts.telemetry_period, float)
    assert opts.connect is False
    assert opts.log_level == "debug"
    assert opts.proxy_host == NodeOptions().proxy_host  # not in the file: the default


def test_precedence_is_cli_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy_port = 12000\nn_ctx = 4096\nlog_level = 'debug'\n")
    env = {"MESHGATE_PROXY_PORT": "13000", "MESHGATE_N_CTX": "8192"}
    opts = load_options({"proxy_port": 14000, "n_ctx": None}, config=path, env=env)
    assert opts.proxy_port == 14000  # CLI
    assert opts.n_ctx == 8192  # env (the CLI did not give it)
    assert opts.log_level == "debug"  # file
    assert opts.telemetry_period == 2.0  # default


def test_env_lists_bools_and_the_old_state_dir_name() -> None:
    env = {
        "MESHGATE_CONFIG": "",
        "MESHGATE_MODEL_DIRS": "/a, /b",
        "MESHGATE_CONNECT": "no",
        "MESHGATE_NODE_STATE": "/tmp/st",
        "MESHGATE_COORDINATOR_URL": "ws://10.0.0.1:8471",
    }
    opts = load_options({}, config=None, env=env)
    assert opts.model_dirs == (Path("/a"), Path("/b"))
    assert opts.connect is False
    assert opts.state_dir == Path("/tmp/st")
    assert opts.coordinator_url == "ws://10.0.0.1:8471"


def test_empty_cli_list_does_not_clear_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'models = ["a=/m/a.gguf"]\n')
    assert load_options({"models": []}, config=path, env={}).models == ("a=/m/a.gguf",)
    assert load_options({"models": ["b=/m/b.gguf"]}, config=path, env={}).models == ("b=/m/b.gguf",)


def test_config_file_named_in_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy_port = 12345\n")
    assert load_options({}, env={"MESHGATE_CONFIG": str(path)}).proxy_port == 12345


def test_unknown_key_names_file_key_line_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy_port = 1\n\nproxy_prot = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_options({}, config=path, env={})
    message = str(caught.value)
    assert str(path) in message
    assert "line 3" in message
    assert "'proxy_prot'" in message
    assert "did you mean 'proxy_port'" in message


def test_wrong_type_names_file_key_line_and_type(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = "/x"\nproxy_port = "eleven"\n')
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    message = str(caught.value)
    assert f"{path}, line 2" in message
    assert "proxy_port must be an integer" in message
    assert "'eleven'" in message


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("models = 'one.gguf'\nconnect = 1\n", "connect must be true or false"),
        ("model_dirs = [1, 2]\n", "model_dirs must be a list of paths"),
        ("telemetry_period = true\n", "telemetry_period must be a number"),
    ],
)
def test_more_wrong_types(tmp_path: Path, text: str, expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        read_config_file(write(tmp_path, text))


def test_bad_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy_port = 1\nlog_level = = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        load_options({}, config=path, env={})
    assert str(path) in str(caught.value)
    assert "not valid TOML" in str(caught.value)
    assert "line 2" in str(caught.value)


def test_out_of_range_and_bad_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a TCP port"):
        load_options({}, config=write(tmp_path, "proxy_port = 70000\n"), env={})
    with pytest.raises(ConfigError, match="log_level 'loud'"):
        load_options({"log_level": "loud"}, config=None, env={"MESHGATE_CONFIG": ""})
    with pytest.raises(ConfigError, match="MESHGATE_PROXY_PORT='x'"):
        load_options({}, env={"MESHGATE_PROXY_PORT": "x"})
    with pytest.raises(ConfigError, match="upstream 'nourl'"):
        load_options({"upstreams": ["nourl"]}, env={})


def test_missing_file_is_an_error_only_when_asked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_options({}, config=tmp_path / "nope.toml", env={})
    if not DEFAULT_CONFIG.exists():  # the default path is optional
        assert load_options({}, env={}) == NodeOptions()


def test_example_config_parses_and_names_every_option() -> None:
    text = example_config()
    for option in option_names():
        assert f"# {option} = " in text
    uncommented = "\n".join(
        line[2:] for line in text.splitlines() if line.startswith("# ") and " = " in line
    )
    data = tomllib.loads(uncommented)
    assert set(data) == set(option_names())


def test_run_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy_port = 'x'\n")
    result = subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{path}, line 1" in result.stderr
    assert "proxy_port must be an integer" in result.stderr


def test_run_refuses_a_bad_test_lag_in_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
    env["MESHGATE_STREAM_LAG_MS"] = "soon"  # read pacing's test hook (read_tick.py)
    result = subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "run", "--state-dir", str(tmp_path),
         "--proxy-port", "0"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert result.returncode == 1, result.stderr
    assert "MESHGATE_STREAM_LAG_MS='soon': must be a number of ms" in result.stderr
    assert "Traceback" not in result.stderr


def test_identity_and_enroll_find_the_state_dir_in_the_config(tmp_path: Path) -> None:
    state = tmp_path / "from-config"
    config = tmp_path / "node.toml"
    config.write_text(f'state_dir = "{state}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
    shown = subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "identity", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert shown.returncode == 0, shown.stderr
    assert '"did": "did:key:z6Mk' in shown.stdout
    assert [p.name for p in state.iterdir()] == ["identity.key"]  # made where the config says

    config.write_text("state_dir = 5\n")
    bad = subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "identity", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert bad.returncode == 2
    assert "state_dir" in bad.stderr
