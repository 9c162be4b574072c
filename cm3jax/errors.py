"""Errors that tell the user what to change. Layer 1: every module may raise them.

Every error of cm3jax's own derives from `Cm3jaxError`; the ``cm3jax`` command prints it as one
line that says what to change, without a traceback (``--verbose`` shows it). The classes also
derive from the builtin their callers used to catch (``ValueError``, ``FloatingPointError``).
"""

from __future__ import annotations


class Cm3jaxError(Exception):
    """A problem with the user's input, config, files or run, stated as what to change."""


class ConfigError(Cm3jaxError, ValueError):
    """A config value that cannot work; the message names the field and what to change."""


class DataError(Cm3jaxError, ValueError):
    """Data that cannot be trained on (every record corrupt, no shard readable); the message names
    the files and what to do."""


class DamagedCheckpoint(Cm3jaxError, ValueError):
    """A checkpoint step that cannot be read back completely (a missing or truncated file, an empty
    step directory); the message names the step and the file."""
