"""Where in the model's own code a capture error arises, for the messages of ``CaptureError``s: the innermost
frame of a traceback or stack outside torch and aotcache (``(at <file>:<line> in <function>: `<source>`)``), and
torch's error in one line."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch

__all__ = ["call_site", "site_of", "first_line"]


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none), for a CaptureError quoting it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_OWN_DIRECTORIES = (os.path.dirname(torch.__file__) + os.sep,
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def call_site(exc: BaseException) -> str:
    """`` at <file>:<line> in <function>: `<source>` ``: the innermost frame of the model's code (not torch's,
    not aotcache's) in ``exc``'s traceback, so that a data-dependent op's error says where the model does it
    (DETR's ``if not torch.isfinite(hidden_states).all():``); empty if there is none."""
    return site_of(traceback.extract_tb(exc.__traceback__))


def site_of(stack: Any) -> str:
    """`` at <file>:<line> in <function>: `<source>` `` of the innermost frame of ``stack`` in the model's code."""
    frames = [frame for frame in stack
              if not frame.filename.startswith(_OWN_DIRECTORIES) and not frame.filename.startswith("<")]
    if not frames:
        return ""
    frame = frames[-1]
    where = frame.filename
    marker = where.rfind("site-packages" + os.sep)
    if marker >= 0:
        where = where[marker + len("site-packages" + os.sep):]
    source = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (at {where}:{frame.lineno} in {frame.name}{source})"
