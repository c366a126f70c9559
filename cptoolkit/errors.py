"""How cptoolkit reports bad input: one line naming the field, the value and the rule.

The lowest floor of the package: it imports nothing of cptoolkit, so the config schema, the model shapes and
the command-line tools all raise and print the same way without importing each other.
"""
from __future__ import annotations

import argparse
from typing import Any


class ConfigError(ValueError):
    """An invalid config: the message names the file, the field, the value and the rule."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr (status 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def require(ok: bool, name: str, value: Any, rule: str) -> None:
    """A ValueError ``name = value: rule`` unless ``ok`` (a config field's rule, as ``cptoolkit.config`` states them)."""
    if not ok:
        raise ValueError(f"{name} = {value!r}: {rule}")


def check_positive(name: str, value: Any) -> None:
    """A ValueError ``name (value) must be a positive integer`` unless ``value`` is one (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")
