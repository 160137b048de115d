"""Findings: what the analysis found, in words, for the people who decide (`python -m analysis findings`).

Each finding (analysis.findings.model.Finding) has a kind, the ids it concerns, its evidence as numbers, a
strength and a verdict, and one to three sentences rendered from those numbers only (no language model). The
kinds are in analysis.findings.kinds.KINDS. Stored as CACHE/analysis/findings.json with the cache's fingerprint,
so a page tells a stale file from a fresh one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.findings.kinds import KINDS
from analysis.findings.model import Finding, from_json, rank, read_json, render, to_json, url

FINDINGS_FILE = "findings.json"

__all__ = ["FINDINGS_FILE", "Finding", "compute_findings", "findings_path", "read_findings", "render", "url",
           "write_findings"]


def findings_path(cache_root: Path | str) -> Path:
    from analysis.cache.layout import ANALYSIS_DIR

    return Path(cache_root) / ANALYSIS_DIR / FINDINGS_FILE


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
    from analysis.cache.identity import cache_fingerprint

    record = read_json(findings_path(cache.root))
    if record is None:
        return None
    findings, _ = from_json(record)
    return findings, record.get("cache_fingerprint") == cache_fingerprint(cache)
