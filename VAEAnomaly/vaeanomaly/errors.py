"""The error every input check raises (a volume or mask that cannot be used); a leaf, so that the volume
code and the mask checks below it (brainmask.py) raise the same type."""
from __future__ import annotations


class VolumeError(ValueError):
    """An input volume or mask that cannot be used, with a message that says what to do."""


class NotSkullStrippedError(VolumeError):
    """A head (scalp, skull, air) scored without a brain mask: scoring extracts its brain where it can
    (brainextract.py), else this is the refusal, saying how to get a mask."""
