"""How cptoolkit reports bad input: one line naming the field, the value and the rule.

The lowest floor of the package: it imports nothing of cptoolkit, so the config schema, the model shapes and
the command-line tools all raise and print the same way without importing each other.
"""
from __future__ import annotations

import argparse


class ConfigError(ValueError):
    """An invalid config: the message names the file, the field, the value and the rule."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr (status 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
