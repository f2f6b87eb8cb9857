"""Progress bars for every wait of more than a few seconds (training, teacher fine-tunes, the teacher pass, evaluations,
tokenising): tqdm with rate and ETA on stderr, shown after 2 s. None when stderr is not a terminal (a log file, CI) so
logs stay readable; KDRUN_PROGRESS=1 shows them anyway, KDRUN_PROGRESS=0 never."""
from __future__ import annotations

import os
import sys


def enabled() -> bool:
    forced = os.environ.get("KDRUN_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty() and not os.environ.get("CI")
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def bar(iterable=None, *, total=None, desc: str, unit: str = "it", initial: int = 0, show: bool = True, **kwargs):
    """A tqdm bar (shown only where enabled() and `show`, e.g. rank 0 under DDP)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, mininterval=1.0,
                delay=kwargs.pop("delay", 2.0), disable=not (show and enabled()), **kwargs)
