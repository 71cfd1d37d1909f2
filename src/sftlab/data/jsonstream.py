"""A JSON document read value by value through a window of text, so a large .json file of records
is parsed one record at a time (sources.py reads .json files with it).
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.errors import DataError

_BLOCK = 1 << 20  # characters read at a time into the window


class JsonText:
    """A JSON document read through a window of text: values are decoded one at a time, and
    the window keeps only what has not been consumed yet."""

    _SPACE = " \t\n\r"

    def __init__(self, path: str, handle):
        self.path = path
        self.handle = handle
        self.text = ""
        self.pos = 0
        self.line_base = 1  # line number of text[0]
        # Lines counted so far: the line at text[counted]. Counting on from there keeps line()
        # linear over the file (recounting the window from its start was quadratic).
        self.counted, self.counted_line = 0, 1
        self.eof = False
        self.holding = 0  # > 0 while looking ahead: the window must keep what it has, or a saved cursor would break
        self._fill()

    def _fill(self) -> bool:
        if self.eof:
            return False
        if self.pos > _BLOCK and not self.holding:  # drop what was consumed
            self.line_base += self.text.count("\n", 0, self.pos)
            self.counted_line += self.text.count("\n", self.counted, self.pos) if self.counted < self.pos else 0
            self.counted = max(self.counted - self.pos, 0)
            self.text, self.pos = self.text[self.pos :], 0
        block = self.handle.read(_BLOCK)
        if not block:
            self.eof = True
            return False
        self.text += block
        return True

    def line(self) -> int:
        """The line number at the cursor."""
        if self.pos < self.counted:  # after a look-ahead moved the cursor back
            self.counted, self.counted_line = 0, self.line_base
        self.counted_line += self.text.count("\n", self.counted, self.pos)
        self.counted = self.pos
        return self.counted_line

    def skip_space(self) -> None:
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in self._SPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self._fill():
                return

    def peek(self) -> str:
        if self.pos >= len(self.text):
            self._fill()
        return self.text[self.pos : self.pos + 1]

    def advance(self) -> None:
        self.pos += 1

    def value(self) -> Any:
        """Decode the value at the cursor; a value cut off by the window end is read again with more text."""
        while True:
            try:
                value, end = json.JSONDecoder().raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                if self._fill():
                    continue
                self._raise(error)
            if end == len(self.text) and self._fill():
                continue  # a number at the window's end may go on
            self.pos = end
            return value

    def fail(self, message: str) -> None:
        self._raise(json.JSONDecodeError(message, self.text, self.pos))

    def _raise(self, error: json.JSONDecodeError) -> None:
        raise DataError("invalid JSON", source=f"{self.path}:{self.line_base + error.lineno - 1}", found=error.msg,
                        fix="fix the JSON syntax at that line") from None

    def expect_end(self) -> None:
        self.skip_space()
        if self.peek():
            self.fail("Extra data")

    def first_line_is_a_value_with_more_after(self) -> bool:
        self.holding += 1
        try:
            return self._first_line_is_a_value_with_more_after()
        finally:
            self.holding -= 1

    def _first_line_is_a_value_with_more_after(self) -> bool:
        while "\n" not in self.text[self.pos :] and self._fill():
            pass
        end_of_line = self.text.find("\n", self.pos)
        if end_of_line < 0:
            return False
        try:
            json.loads(self.text[self.pos : end_of_line])
        except json.JSONDecodeError:
            return False
        saved = self.pos
        self.pos = end_of_line
        self.skip_space()
        more = bool(self.peek())
        self.pos = saved
        return more

    def opens_a_named_list(self) -> bool:
        """At '{': is it '{"name": [' ? Then the cursor is left inside the list."""
        self.holding += 1
        try:
            return self._opens_a_named_list()
        finally:
            self.holding -= 1

    def _opens_a_named_list(self) -> bool:
        saved = self.pos
        self.advance()
        self.skip_space()
        if self.peek() == '"':
            try:
                self.value()
            except DataError:
                self.pos = saved
                return False
            self.skip_space()
            if self.peek() == ":":
                self.advance()
                self.skip_space()
                if self.peek() == "[":
                    self.advance()
                    return True
        self.pos = saved
        return False

    def whole(self) -> tuple[Any, bool]:
        """The value at the cursor read whole, and whether anything follows it."""
        while self._fill():
            pass
        try:
            value, end = json.JSONDecoder().raw_decode(self.text, self.pos)
        except json.JSONDecodeError as error:
            self._raise(error)
        self.pos = end
        self.skip_space()
        return value, bool(self.peek())
