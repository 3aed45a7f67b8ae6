"""The one exception bad input raises, and the wording it shares: what was given, what fits."""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Iterable

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2  # the CLI's: bad input (a `ConfigError`) is 2


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
        return one_line(": ".join(parts + [self.message]))


# Characters that end or redraw a line: C0 and C1 controls (\n, \r, ESC ...) and the separators
# str.splitlines breaks at. A key, a file name or a value holding one is written escaped (\n,
# \x1b), so an error stays the one line it promises: the field path and the file name are
# the user's text, quoted as they wrote it.
_LINE_BREAKERS = {c: chr(c).encode("unicode_escape").decode() for c in
                  [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]}


def first_line(err: BaseException, limit: int) -> str:
    """The first line of `err`'s message, at most `limit` characters (its type's name if it has
    none): a library's error can run on with a traceback or a whole HTML page."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is a failed allocation (numpy's MemoryError, torch's allocators' RuntimeError):
    a curriculum too large for this machine, which validation, bounding sizes at `MAX_BYTES`, passes."""
    return isinstance(err, MemoryError) or isinstance(err, RuntimeError) and (
        type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err))


# torch's CUDA out-of-memory message: "GPU 0 has a total capacity of 79.15 GiB of which ... is free.
# [Process N has ...] Including non-PyTorch memory, this process has 1.20 GiB memory in use." (some
# versions spelled it "capacty")
_GPU_TOTAL = re.compile(r"total capac\w* of ([\d.]+) ([KMGT])iB")
_GPU_OWN = re.compile(r"this process has ([\d.]+) ([KMGT])iB memory in use")


def memory_advice(err: BaseException) -> str:
    """What to do about `err` (`out_of_memory`): lower the sizes; but where torch's CUDA message
    says this process held under half of the GPU, other processes hold the rest, and lower
    sizes would not have helped."""
    total, own = _GPU_TOTAL.search(str(err)), _GPU_OWN.search(str(err))
    if total and own and _bytes(own) < _bytes(total) / 2:
        return (f"other processes hold most of the GPU's memory (this one held {own[1]} {own[2]}iB of "
                f"{total[1]} {total[2]}iB; nvidia-smi lists them): free it, or choose another GPU")
    return "lower the model's or the data's sizes, or optim.batch_size"


def _bytes(found: re.Match) -> float:
    """A size that `_GPU_TOTAL` or `_GPU_OWN` found, in bytes."""
    return float(found[1]) * 1024 ** "KMGT".index(found[2]) * 1024


def one_line(text: str) -> str:
    """`text` as one printable line: line breakers escaped, and bytes that are not UTF-8 (`printable`)."""
    return printable(text.translate(_LINE_BREAKERS))


def printable(text: str) -> str:
    """`text` with the bytes that are not UTF-8 (Python reads them in a path or an argument as lone
    surrogates) written as escapes, ``\\udcff``: a stream that encodes strictly, as stdout does in
    most UTF-8 locales, raised on them after the work was done, a traceback."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = 80
    return r


_SHORT = _short_repr()


def shown(value: object, limit: int = 60) -> str:
    """`value` as the user wrote it (its repr), cut short so a message stays one readable line.
    Bounded while it is made, not after: YAML aliases can nest a small file into a value whose
    full repr would not fit in memory."""
    text = _SHORT.repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def closest(given: object, choices: Iterable[object], cutoff: float = 0.6) -> str | None:
    """The choice nearest to `given`, if one is near enough to be a likely typo.

    Compared case-insensitively, so ``ASHA`` finds ``asha``; `cutoff` is difflib's ratio.
    """
    by_lower: dict[str, str] = {}
    for choice in map(str, choices):
        by_lower.setdefault(choice.lower(), choice)
    found = difflib.get_close_matches(str(given).lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[found[0]] if found else None


MAX_LISTED = 24  # choices a message lists; the nearest one is found among all of them


def suggest(given: object, choices: Iterable[object], *, listing: str = "choose one of") -> str:
    """What to write instead of `given`: ``did you mean 'x'? (choose one of a, b)``, or only
    ``choose one of a, b`` when no choice is close. Empty when there is nothing to choose.

    Every unknown-name message ends with this, so a typo is fixed from the message alone.
    """
    names = [str(c) for c in choices]
    if not names:
        return ""
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""  # a 1024-layer model's modules
    listed = f"{listing} {', '.join(names[:MAX_LISTED])}{more}"
    best = closest(given, names)
    return f"did you mean {best!r}? ({listed})" if best is not None else listed


def unknown(what: str, given: object, choices: Iterable[object], *,
            listing: str = "choose one of") -> str:
    """``unknown WHAT 'given'; did you mean ...? (choose one of ...)``: the one wording for a
    name that is not among the valid ones."""
    hint = suggest(given, choices, listing=listing)
    return f"unknown {what} {shown(given)}" + (f"; {hint}" if hint else "")


def not_utf8(text: str) -> str | None:
    """The first byte of `text` that is not UTF-8, as ``0xNN``, else None. Python reads such bytes in a
    command's arguments and file names as lone surrogates, which every UTF-8 encoder (MLflow's
    store, a log, a YAML file) refuses later, after work has begun."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        return f"0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    return None


def require_utf8(text: str, what: str, fix: str, *, field: str = "", file: str = "") -> None:
    """`ConfigError` ("WHAT holds the byte 0xNN, which is not UTF-8 text; FIX") where `text` holds
    a byte `not_utf8` finds: refused before anything is made, not in the store once it is."""
    if byte := not_utf8(text):
        raise ConfigError(f"{what} holds the byte {byte}, which is not UTF-8 text; {fix}", field=field, file=file)


def recorded_path(file: str) -> None:
    """A curriculum or spec whose absolute path MLflow records must be UTF-8 text: its store failed on
    other bytes after the experiment was made (exit 1, naming the store)."""
    require_utf8(str(Path(file).resolve()), "its path", "the run records it: rename the file (or the folder that "
                 "holds it)", file=file)
