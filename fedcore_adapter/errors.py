"""Exceptions whose message is the one line a user sees."""


class FedcoreError(Exception):
    """Base class: the message is complete, one line, and says how to fix it."""


class ConfigError(FedcoreError):
    """A setup, override or option is invalid (not a ValueError, so pydantic never wraps it)."""


class NodeError(FedcoreError, RuntimeError):
    """A node could not be applied to the model it received."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


class DataError(FedcoreError):
    """A data module or batch does not follow the expected protocol."""
