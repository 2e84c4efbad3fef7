"""Turn configuration mistakes into one clear line that names the key.

`ml_collections.config_flags` reports an unknown `--config.a.b` override as a bare KeyError and a
wrong type as a long absl message. `check_overrides` walks every override against the loaded
config first and names the key with the keys allowed beside it; `explain_flag_error` rewrites
the remaining absl errors.
"""
from __future__ import annotations

import importlib.util
import os
import re

import ml_collections


class ConfigError(ValueError):
    """A configuration value or key is wrong (the message names it)."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]` the way config_flags does: the module's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_fifa_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _allowed(node) -> str:
    return ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"


def resolve_key(config, dotted: str) -> None:
    """Raise ConfigError if `dotted` (e.g. "select.k_pairs") is not a key of `config`."""
    node = config
    walked = []
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            where = ".".join(walked) or "the top level"
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no {part!r}; "
                              f"allowed keys there: {_allowed(node)}")
        node = node[part]
        walked.append(part)


_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(?:=.*)?$")


def check_overrides(argv: list[str]) -> None:
    """Load the `--config` file once and check every `--config.key=value` in argv names a key.

    A config file that is missing or fails to load is reported here in one line, too.
    """
    spec = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif a.startswith("--config="):
            spec = a.split("=", 1)[1]
    if spec is None:
        return
    keys = [m.group(1) for a in argv if (m := _OVERRIDE.match(a))]
    try:
        config = load_config_file(spec)
    except ConfigError:
        raise
    except Exception as e:  # the user's config file raised: name it, keep one line
        raise ConfigError(f"config file {spec} failed to load: {type(e).__name__}: {e}") from e
    for key in keys:
        resolve_key(config, key)


def explain_flag_error(error: Exception) -> str:
    """One line for an absl flag error (wrong type, bad file)."""
    text = str(error).strip()
    m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", text, re.S)
    if m:
        key, value, why = m.groups()
        return (f"bad value {value!r} for config key {key!r}: {why.splitlines()[0]}")
    m = re.search(r"Failed loading config file.*?\n\s*Attempted.*?\n\s*(\S+)\n\s*(.*)", text, re.S)
    if m:
        return f"cannot load config file {m.group(1)}: {m.group(2).splitlines()[0]}"
    return text.splitlines()[0] if text else type(error).__name__


def validate(config) -> None:
    """Checks that need the whole config (called before any stage runs)."""
    for key in ("seed", "stages"):
        if key not in config:
            raise ConfigError(f"config is missing the top-level key {key!r}")
    if not isinstance(config.seed, int):
        raise ConfigError(f"config key 'seed' must be an int, got {config.seed!r}")
    stages = config.stages.split(",") if isinstance(config.stages, str) else config.stages
    stages = [str(s).strip() for s in stages]
    for section, stage in (("data", "ingest"), ("score", "score"), ("mesh", "score"),
                           ("mesh", "select")):
        if stage in stages and section in config:
            _check_rules(section, config[section], _RULES[section])
    if "mesh" in config and ("score" in stages or "select" in stages):
        m = config.mesh
        if m.get("data") == -1 and m.get("fsdp") == -1:
            raise ConfigError("config keys 'mesh.data' and 'mesh.fsdp' cannot both be -1")
    if "select" in stages and "select" in config:
        _check_select(config.select)


# Value rules of the data, score and mesh sections, checked before any stage runs (a typo in
# score.* must not surface after hours of ingest). ("choice", values) | ("min", lower bound) |
# ("size", None): -1 (the rest of the devices) or >= 1.
_RULES = {
    "data": {"format": ("choice", ("pickapic", "hpdv2", "jsonl", "csv", "demo")),
             "check_images": ("choice", ("decode", "header", "none")),
             "num_workers": ("min", 0), "batch_rows": ("min", 1), "max_rows": ("min", 0)},
    "score": {"reward.dtype": ("choice", ("float32", "bfloat16")),
              "reward.attention_impl": ("choice", ("auto", "xla", "cudnn")),
              "reward.batch_size": ("min", 1), "reward.chunk_size": ("min", 1),
              "reward.num_workers": ("min", 0),
              "embedder.kind": ("choice", ("bert", "clip")), "embedder.batch_size": ("min", 1),
              "judge.backend": ("choice", ("jax", "http", "column")),
              "judge.dtype": ("choice", ("float32", "bfloat16")),
              "judge.attn_impl": ("choice", ("auto", "xla", "cudnn")),
              "judge.batch_size": ("min", 1), "judge.max_length": ("min", 1),
              "judge.http.endpoint": ("choice", ("chat", "completions")),
              "judge.http.concurrency": ("min", 1), "judge.http.retries": ("min", 0),
              "judge.column.missing": ("choice", ("error", "fail"))},
    "mesh": {"distributed": ("choice", ("auto", "on", "off")), "data": ("size", None),
             "fsdp": ("size", None), "param_tactic": ("choice", ("fsdp", "replicate"))},
}


def _check_rules(section: str, node, rules: dict) -> None:
    for dotted, (kind, arg) in rules.items():
        value = node
        for part in dotted.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if value is None:
            continue
        key = f"{section}.{dotted}"
        if kind == "choice" and value not in arg:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(arg)}; "
                              f"got {value!r}")
        if kind == "min" and not value >= arg:
            raise ConfigError(f"config key '{key}' must be >= {arg}; got {value!r}")
        if kind == "size" and not (value == -1 or value >= 1):
            raise ConfigError(f"config key '{key}' must be -1 (the remaining devices) or >= 1; "
                              f"got {value!r}")


def _check_select(sel) -> None:
    """The select section's values, checked before any stage runs: a typo here must not be
    found only after hours of ingest and scoring."""
    from fifa_jax.selection import importance
    from fifa_jax.selection import stage as select_stage   # imports jax: only when selecting
    for key, allowed in (("method", select_stage.METHODS),
                         ("normalize", importance.NORMALIZATIONS),
                         ("margin", ("absolute", "signed"))):
        if key in sel and sel[key] not in allowed:
            raise ConfigError(f"config key 'select.{key}' must be one of {', '.join(allowed)}; "
                              f"got {sel[key]!r}")
    if "eps" in sel and not sel.eps > 0:
        raise ConfigError(f"config key 'select.eps' (duplicate floor) must be > 0; got {sel.eps}")
    if "knn_k" in sel and sel.knn_k < 1:
        raise ConfigError(f"config key 'select.knn_k' must be >= 1; got {sel.knn_k}")
    if "knn_tile" in sel and sel.knn_tile < 0:
        raise ConfigError(f"config key 'select.knn_tile' must be >= 0 (0: the backend's "
                          f"default); got {sel.knn_tile}")
    if "k_pairs" in sel and sel.get("method") != "full" and sel.k_pairs < 1:
        raise ConfigError(f"config key 'select.k_pairs' must be >= 1; got {sel.k_pairs}")
