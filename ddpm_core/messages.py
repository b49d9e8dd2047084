"""Quoting inside one-line error messages: another library's error, or a bad value, cut to fit
the single line that every refusal here is (the file, what is wrong, the fix).

This module owns how data.py and the pretrained-weights modules quote what torchvision, PIL,
torch or safetensors raised; it defines no error types and raises nothing itself.
"""

from __future__ import annotations

from ddpm_core.checkpoint import first_line


def describe(error: BaseException, last_line: bool = False) -> str:
    """'Type: message' on one line (or only its last line), just 'Type' when the message is empty.

    `last_line` is for errors that wrap others, as torchvision's "Error downloading ...: Tried
    <mirror>, got: <error>" does: the cause is the last line."""
    text = str(error).strip()
    if last_line and text:
        text = text.splitlines()[-1]
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def first_sentence(error: BaseException | str) -> str:
    """`checkpoint.first_line`, cut to at most 160 characters: its first sentence, or its start."""
    line = first_line(error)
    if len(line) > 160:
        line = line.split(". ")[0] if len(line.split(". ")[0]) <= 160 else line[:157] + "..."
    return line


def short(value) -> str:
    """repr(value), cut to one short line for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
