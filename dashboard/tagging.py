"""The tagging widget every page shares (issue 14): tag what you found, see the tags, filter a gallery by them.

One call per use, on any page (`key` is a prefix for the widgets' keys and URL parameters, unique on the page):

```python
from dashboard import tagging

shown = tagging.tag_filter(cache, ids, key="cl_gallery")      # "Show: all images / any tag / untagged /
                                                               #  tagged: X" (URL ?cl_gallery_tag=); resets the
                                                               #  gallery `cl_gallery`'s page number on change
common.gallery(cache, shown, key="cl_gallery",
               captions=tagging.captions_with_tags(cache, shown, my_captions))  # tiles end in their tags
tagging.tag_controls(cache, shown, key="cl_tag")               # tag / untag these images (a form)
frame = tagging.with_tags_column(cache, frame)                 # a CSV export's tags column
tagging.image_tags(cache, image_id, key="img")                 # one image: its tags (remove each) + controls
```

On a read-only dashboard (`--read-only`, `common.read_only`) the tags are shown and there is no form, no remove
button and no name field; the database is opened read-only, so a write that got through would be refused.

The tags live in the cache's review database (`analysis.review.Review`, DIR/review.sqlite, opened once per
cache state with st.cache_resource and created by the first tag: looking at pages writes nothing); who tagged
is the name in the sidebar (`who_sidebar`, called by dashboard/app.py), which the browser remembers in a
cookie. Without a usable database (a read-only cache
directory) the widgets say so and galleries show every image; before the first tag there is no filter.
"""
from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.review import tag_views
from analysis.cache import Cache
from analysis.review import (DB_NAME, DEFAULT_TAGS, MAX_NOTE_LENGTH, MAX_TAG_LENGTH, MAX_WHO_LENGTH, Review,
                             ReviewError)
from dashboard import common

WHO_COOKIE = "fgcam_who"
WHO_KEY = "tag_who"
WHO_WRITTEN = "tag_who_written"
COOKIE_DAYS = 365


# ------------------------------------------------------------------------------------------------ the database
@st.cache_resource(show_spinner=False, max_entries=8)
def _open_review(key: str, _cache: Cache, read_only: bool) -> Review:   # key: common.cache_key (cache and state)
    return Review(str(_cache.root), cache=_cache, read_only=read_only)


def get_review(cache: Cache) -> Review | None:
    """The cache's tags database (opened once per cache state); None when nothing was ever tagged on this cache
    (looking at a page does not create the database: the first tag does), or, with a warning on the page, when
    it cannot be used."""
    if not (Path(cache.root) / DB_NAME).exists():
        return None
    try:
        return _open_review(common.cache_key(cache), cache, common.read_only())
    except (ReviewError, OSError) as error:
        st.warning("Tags are not available: " + _one_line(error), icon=":material/sell:")
        return None


def _writable_review(cache: Cache) -> Review:
    """The database, created on the first tag (for callbacks: ReviewError / OSError when it cannot be, and on a
    read-only dashboard, whose Review refuses every write)."""
    return _open_review(common.cache_key(cache), cache, common.read_only())


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return common.without_paths(lines[0]) if lines else type(error).__name__


# ------------------------------------------------------------------------------------------------ who
def who() -> str | None:
    """The name tags are signed with (the sidebar's), None when not given."""
    name = str(st.session_state.get(WHO_KEY) or "").strip()
    return name[:MAX_WHO_LENGTH] or None


