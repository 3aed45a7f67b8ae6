"""The token vocabulary, derived from the tasks a curriculum defines.

Symbol tokens come first and are shared by every task: the bit 1 of parity and the value 1
of polynomial iteration are the same token, which is what lets training on one task
transfer to another. Special tokens follow, each with a name: end of input (EoI), end of
sequence (EoS, also the padding) and one start token per task.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vocab:
    """Token ids: ``[0, n_symbols)`` symbols, then EoI, EoS, then one token per task."""

    n_symbols: int
    task_names: tuple[str, ...]

    @property
    def eoi(self) -> int:
        return self.n_symbols

    @property
    def eos(self) -> int:
        return self.n_symbols + 1

    def task_token(self, name: str) -> int:
        return self.n_symbols + 2 + self.task_names.index(name)

    @property
    def size(self) -> int:
        return self.n_symbols + 2 + len(self.task_names)

    def name_of(self, token: int) -> str:
        """A readable name for a token id (for rendering sequences and plots)."""
        if 0 <= token < self.n_symbols:
            return str(token)
        if token == self.eoi:
            return "EoI"
        if token == self.eos:
            return "EoS"
        if self.n_symbols + 2 <= token < self.size:
            return f"<{self.task_names[token - self.n_symbols - 2]}>"
        raise ValueError(f"token {token} is outside a vocabulary of {self.size}")
