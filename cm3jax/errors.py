"""Errors that tell the user what to change. Layer 1: every module may raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to change."""
