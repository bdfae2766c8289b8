"""Progress bars for long loops: engines' steps and estimators' passes (AIS temperatures, IWAE
batches, ODE steps), shown on a terminal and quiet elsewhere.

``show_progress(True/False/None)`` sets what ``enabled=None`` means for the whole process: the
command line's ``--progress``/``--no-progress`` reach every loop this way without each estimator
taking a flag.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

_default: bool | None = None


def show_progress(enabled: bool | None) -> None:
    """``True``: bars even off a terminal; ``False``: never; ``None``: on a terminal only."""
    global _default
    _default = enabled


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar; ``enabled=None`` follows :func:`show_progress`.

    In a notebook with ipywidgets the bar is a widget; without them it is the text bar (tqdm.auto
    would warn "IProgress not found" in every notebook that lacks the widgets)."""
    enabled = _default if enabled is None else enabled
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    if find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)
