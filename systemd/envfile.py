"""Run a command with the variables of a systemd EnvironmentFile= read as systemd reads it, not as a shell would:
nothing is expanded or executed, `#` and `;` start a comment only at the start of a line, quotes and backslashes
follow systemd's src/basic/env-file.c, and an assignment to an invalid name is ignored. install.sh uses it to check
central.env with the service's view of it.

Usage: python3 envfile.py FILE -- COMMAND [ARGS...]   (the file's variables override the inherited ones)
"""

from __future__ import annotations

import os
import re
import sys

WHITESPACE = " \t\n\r"
NEWLINE = "\n\r"
SHELL_NEED_ESCAPE = '"\\`$'
VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse(text: str) -> dict[str, str]:
    """The assignments of an environment file, in systemd's reading (a later one replaces an earlier one)."""
    assignments: dict[str, str] = {}
    state, key, value = "pre_key", "", ""
    chomp = None  # where the value's unescaped trailing whitespace starts: systemd drops it

    def push() -> None:
        name = key.rstrip(WHITESPACE)
        text = value[:chomp] if state == "value" and chomp is not None else value
        if VALID_NAME.fullmatch(name) and _utf8(text):
            assignments[name] = text

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in WHITESPACE:
                state, key = "key", c
        elif state == "key":
            if c in NEWLINE:
                state = "pre_key"  # a line without `=` is ignored
            elif c == "=":
                state, value, chomp = "pre_value", "", None
            else:
                key += c
        elif state in ("pre_value", "value") and c in NEWLINE:
            push()
            state = "pre_key"
        elif state in ("pre_value", "value") and c == "\\":
            state, chomp = "value_escape", None
        elif state == "pre_value":
            if c == "'":
                state = "single_quote"
            elif c == '"':
                state = "double_quote"
            elif c not in WHITESPACE:
                state, value = "value", value + c
        elif state == "value":
            if c not in WHITESPACE:
                chomp = None
            elif chomp is None:
                chomp = len(value)
            value += c
        elif state == "value_escape":
            state = "value"
            if c not in NEWLINE:  # an escaped newline continues the line
                value += c
        elif state == "single_quote":
            if c == "'":
                state = "pre_value"
            else:
                value += c
        elif state == "double_quote":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_quote_escape"
            else:
                value += c
        elif state == "double_quote_escape":
            state = "double_quote"
            if c in SHELL_NEED_ESCAPE:
                value += c
            elif c != "\n":
                value += "\\" + c
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in NEWLINE:
                state = "pre_key"
        elif state == "comment_escape":
            state = "pre_key" if c in NEWLINE else "comment"
    if state not in ("pre_key", "key", "comment", "comment_escape"):
        push()
    return assignments


def _utf8(text: str) -> bool:
    """systemd ignores an assignment that is not valid UTF-8 (read here as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8", errors="surrogateescape") as f:
        environment = {**os.environ, **parse(f.read())}
    os.execvpe(argv[3], argv[3:], environment)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
