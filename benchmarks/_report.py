"""Keep generated tables in docs: each lives between two marker comments."""

from __future__ import annotations

from pathlib import Path

from napari_jointattn.engine.io.files import write_bytes_atomic


def update_section(doc: Path, key: str, text: str) -> None:
    """Replace the text between ``<!-- begin: key -->`` and ``<!-- end: key -->``.

    A section not yet in ``doc`` is appended; the file is written atomically.
    """
    begin, end = f"<!-- begin: {key} -->", f"<!-- end: {key} -->"
    old = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + block + "\n"
    write_bytes_atomic(doc, new.encode())
