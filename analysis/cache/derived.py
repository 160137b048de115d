"""Results derived from a cache and kept in its directory: where each lives, the command that makes it, how it
records the state of the cache it was made on, and the one record a reader gives when a result is missing or
stale (``MissingResult``, which every dashboard page shows through ``dashboard.common.show_missing``).

Every derived result is written with the cache's durable writes (``analysis.cache.files``:
``file_replaced_atomically`` for one file, ``folder_replaced_atomically`` for a folder), so a reader sees the
old result or the new one, never half of one; `explain --overwrite` removes them with the cache
(``layout.DERIVED_DIRS``). The package that makes a result reads it (``analysis.trust.compare.read_comparison``,
``analysis.explore.concepts.read_concepts``, ...); the cache itself only opens what the job wrote.

Freshness: a result made on one state of the cache is stale on another. Most record ``cache_fingerprint``
(``FINGERPRINT_KEY``: the cache's generation and committed ids, changed by a resume that added images or an
--overwrite; ``is_fresh``); the method comparison records ``cache_identity`` (which cache, whatever its state:
its sample stays valid while the cache grows).
"""
from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.cache.identity import cache_fingerprint
from analysis.cache.layout import ANALYSIS_DIR, TRUST_DIR

FINGERPRINT_KEY = "cache_fingerprint"


def analysis_command(cache_root: Path | str, command: str, *options: str) -> str:
    """`python -m analysis COMMAND --cache <cache_root> OPTIONS`, for a message that says what to run: it names
    the real cache (shell-quoted, as are the options), never a placeholder."""
    return " ".join(["python -m analysis", command, "--cache", *map(shlex.quote, (str(cache_root), *options))])


@dataclass(frozen=True)
class DerivedResult:
    """One kind of derived result: its place under the cache directory and the command that makes it."""

    what: str                        # in words, for messages: "method comparison"
    parts: tuple[str, ...]           # path under the cache directory
    command: str                     # `python -m analysis COMMAND --cache DIR` makes it

    def path(self, cache_root: Path | str) -> Path:
        """Where it lives for the cache at `cache_root`."""
        return Path(cache_root).joinpath(*self.parts)

    def command_line(self, cache_root: Path | str, *options: str) -> str:
        """The command that makes it for the cache at `cache_root` (its real path)."""
        return analysis_command(cache_root, self.command, *options)


COMPARISON = DerivedResult("method comparison", (TRUST_DIR,), "compare-methods")
SANITY_CHECKS = DerivedResult("sanity check", (TRUST_DIR,), "compare-methods")
INSERTION_TESTS = DerivedResult("insertion test", (TRUST_DIR, "insertion"), "insertion-test")
CLUSTERINGS = DerivedResult("offline clustering", (ANALYSIS_DIR,), "cluster")
CLASS_MAPS = DerivedResult("summary of the per-class mean maps", (ANALYSIS_DIR, "class_maps.parquet"), "cluster")
CONCEPTS = DerivedResult("concept analysis", (ANALYSIS_DIR, "concepts"), "concepts")
FINDINGS = DerivedResult("list of findings", (ANALYSIS_DIR, "findings.json"), "findings")
DERIVED_RESULTS = (COMPARISON, SANITY_CHECKS, INSERTION_TESTS, CLUSTERINGS, CLASS_MAPS, CONCEPTS, FINDINGS)
# (The dashboard keeps the clusterings of a selection in layout.DASHBOARD_DIR: made on a click, by no command.)


def fingerprint_record(cache: Any) -> dict[str, str]:
    """What a derived result stores to say which state of the cache it was made on."""
    return {FINGERPRINT_KEY: cache_fingerprint(cache)}


def is_fresh(meta: dict[str, Any], cache: Any) -> bool:
    """Whether a result whose stored meta is `meta` was made on the cache as it is now."""
    return meta.get(FINGERPRINT_KEY) == cache_fingerprint(cache)


@dataclass(frozen=True)
class MissingResult:
    """A derived result a reader cannot show, and the command that makes it: ``state`` is "missing" (never
    made), "stale" (made on another state of the cache, or for another cache: ``reason`` says which) or
    "unreadable" (``reason``: the error); ``note`` adds a sentence (what else to know before running it)."""

    result: DerivedResult
    command: str                     # the whole command line, with the cache's real path
    state: str = "missing"
    reason: str = ""
    note: str = ""

    def sentence(self) -> str:
        """The message, one paragraph, the command in backticks."""
        what = self.result.what
        if self.state == "stale":
            text = (f"The stored {what} is stale ({self.reason or 'made on an older state of this cache'}). Run "
                    f"`{self.command}` to make it again.")
        elif self.state == "unreadable":
            text = f"The stored {what} cannot be read ({self.reason}). Run `{self.command}` to make it again."
        else:
            text = f"No {what} for this cache yet: it has not been computed. Run `{self.command}`."
        return f"{text} {self.note}".strip()


def missing(result: DerivedResult, cache_root: Path | str, state: str = "missing", reason: str = "",
            note: str = "", options: Sequence[str] = ()) -> MissingResult:
    """The record for `result` of the cache at `cache_root`; `options`: appended to the command."""
    if state not in ("missing", "stale", "unreadable"):
        raise ValueError(f"state must be missing, stale or unreadable, not {state!r}")
    return MissingResult(result, result.command_line(cache_root, *options), state, reason, note)
