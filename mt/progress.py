"""Progress bars on stderr for the long phases (tokenizing, training, validation, the decoding-defaults
search): shown when ``progress`` is True, hidden when False, and by default (None) only when stderr is
a terminal, so logs and pipes stay clean."""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(progress: bool | None, **kwargs) -> tqdm:
    return tqdm(file=sys.stderr, dynamic_ncols=True, disable=(not progress) if progress is not None else None, **kwargs)
