"""The one exception bad input raises: it carries the file and the field path."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. `str(err)` is one line: ``FILE: FIELD: what is wrong``.

    The CLI turns it into exit code 2; library code raises it and never exits.
    """

    def __init__(self, message: str, *, field: str = "", file: str = "") -> None:
        self.message = message.replace("\n", " ").strip()
        self.field = field
        self.file = file
        super().__init__(str(self))

    def in_file(self, file: str) -> "ConfigError":
        """The same error, naming the file it came from."""
        return ConfigError(self.message, field=self.field, file=file)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its field path nested under `prefix`."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ConfigError(self.message, field=field, file=self.file)

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        return ": ".join(parts + [self.message])
