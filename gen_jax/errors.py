"""Errors that name the problem and the fix."""

__all__ = ["GenJaxError", "ConfigError", "DataError", "CheckpointError", "NonFiniteLossError", "ShapeError"]


class GenJaxError(Exception):
    """Base class of gen_jax's own errors."""


class ConfigError(GenJaxError, ValueError):
    """An unknown preset, an unknown override key, or a value of the wrong type."""


class DataError(GenJaxError, RuntimeError):
    """A data source is unknown, could not be fetched, or is corrupt."""


class CheckpointError(GenJaxError, RuntimeError):
    """A checkpoint could not be restored."""


class NonFiniteLossError(GenJaxError, FloatingPointError):
    """Training produced a NaN or inf loss or gradient."""


class ShapeError(GenJaxError, ValueError):
    """An input has the wrong shape or dtype."""
