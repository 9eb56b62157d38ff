"""The error an analysis raises when its input cannot be analysed."""

from __future__ import annotations


class InputError(ValueError):
    """The input cannot be analysed (wrong modality, odd geometry, too few slices, ...).

    The message is shown to users as the reason a job failed, so it must say what was
    wrong with the input in plain words.
    """
