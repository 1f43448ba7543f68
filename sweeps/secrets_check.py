"""Refuse secrets in the config. The resolved config is saved (config.yaml, Tune's tuner.pkl), shown in report.html
and printed, so a token or a URL credential in any string value (free text such as a system prompt included) is
refused before anything is written or printed: exit 2, one line naming the key and the environment variable to
use instead, never the secret itself."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit


# (what it is, its shape, where it belongs instead). The prefixed shapes must not follow a letter or digit, so that
# a word that merely contains the prefix is not one; the W&B key must stand alone (not inside a path: a 40-hex
# directory name is a git or hub snapshot hash).
TOKEN_SHAPES = [
    ("a Hugging Face token (hf_...)", re.compile(r"(?<![A-Za-z0-9])hf_(?P<body>[A-Za-z0-9]{30,})"), "HF_TOKEN"),
    ("a GitHub token (gh*_...)", re.compile(r"(?<![A-Za-z0-9])gh[pousr]_(?P<body>[A-Za-z0-9]{36,})"), "GITHUB_TOKEN"),
    ("a GitHub token (github_pat_...)", re.compile(r"(?<![A-Za-z0-9])github_pat_(?P<body>[A-Za-z0-9_]{40,})"), "GITHUB_TOKEN"),
    ("an API key (sk-...)", re.compile(r"(?<![A-Za-z0-9])sk-(?P<body>[A-Za-z0-9_-]{32,})"),
     "OPENAI_API_KEY, or the variable of the service that uses it"),
    ("an AWS access key id (AKIA...)", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
     "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials"),
    ("a W&B API key (40 hex characters)", re.compile(r"(?<![\w/.~-])(?:local-)?[0-9a-f]{40}(?![\w/.-])"),
     "WANDB_API_KEY"),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a key file the service reads itself"),
]
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
# Where the credentials of the URLs the config may hold belong.
URL_CREDENTIALS = {
    "tracking.mlflow_tracking_uri": "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    "tracking.optuna_storage": "the database driver's own: PGUSER / PGPASSWORD or ~/.pgpass for PostgreSQL",
}


class SecretInConfig(Exception):
    """A secret in a config value or argument; the message names where, never the secret. sweeps/config.py turns it
    into a ConfigError (this module imports nothing of the project, so that config.py can import it)."""


def find_secret(text: str, key: str = "") -> tuple[str, str] | None:
    """(what `text` holds, in words, the environment variable to use instead) for its first secret, or None. URL
    credentials come first: whatever token they are, where the URL's credentials belong is the useful pointer."""
    for match in URL.finditer(text):
        try:
            parts = urlsplit(match.group())
            user, password = parts.username, parts.password
        except ValueError:  # not a URL after all (an unclosed IPv6 bracket, a bad port)
            continue
        if password or user:
            url = "the URL" if match.group() == text.strip() else "a URL in it"
            return (f"{url} holds a {'password' if password else 'user name'}",
                    URL_CREDENTIALS.get(key, "the service's own variables or credentials file"))
    for kind, shape, variable in TOKEN_SHAPES:
        for match in shape.finditer(text):
            # The random part of the base62 shapes (`body`) mixes digits, lower and upper case; a name such as
            # "sk-learn-baseline-comparison-2026" does not.
            if "body" in shape.groupindex and not _mixed(match.group("body")):
                continue
            return f"holds {kind}", variable
    return None


def check_tree(tree: Any, where: str = "", source: str = "") -> None:
    """Walk a config tree (mappings, lists, strings; keys too) and refuse the first secret, naming its dotted key
    and, for a file, the file."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            key = str(key)
            found = find_secret(key)
            if found:
                _refuse(f"a key under {where or 'the top level'}", found, source)
            check_tree(value, f"{where}.{key}" if where else key, source)
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            check_tree(item, f"{where}[{index}]", source)
    elif isinstance(tree, str):
        found = find_secret(tree, where)
        if found:
            _refuse(where, found, source)


def check_argument(argument: str) -> None:
    """Refuse a secret in one command-line argument: a `key=value` override by its key, anything else (a flag,
    a path) as an argument, so that no later error message repeats it."""
    key, sep, value = argument.partition("=")
    if sep and not key.startswith("-") and not find_secret(key):
        check_tree({key.strip(): value})
        return
    found = find_secret(argument)
    if found:
        _refuse("a command-line argument", found, "")


def _refuse(where: str, found: tuple[str, str], source: str) -> None:
    what, variable = found
    in_file = f" (in {source})" if source else ""
    raise SecretInConfig(f"{where}{in_file}: {what}, which would be saved with the config (config.yaml, Tune's "
                      f"snapshot, report.html) and printed; remove it and give it through the environment "
                      f"({variable})")


def _mixed(token: str) -> bool:
    return any(c.isdigit() for c in token) and any(c.islower() for c in token) and any(c.isupper() for c in token)
