"""Turn configuration mistakes into one clear line that names the key.

`ml_collections.config_flags` reports an unknown `--config.a.b` override as a bare KeyError and a
wrong type as a long absl message. `check_overrides` walks every override against the loaded
config first and names the key with the keys allowed beside it; `explain_flag_error` rewrites
the remaining absl errors. The whole-config checks run before any stage are
`pipeline.validate`, beside the stage table.
"""
from __future__ import annotations

import importlib.util
import os
import re

import ml_collections


from fifa_jax.errors import ConfigError

__all__ = ["ConfigError", "check_overrides", "explain_flag_error", "load_config_file",
           "resolve_key"]


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


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flags parsed from `argv` (the remaining arguments); a config or flag mistake
    prints one `error:` line naming the key and exits with code 2."""
    import sys

    from absl import app, flags
    app.define_help_flags()       # --help / --helpfull print the flags and exit (absl: code 1)
    try:
        check_overrides(argv)
        return flags.FLAGS(argv, known_only=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
    except (flags.Error, KeyError, AttributeError) as e:
        print(f"error: {explain_flag_error(e)}", file=sys.stderr)
    sys.exit(2)


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
