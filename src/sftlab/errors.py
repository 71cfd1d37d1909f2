"""One exception family for user mistakes: where, what was found, what was expected, the fix.

The CLI prints `str(error)` as one line and exits non-zero; tracebacks are kept for bugs.
"""

from __future__ import annotations

import difflib


class SftlabError(Exception):
    """A mistake in the user's data, config or files, described so that a person can fix it."""

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        index: int | None = None,
        field: str | None = None,
        found: str | None = None,
        expected: str | None = None,
        fix: str | None = None,
    ):
        self.problem = problem
        self.source = source
        self.index = index
        self.field = field
        self.found = found
        self.expected = expected
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        parts = [(", ".join(where) + ": " if where else "") + self.problem]
        if self.found is not None:
            parts.append(f"found {self.found}")
        if self.expected is not None:
            parts.append(f"expected {self.expected}")
        if self.fix is not None:
            parts.append(f"fix: {self.fix}")
        return "; ".join(parts)


class DataError(SftlabError):
    """A record, file or dataset that cannot become training examples."""


class RecordError(DataError):
    """What is wrong with one record, found where its place is not known (a field check, a field
    map). The caller that knows the source and row raises it again as a DataError naming them, or
    counts it under `problem` when invalid records are skipped. `found` is written for a person
    already: describe(value) for a raw value, so that None and the string "21" are not printed as
    if nothing, or the number 21, had been found."""


class TurnError(RecordError):
    """A conversation turn (messages[turn]) that the chat template cannot serve, or whose trained
    text fails the self-check; the tokenizing stage names the record and the turn's role."""

    def __init__(
        self, turn: int, problem: str, found: str | None = None, fix: str | None = None, field: str | None = None
    ):
        self.turn = turn
        super().__init__(problem, field=field or f"messages[{turn}]", found=found, fix=fix)


class ConfigError(SftlabError):
    """A config key, value or file that is not valid."""


class TrainingError(SftlabError):
    """Training cannot continue: a non-finite loss, an unusable model or checkpoint."""


def describe(value: object, limit: int = 60) -> str:
    """A short, type-revealing description of a value for error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "None"


def did_you_mean(name: object, known) -> str | None:
    """'did you mean 'X'?' for the known name closest to a mistyped one, or None when none is close:
    the one suggestion that unknown config keys, data-source keys and field-map names all give."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else None
