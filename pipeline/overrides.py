"""Command-line overrides checked against the config before Hydra runs: a misspelled key, an unknown config
option or a `+key` that nothing reads is one message naming what is valid there, not Hydra's error (or,
for `+key`, a key silently accepted and ignored)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from pipeline import PROJECT_ROOT

# Flags that compose another config: the overrides are then Hydra's to check.
_OTHER_CONFIG = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def check_overrides(args: list[str], config_dir: Path = PROJECT_ROOT / "conf") -> str | None:
    """-> why the overrides in `args` (a command line) are refused, or None when they are fine."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(arg.split("=")[0] in _OTHER_CONFIG for arg in args):
        return None
    texts = [arg for arg in args if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except HydraException as err:
        return str(err).strip()
    if not overrides:
        return None
    overrides = [o for o in overrides if not o.key_or_group.split(".")[0].split("/")[0] == "hydra"]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = set(loader.list_groups(""))
        choices = []
        for override in overrides:
            if override.key_or_group not in groups:
                continue
            options = loader.get_group_options(override.key_or_group)
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for value in values:
                if isinstance(value, str) and value not in options:
                    return (f"unknown {override.key_or_group} '{value}'; valid choices: {', '.join(options)}")
            choices.append(f"{override.key_or_group}={values[0]}")
        base = compose("config", overrides=choices)
    for override in overrides:
        if override.key_or_group in groups or override.is_delete():
            continue
        refused = _refused(base, override.key_or_group, override.is_add() or override.is_force_add())
        if refused:
            return refused
    return None


def _refused(base: DictConfig, key: str, add: bool) -> str | None:
    """Why `key` (added with + when `add`) is no key of `base`, or None."""
    parts, node = key.split("."), base
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if isinstance(node, ListConfig):
            return None  # an index into a list: Hydra checks it
        if not isinstance(node, DictConfig):
            return f"unknown config key '{key}': '{here}' is a value, it has no keys"
        if part not in node:
            where = f"{here} has" if here else "the config has"
            return (f"unknown config key '{key}': {where} no key '{part}'; valid keys"
                    f"{' of ' + here if here else ''}: {', '.join(str(k) for k in node.keys())}")
        node = node._get_node(part)
    if add:
        return f"'{key}' is already a config key: set it with {key}=... (without +)"
    return None
