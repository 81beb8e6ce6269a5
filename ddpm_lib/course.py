"""The course's run sizes: how many images, points and steps each notebook uses, in full or quick mode.

A reader runs a notebook in full mode. The test suite runs every notebook in quick mode, the same
code on fewer images and steps, when the environment variable ``DDPM_SMOKE`` is ``1`` (``make test``
sets it). A notebook asks for its sizes once, with :func:`run_sizes`, and never reads the variable.
"""

from __future__ import annotations

import os
from typing import TypeVar

QUICK_MODE_VARIABLE = "DDPM_SMOKE"  # "1": quick mode

Sizes = TypeVar("Sizes")


def quick_mode() -> bool:
    """Whether the course runs in quick mode (``DDPM_SMOKE=1``)."""
    return os.environ.get(QUICK_MODE_VARIABLE) == "1"


def run_sizes(full: Sizes, quick: Sizes) -> Sizes:
    """``full`` (a notebook's sizes for a reader) or, in quick mode, ``quick``: the same structure, smaller."""
    return quick if quick_mode() else full
