"""Names on the Hugging Face Hub: a model or dataset path that is no local path but reads as
``org/name`` is fetched from the Hub (or its cache)."""

from __future__ import annotations

import re


# The Hub's rule for repository names: letters, digits, "-", "_" and ".", not starting with
# "." or "-", so that ./model and ../data stay (mistyped) local paths.
_REPO_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


def is_hub_id(path: str) -> bool:
    return bool(_REPO_ID.fullmatch(path))
