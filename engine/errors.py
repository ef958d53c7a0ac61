"""The one error family that means "the user's input is wrong".

A config key or value, a data file, a path, a prompt file: each is a systematic problem of the
input, not of the engine. Entry points print its message as one line on stderr and exit with
status 2, without a traceback (``sail.launch.entry.user_input_errors``), so its message must
name the file and the key, row or field on its own.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the file and the key, row or field."""


class AgreedInputError(InputError):
    """Another rank's ``InputError``, raised here too so that every rank of the job ends
    together (``Ranks.agreed``); rank 0 prints it, the other ranks exit with the same status
    without repeating it."""

    def __init__(self, message: str, rank: int = 0):
        super().__init__(message)
        self.rank = rank
        """The rank that first raised it."""
