"""`pdp serve` configuration: flags, then ``PDP_*`` variables, then a config file, then defaults.

One table (:data:`pdp.settings.SETTINGS`, re-exported here) defines every setting once: its flag, its variable,
its config-file key, its type, default and help. The CLI builds its options
from it, the README's table is checked against it, and the Helm chart renders
the same names.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pdp.envoy.mapping import ATTRIBUTES, check_sources
from pdp.errors import PdpError
from pdp.settings import SETTINGS, Setting, parse_listen

__all__ = [
    "SETTINGS",
    "ConfigError",
    "ServeConfig",
    "Setting",
    "add_serve_arguments",
    "comma_list",
    "parse_listen",
    "resolve",
]


class ConfigError(PdpError, ValueError):
    """A setting has a bad value; the message names where it came from."""


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `pdp serve` needs; built by :func:`resolve`."""

    listen: str = "127.0.0.1:50051"
    health_listen: str = ""
    snapshot: str = ""
    geoip_db: str = ""
    cache_size: int = 100_000
    batch_limit: int = 1000
    max_message_bytes: int = 4 * 1024 * 1024
    workers: int = 8
    processes: int = 1
    receive_timeout: float = 2.0
    grace_seconds: float = 5.0
    log_level: str = "info"
    snapshot_pubkey: str = ""
    state_dir: str = ""
    poll_seconds: float = 2.0
    geoip_poll_seconds: float = 5.0
    geoip_sha256_file: str = ""
    http_timeout: float = 5.0
    http_bearer_token_file: str = ""
    http_ca_bundle: str = ""
    log_format: str = "json"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    allow_insecure_remote: bool = False
    audit_log: str = ""
    audit_hmac_key_file: str = ""
    audit_allow_sample_rate: float = 0.0
    audit_include_ip: bool = False
    audit_queue_size: int = 10_000
    audit_max_bytes: int = 100 * 1024 * 1024
    nat64_prefix: str = ""
    candidate_snapshot: str = ""
    ext_authz_meeting_id: str = "context:meeting_id"
    ext_authz_tags: str = "context:tags"
    ext_authz_host_account_id: str = "context:host_account_id"
    ext_authz_action: str = "context:action"
    ext_authz_user_id: str = ""
    ext_authz_account_id: str = ""
    ext_authz_required: str = "meeting_id"
    ext_authz_trusted_headers: str = ""
    ext_authz_xff_trusted_hops: int = 0
    ext_authz_jwt_payload_key: str = "jwt_payload"
    http_listen: str = ""

    @property
    def ext_authz_sources(self) -> dict[str, str]:
        """Envoy ext_authz: attribute -> source (empty: not mapped)."""
        return {name: getattr(self, f"ext_authz_{name}") for name in ATTRIBUTES}

    @property
    def pubkey_files(self) -> list[str]:
        return comma_list(self.snapshot_pubkey)

    @property
    def nat64_prefixes(self) -> list[str]:
        return [part for part in self.nat64_prefix.split(",") if part]


CONFIG_ENV = "PDP_CONFIG"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting (defaults are resolved later)."""
    defaults = ServeConfig()
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file with the keys below [env {CONFIG_ENV}]")
    for setting in SETTINGS:
        default = getattr(defaults, setting.name)
        shown = "required" if setting.required else f"default {default}" if default != "" else "unset"
        if setting.switch:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{setting.help} [env {setting.env}=true|false; {shown}]",
            )
            continue
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.metavar,
            default=None,
            action="append" if setting.repeatable else "store",
            help=f"{setting.help} [env {setting.env}; {shown}]",
        )


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Build the configuration: flags beat ``PDP_*`` variables beat the config file.

    :raises ConfigError: a value is malformed, a config key is unknown, or the
        config file cannot be read; the message names the flag, variable or file line.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path = flags.get("config") or environ.get(CONFIG_ENV)
    if config_path:
        values.update(_read_config_file(Path(config_path)))
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is not None and raw != "":
            values[setting.name] = _convert(setting, raw, f"environment variable {setting.env}")
        flag = flags.get(setting.name)
        if isinstance(flag, bool):
            values[setting.name] = flag
        elif flag is not None:
            text = ",".join(flag) if isinstance(flag, list) else str(flag)
            values[setting.name] = _convert(setting, text, setting.flag)
    config = ServeConfig(**values)
    _check_ext_authz(config)
    return config


def _check_ext_authz(config: ServeConfig) -> None:
    """:raises ConfigError: a header source not declared trusted, or a required attribute without a source."""
    try:
        check_sources(config.ext_authz_sources, config.ext_authz_trusted_headers, config.ext_authz_required)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _convert(setting: Setting, raw: str, origin: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as error:
        raise ConfigError(f"{origin}: {error}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path}: cannot read it ({error})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: invalid YAML: {error}") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: the config file must be a mapping of settings")
    known = {setting.name: setting for setting in SETTINGS}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = str(key_node.value).replace("-", "_")
        setting = known.get(key)
        if setting is None:
            raise ConfigError(f"{path}:{line}: unknown setting {key_node.value!r} (known: {', '.join(sorted(known))})")
        if not isinstance(value_node, yaml.ScalarNode):
            raise ConfigError(f"{path}:{line}: {key} must be a single value")
        values[key] = _convert(setting, str(value_node.value), f"{path}:{line}: {key}")
    return values


def describe(config: ServeConfig) -> dict[str, Any]:
    """The configuration as a plain mapping, for the start-up log line; secrets
    are only ever referenced by file, and URL passwords are masked."""
    from pdp.logs import redact_url

    described = {field.name: getattr(config, field.name) for field in fields(config)}
    described["snapshot"] = redact_url(config.snapshot)
    return described


def settings_markdown(settings: Sequence[Setting] = SETTINGS) -> str:
    """The README's configuration table; a test keeps the two identical."""
    defaults = ServeConfig()
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for setting in settings:
        default = getattr(defaults, setting.name)
        shown = "(required)" if setting.required else f"`{default}`" if default != "" else "(unset)"
        rows.append(f"| `{setting.flag}` | `{setting.env}` | {shown} | {setting.help} |")
    return "\n".join(rows)


def comma_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated setting, spaces around them removed."""
    return [part.strip() for part in text.split(",") if part.strip()]
