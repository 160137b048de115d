"""`python -m analysis export`: the images carrying a tag, as a list (CSV or JSON) or as an ImageFolder of
links, for whoever relabels the data or retrains the model."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import pandas as pd

from analysis.commands.cli_types import check_new_file
from analysis.review import DEFAULT_TAGS, Review, clean_tag, tagged_table

COMMAND = "export"
HELP = ("export the images carrying a tag: a CSV or JSON list (path, label, prediction, tags, note, who, when) "
        "or an ImageFolder of links to the images")
FORMATS = ("csv", "json", "folder")
LIST_NAME = "tagged.csv"          # the list written inside an exported folder (ImageFolder ignores files there)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `export` options."""
    parser.add_argument("--cache", required=True, type=Path, help="a cache made by `explain`")
    parser.add_argument("--tag", required=True, metavar="NAME", help="the tag to export (e.g. 'label error')")
    parser.add_argument("--format", choices=FORMATS, default="csv",
                        help="csv or json: the list; folder: OUT/<class>/<image> links to the images (copies "
                             f"where links cannot be made) plus OUT/{LIST_NAME}")
    parser.add_argument("--by", choices=("label", "prediction"), default="label",
                        help="with --format folder: the class folder an image goes to")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (csv, json; default: standard output) or folder (required for "
                             "--format folder); never overwritten")


def safe_folder_name(name: str) -> str:
    """A class name usable as one folder name (no separators, not '.' or '..', not empty)."""
    cleaned = re.sub(r"[/\\\x00]", "_", str(name)).strip()
    return "_" + cleaned if cleaned in ("", ".", "..") else cleaned


def write_image_folder(frame: pd.DataFrame, out: Path, by: str = "label") -> tuple[int, int, list[str]]:
    """OUT/<class>/<file name> for each row of a `tagged_table` (a second image of the same name in a class
    gets its id appended), written under a temporary name and renamed into place. Symbolic links to the
    images, copies where the file system refuses links. Returns (linked, copied, missing paths); the list is
    written to OUT/tagged.csv with a `file` column (the image's place in OUT, empty when missing)."""
    tmp = out.with_name(f".tmp-{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    linked = copied = 0
    missing: list[str] = []
    files = []
    try:
        taken: set[str] = set()
        for row in frame.itertuples(index=False):
            source = Path(row.path)
            if not source.is_file():
                missing.append(str(source))
                files.append("")
                continue
            folder = safe_folder_name(row.label if by == "label" else row.prediction)
            relative = f"{folder}/{source.name}"
            if relative in taken:
                relative = f"{folder}/{source.stem}-{row.id}{source.suffix}"
            taken.add(relative)
            (tmp / folder).mkdir(exist_ok=True)
            try:
                os.symlink(source, tmp / relative)
                linked += 1
            except OSError:
                shutil.copy2(source, tmp / relative)
                copied += 1
            files.append(relative)
        frame.assign(file=files).to_csv(tmp / LIST_NAME, index=False)
        if out.exists():
            out.rmdir()  # only an empty folder gets here (checked by the caller); raises if that changed
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return linked, copied, missing


def _check_output(args: argparse.Namespace) -> None:
    out = args.out
    if args.format == "folder":
        if out is None:
            raise ValueError("--format folder needs --out FOLDER (a new or empty folder)")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--out {out} exists and is not an empty folder: choose a new one")
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    elif out is not None:
        check_new_file(out)


def run(args: argparse.Namespace) -> int:
    """The `export` subcommand: 0 on success, 2 for a problem found before writing (one line on stderr)."""
    from analysis.cache import CacheError, load
    from analysis.review import ReviewError

    try:
        tag = clean_tag(args.tag)
        _check_output(args)
        cache = load(args.cache)
        review = Review(args.cache, cache=cache)
        frame = tagged_table(review, tag)
        if len(frame) == 0:
            in_use = review.tag_names()
            if tag in DEFAULT_TAGS or tag in in_use:
                raise ValueError(f"no image is tagged {tag!r}: nothing to export")
            raise ValueError(f"unknown tag {tag!r} (tags: {', '.join(repr(t) for t in in_use)})")
    except (CacheError, ReviewError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        if args.format == "folder":
            linked, copied, missing = write_image_folder(frame, args.out, args.by)
            print(f"exported {linked + copied} images tagged {tag!r} to {args.out} ({linked} linked, {copied} "
                  f"copied); list: {args.out / LIST_NAME}", file=sys.stderr)
            if missing:
                print(f"warning: {len(missing)} image file(s) no longer exist and were left out, e.g. {missing[0]}",
                      file=sys.stderr)
            return 0
        text = (frame.to_csv(index=False) if args.format == "csv"
                else json.dumps(frame.to_dict("records"), indent=1, ensure_ascii=False, default=str) + "\n")
        if args.out is None:
            sys.stdout.write(text)
        else:
            with open(args.out, "x", encoding="utf-8", newline="") as handle:  # "x": never overwrite
                handle.write(text)
            print(f"exported {len(frame)} images tagged {tag!r} to {args.out}", file=sys.stderr)
    except OSError as error:
        print(f"error: cannot write {args.out}: {error}", file=sys.stderr)
        return 1
    return 0
