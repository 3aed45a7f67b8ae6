"""The iterative tasks: input generators and reference solvers.

Every task is an iteration ``s_t = F(s_{t-1}, x_t)`` over an input ``x_1 .. x_L``. The
vectorised `solve` is what builds the data; `reference` is a plain loop written from the
definition, which the contract test compares it against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class Task:
    """One task kind. Subclasses set `kind` and implement the three methods below."""

    kind: str = ""

    @property
    def n_symbols(self) -> int:
        """How many symbol tokens (0 .. n-1) the inputs and states use."""
        raise NotImplementedError

    def alphabet(self) -> np.ndarray:
        """The values an input x_t can take."""
        raise NotImplementedError

    def solve(self, x: np.ndarray) -> np.ndarray:
        """States s_1 .. s_L for a batch of inputs ``x`` of shape [n, L] (vectorised)."""
        raise NotImplementedError

    def reference(self, x: list[int]) -> list[int]:
        """States for one input, as a plain loop over the definition."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, length: int, n: int) -> np.ndarray:
        """`n` inputs of `length`, each x_t uniform over the alphabet."""
        alphabet = self.alphabet()
        return alphabet[rng.integers(0, len(alphabet), size=(n, length))]

    def input_space(self, length: int) -> int:
        """How many distinct inputs of `length` exist."""
        return len(self.alphabet()) ** length


@dataclass(frozen=True)
class Parity(Task):
    """Running parity: x_t in {0, 1}, s_t = (x_1 + .. + x_t) mod 2.

    Rendered with chain of thought (L = 4)::

        <parity> 1 0 1 1 EoI 1 1 0 1
    """

    kind = "parity"

    @property
    def n_symbols(self) -> int:
        return 2

    def alphabet(self) -> np.ndarray:
        return np.arange(2)

    def solve(self, x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=1) % 2

    def reference(self, x: list[int]) -> list[int]:
        states, s = [], 0
        for xt in x:
            s = (s + xt) % 2
            states.append(s)
        return states


@dataclass(frozen=True)
class Polynomial(Task):
    """Polynomial iteration mod p: x_t in {1 .. p-1}, s_1 = x_1, s_t = (s_{t-1} x_t + 1) mod p.

    Rendered with chain of thought (p = 11, L = 3)::

        <polynomial> 3 5 2 EoI 3 5 0

    (s_2 = 3*5 + 1 = 16 = 5 mod 11, s_3 = 5*2 + 1 = 11 = 0 mod 11.)
    """

    modulus: int = 11
    kind = "polynomial"

    @property
    def n_symbols(self) -> int:
        return self.modulus

    def alphabet(self) -> np.ndarray:
        return np.arange(1, self.modulus)

    def solve(self, x: np.ndarray) -> np.ndarray:
        states = np.empty_like(x)
        if x.shape[1] == 0:
            return states
        states[:, 0] = x[:, 0] % self.modulus
        for t in range(1, x.shape[1]):
            states[:, t] = (states[:, t - 1] * x[:, t] + 1) % self.modulus
        return states

    def reference(self, x: list[int]) -> list[int]:
        states: list[int] = []
        for t, xt in enumerate(x):
            s = xt if t == 0 else states[-1] * xt + 1
            states.append(s % self.modulus)
        return states


@dataclass(frozen=True)
class Copy(Task):
    """Binary copy: x_t in {0, 1}, s_t = x_t.

    Rendered with chain of thought (L = 4)::

        <copy> 1 0 0 1 EoI 1 0 0 1
    """

    kind = "copy"

    @property
    def n_symbols(self) -> int:
        return 2

    def alphabet(self) -> np.ndarray:
        return np.arange(2)

    def solve(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def reference(self, x: list[int]) -> list[int]:
        return list(x)


KINDS: dict[str, type[Task]] = {"parity": Parity, "polynomial": Polynomial, "copy": Copy}
