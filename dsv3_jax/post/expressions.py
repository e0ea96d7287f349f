"""Arithmetic expressions as Countdown writes them: integers, + - * /, brackets; nothing else.

A recursive-descent parser (model-written text is never handed to `eval`), exact rational values
(so 8/3*3 is 8 and 7/2 is not an integer), and the integers the expression used, in order (the
reward checks them against the numbers it was given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


@dataclass(frozen=True)
class Parsed:
    value: Fraction | None  # None: a division by zero somewhere
    numbers: tuple[int, ...]  # the integer literals, left to right


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.numbers, self.divided_by_zero = tokens, 0, [], False

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        self.i += 1
        return self.tokens[self.i - 1]

    def sum(self) -> Fraction:  # sum := product (("+" | "-") product)*
        value = self.product()
        while self.peek() in ("+", "-"):
            value = value + self.product() if self.take() == "+" else value - self.product()
        return value

    def product(self) -> Fraction:  # product := atom (("*" | "/") atom)*
        value = self.atom()
        while self.peek() in ("*", "/"):
            op, right = self.take(), self.atom()
            if op == "*":
                value *= right
            elif right == 0:
                self.divided_by_zero, value = True, Fraction(0)
            else:
                value /= right
        return value

    def atom(self) -> Fraction:  # atom := integer | "(" sum ")"   (no unary minus: Countdown has none)
        token = self.peek()
        if token is None:
            raise ValueError("the expression ends early")
        self.take()
        if token == "(":
            value = self.sum()
            if self.peek() != ")":
                raise ValueError("a bracket is not closed")
            self.take()
            return value
        if token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ValueError(f"unexpected {token!r}")


def parse_expression(text: str) -> Parsed | None:
    """The expression's value and literals, or None if `text` is not exactly one expression."""
    tokens, end = [], 0
    for match in _TOKEN.finditer(text):
        if match.start() != end:
            return None
        tokens.append(match.group(1) or match.group(2))
        end = match.end()
    if text[end:].strip() or not tokens:
        return None
    parser = _Parser(tokens)
    try:
        value = parser.sum()
    except ValueError:
        return None
    if parser.i != len(tokens):
        return None  # extra tokens after a whole expression, e.g. "3+4)5"
    return Parsed(None if parser.divided_by_zero else value, tuple(parser.numbers))
