"""User-facing errors: the CLI prints them as one line and exits 2; the server maps them to 4xx."""

from __future__ import annotations


class RankerError(Exception):
    """An error caused by the user's input (config, data, request), never by a bug.

    The message must name the file, column, key or field at fault.
    """