def who_sidebar() -> None:
    """The sidebar's "Your name" field. A new session starts with the name this browser last used (a cookie,
    read from the request); a changed name is written back to the cookie by a line of JavaScript. None on a
    read-only dashboard (nothing is signed there)."""
    if common.read_only():
        return
    try:
        raw = st.context.cookies.get(WHO_COOKIE)
    except Exception:  # no request behind this session (Streamlit's AppTest)
        raw = None
    remembered = urllib.parse.unquote(raw).strip()[:MAX_WHO_LENGTH] if isinstance(raw, str) else ""
    if WHO_KEY not in st.session_state:
        st.session_state[WHO_KEY] = remembered
        st.session_state[WHO_WRITTEN] = remembered
    with st.sidebar:
        name = st.text_input("Your name (signs your tags)", key=WHO_KEY, max_chars=MAX_WHO_LENGTH,
                             placeholder="e.g. Ada", help="Kept in this browser (a cookie), so it is filled in "
                             "next time.").strip()
        if name != st.session_state.get(WHO_WRITTEN):
            st.session_state[WHO_WRITTEN] = name
            # json.dumps makes a JavaScript string literal; "<" escaped so no "</script>" can end the script.
            value = json.dumps(name).replace("<", "\\u003c")
            st.html(f"<script>document.cookie = '{WHO_COOKIE}=' + encodeURIComponent({value}) + "
                    f"'; path=/; max-age={COOKIE_DAYS * 86400}; SameSite=Lax';</script>",
                    unsafe_allow_javascript=True)


# ------------------------------------------------------------------------------------------------ tagging
def _apply(cache: Cache, ids: list[int], key: str, action: str) -> None:
    """Form callback (runs before the page is drawn again, so the page shows the new tags)."""
    state = st.session_state
    new = str(state.get(f"{key}_new") or "").strip()
    tag = new or str(state.get(f"{key}_choice") or "")
    try:
        review = _writable_review(cache)
        if action == "tag":
            count = review.tag(ids, tag, note=state.get(f"{key}_note") or None, who=who())
            message = f"Tagged {count:,} image{'s' if count != 1 else ''} “{tag}”."
        else:
            count = review.untag(ids, tag)
            message = f"Removed “{tag}” from {count:,} image{'s' if count != 1 else ''}."
        state[f"{key}_new"] = ""
        state[f"{key}_note"] = ""
        state[f"{key}_done"] = ("success", message)
    except (ValueError, ReviewError, OSError) as error:
        state[f"{key}_done"] = ("error", _one_line(error))


def tag_controls(cache: Cache, ids: Sequence[int], key: str, what: str | None = None,
                 default: str | None = None) -> None:
    """A small form: a tag (the defaults "shortcut", "label error", "ambiguous", "fine" and every tag in use,
    or free text), an optional note, and Tag / Untag buttons acting on every image of `ids`. `what` names
    the images in the form's heading (default: "these N images"); `default` is the tag chosen at first. On a
    read-only dashboard, no form: one line saying so."""
    if common.read_only():
        st.caption("Read-only dashboard: tags are shown, not changed.")
        return
    review = get_review(cache)
    names = review.tag_names() if review is not None else list(DEFAULT_TAGS)
    if default in names and f"{key}_choice" not in st.session_state:
        st.session_state[f"{key}_choice"] = default
    ids = [int(i) for i in ids]
    count = len(ids)
    heading = what or (f"this image" if count == 1 else f"these {count:,} images")
    with st.form(key=f"{key}_form", border=True, enter_to_submit=False):
        st.markdown(f"**Tag {heading}**" if count else "**Tag**: no image to tag")
        choose, new, note, tag_button, untag_button = st.columns([2, 2, 3, 1, 1], vertical_alignment="bottom")
        choose.selectbox("Tag", names, key=f"{key}_choice")
        new.text_input("or a new tag", key=f"{key}_new", max_chars=MAX_TAG_LENGTH, placeholder="free text")
        note.text_input("Note (optional)", key=f"{key}_note", max_chars=MAX_NOTE_LENGTH)
        tag_button.form_submit_button("Tag", on_click=_apply, args=(cache, ids, key, "tag"), type="primary",
                                      icon=":material/sell:", disabled=not count, width="stretch")
        untag_button.form_submit_button("Untag", on_click=_apply, args=(cache, ids, key, "untag"),
                                        disabled=not count, width="stretch")
    done = st.session_state.pop(f"{key}_done", None)
    if done is not None:
        (st.success if done[0] == "success" else st.error)(done[1])


def _untag_one(review: Review, image_id: int, tag: str, key: str) -> None:
    try:
        review.untag([image_id], tag)
        st.session_state[f"{key}_done"] = ("success", f"Removed “{tag}”.")
    except (ValueError, ReviewError) as error:
        st.session_state[f"{key}_done"] = ("error", _one_line(error))


