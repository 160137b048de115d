"""A finding: what the analysis found, in words computed from measured numbers (no language model), with the
ids it concerns, its evidence, a strength, a verdict and where to look.

A sentence is a template whose fields name numbers of the finding (`"the model calls {n_called} of them"`):
the plain text and the dashboard's markdown (each number a link to the view that shows it) are rendered from
the same template and the same numbers, so a sentence can never say a number the finding does not hold, and a
test can check every quoted number against the cache.
"""
from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

# Ranked first to last; a verdict that cannot tell says "undecided", never "fine".
VERDICT_ORDER = ("shortcut", "labels and outputs mismatched", "undecided", "observation", "your tag")
FORMAT_VERSION = 1


@dataclass
class Finding:
    """One finding. `numbers`: every number a sentence quotes, by field name (plain Python values);
    `links`: field name -> (page url path, query) of the view that shows that number; `page` and `query`: the
    view that shows the whole finding."""

    kind: str
    title: str
    sentences: list[str]
    numbers: dict[str, Any]
    ids: list[int]
    strength: float
    verdict: str
    rests_on: str
    page: str
    query: dict[str, str] = field(default_factory=dict)
    links: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    examples: list[int] = field(default_factory=list)

    def text(self) -> str:
        """The sentences as plain text."""
        return " ".join(render(s, self.numbers) for s in self.sentences)

    def markdown(self) -> str:
        """The sentences as markdown, every number a link: to its own view where `links` names one, else to the
        finding's view."""
        links = {name: self.links.get(name, (self.page, self.query)) for name, value in self.numbers.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return " ".join(render(s, self.numbers, links) for s in self.sentences)

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["text"] = self.text()
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Finding":
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in record.items() if k in names}
        values["links"] = {k: (v[0], dict(v[1])) for k, v in values.get("links", {}).items()}
        return cls(**values)


def url(page: str, query: dict[str, Any]) -> str:
    """The dashboard's relative URL of a page with its query (what a copied link holds)."""
    return f"/{page}" + (f"?{urlencode({k: str(v) for k, v in query.items()})}" if query else "")


def render(template: str, numbers: dict[str, Any], links: dict[str, tuple[str, dict[str, Any]]] | None = None
           ) -> str:
    """The template with each field formatted from `numbers`; with `links`, a linked field as [value](url)."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        value = numbers[name]
        if conversion:
            value = {"r": repr, "s": str, "a": ascii}[conversion](value)
        text = format(value, spec or "")
        if links and name in links:
            page, query = links[name]
            text = f"[{text}]({url(page, query)})"
        out.append(text)
    return "".join(out)


def rank(findings: list[Finding]) -> list[Finding]:
    """By verdict (shortcut first), then strength, strongest first."""
    order = {v: i for i, v in enumerate(VERDICT_ORDER)}
    return sorted(findings, key=lambda f: (order.get(f.verdict, len(order)), -f.strength, f.title))


def to_json(findings: list[Finding], fingerprint: str, notes: list[str]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "cache_fingerprint": fingerprint, "notes": notes,
            "findings": [f.as_dict() for f in findings]}


def from_json(record: dict[str, Any]) -> tuple[list[Finding], list[str]]:
    return [Finding.from_dict(r) for r in record.get("findings", [])], list(record.get("notes", []))


def read_json(path: Path) -> dict[str, Any] | None:
    """The stored record, or None when missing, unreadable or of another format."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format_version") == FORMAT_VERSION else None
