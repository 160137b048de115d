"""Findings: what the analysis found, in words, for the people who decide (`python -m analysis findings`).

Each finding (analysis.findings.model.Finding) has a kind, the ids it concerns, its evidence as numbers, a
strength and a verdict, and one to three sentences rendered from those numbers only (no language model). The
kinds are in analysis.findings.kinds.KINDS. Stored as CACHE/analysis/findings.json with the cache's fingerprint,
so a page tells a stale file from a fresh one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.cache.derived import FINDINGS, is_fresh
from analysis.findings.kinds import KINDS
from analysis.findings.model import Finding, from_json, rank, read_json, render, to_json, url

FINDINGS_FILE = FINDINGS.parts[-1]      # CACHE/analysis/findings.json

__all__ = ["FINDINGS_FILE", "Finding", "compute_findings", "current_findings", "findings_path", "read_findings",
           "render", "url", "write_findings"]


def findings_path(cache_root: Path | str) -> Path:
    """Where the findings of the cache at `cache_root` are stored (analysis.cache.derived.FINDINGS)."""
    return FINDINGS.path(cache_root)


def compute_findings(cache: Any) -> list[Finding]:
    """Every kind's findings, ranked: shortcuts first, then by strength."""
    return rank([finding for kind in KINDS for finding in kind(cache)])


def write_findings(cache: Any) -> tuple[Path, list[Finding]]:
    """Compute and store the findings of a loaded cache (atomically); (path, findings)."""
    from analysis.cache.files import write_json_atomic
    from analysis.cache.identity import cache_fingerprint

    findings = compute_findings(cache)
    path = findings_path(cache.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, to_json(findings, cache_fingerprint(cache), []))
    return path, findings


def read_findings(cache: Any) -> tuple[list[Finding], bool] | None:
    """(the stored findings, whether they were made on the cache as it is now); None when none are stored."""
    record = read_json(findings_path(cache.root))
    if record is None:
        return None
    findings, _ = from_json(record)
    return findings, is_fresh(record, cache)


def current_findings(cache: Any) -> tuple[list[Finding], str]:
    """(the findings, where they come from): the stored ones when they were made on the cache as it is now
    ("stored"), else computed from what the cache holds ("computed now"). Writes nothing."""
    stored = read_findings(cache)
    if stored is not None and stored[1]:
        return stored[0], "stored"
    return compute_findings(cache), "computed now"