def image_tags(cache: Cache, image_id: int, key: str) -> None:
    """One image's tags (tag, note, who, when; a button removes each), then `tag_controls` for it."""
    review = get_review(cache)
    try:
        tags = review.tags() if review is not None else pd.DataFrame(columns=["id", "tag", "note", "who", "time"])
    except ReviewError as error:
        st.warning("Tags are not available: " + _one_line(error))
        return
    mine = tags[tags["id"] == int(image_id)]
    if mine.empty:
        st.caption("No tag yet.")
    for row in mine.itertuples(index=False):
        text, button = st.columns([6, 1], vertical_alignment="center")
        signed = " · ".join(part for part in (row.who, str(row.time)) if isinstance(part, str) and part)
        text.markdown(f":violet-badge[:material/sell: {row.tag}] "
                      + (f"{_markdown_text(row.note)} " if isinstance(row.note, str) and row.note else "")
                      + f":gray[{_markdown_text(signed)}]")
        if not common.read_only():
            button.button("Remove", key=f"{key}_remove_{row.tag}", on_click=_untag_one,
                          args=(review, int(image_id), row.tag, f"{key}_tag"), icon=":material/close:")
    tag_controls(cache, [int(image_id)], key=f"{key}_tag")


def _markdown_text(text: str) -> str:
    """User text shown literally in st.markdown (no links, no formatting, no colour directives)."""
    special = "\\`*_{}[]()#+-.!|<>:~$"
    return "".join("\\" + c if c in special else c for c in text.replace("\n", " "))


# ------------------------------------------------------------------------------------------------ galleries
def _reset_gallery_page(gallery_key: str) -> None:
    st.session_state.pop(f"{gallery_key}_page", None)
    st.query_params.pop(f"{gallery_key}_page", None)


def tag_filter(cache: Cache, ids: Sequence[int], key: str, container=None) -> list[int]:
    """A "Show" select over the gallery's images: all, any tag, untagged, or one tag in use (URL ?KEY_tag=).
    Returns the ids it keeps, in the order given. A change puts the gallery `key` back on its first page."""
    ids = [int(i) for i in ids]
    review = get_review(cache)
    if review is None:
        return ids
    try:
        choices = tag_views.filter_choices(review)
    except ReviewError as error:
        st.warning("Tags are not available: " + _one_line(error))
        return ids
    param = f"{key}_tag"
    current = common.query_value(param, tag_views.ALL, str, choices=choices)
    if st.session_state.get(param) not in choices:  # a tag removed since, or a new link
        st.session_state.pop(param, None)
    where = container if container is not None else st
    choice = where.selectbox("Show (by tag)", choices, index=choices.index(current), key=param,
                             on_change=_reset_gallery_page, args=(key,))
    common.set_query(**{param: None if choice == tag_views.ALL else choice})
    kept = tag_views.filter_by_tag(review, ids, choice)
    if choice != tag_views.ALL:
        where.caption(f"{len(kept):,} of {len(ids):,} images: {choice}")
    return kept


def captions_with_tags(cache: Cache, ids: Sequence[int],
                       captions: Callable[[int], str] | None = None) -> Callable[[int], str]:
    """Tile captions (`captions(id)`, default "#id") followed by the image's tags ("· tag: a", "· tags: a; b"),
    for `common.gallery`."""
    base = captions or (lambda i: f"#{i}")
    review = get_review(cache)
    if review is None or not len(ids):
        return base
    column = review.tag_column([int(i) for i in ids])
    tags = {int(i): t for i, t in column.items()}

    def caption(image_id: int) -> str:
        text = tags.get(int(image_id), "")
        if not text:
            return base(image_id)
        return f"{base(image_id)} · {'tags' if '; ' in text else 'tag'}: {text}"

    return caption


def with_tags_column(cache: Cache, frame: pd.DataFrame, id_column: str = "id") -> pd.DataFrame:
    """`frame` with a `tags` column ("; "-joined; empty when the image has none or tags are not available)."""
    review = get_review(cache)
    if review is None:
        return frame.assign(tags="")
    return tag_views.with_tags(frame, review, id_column=id_column)
