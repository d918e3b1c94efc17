"""Build the held-out evaluation texts in data/heldout/ (committed; this script documents how they were made).

- `kjv_luke_acts.txt`: the Gospel of Luke and the Acts of the Apostles, King James Version (public domain), from the
  Debian package `bible-kjv-text` 4.38 (read with its `bible` program from `bible-kjv` 4.38:
  `apt-get download bible-kjv-text bible-kjv`, `dpkg-deb -x` both into DIR). One paragraph per chapter.
- `python_reference.txt`: the Python language reference topics that CPython ships as `pydoc_data.topics` (Python
  Software Foundation License), of the Python running this script (3.11.7 for the committed file).

    python scripts/build_heldout_text.py --kjv-root DIR
"""

import argparse
import os
import re
import subprocess

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "heldout")
BOOKS = [("Luke", "The Gospel According to Saint Luke", 24), ("Acts", "The Acts of the Apostles", 28)]


def kjv_text(root: str) -> str:
    program, data = os.path.join(root, "usr/bin/bible"), os.path.join(root, "usr/lib")
    parts = []
    for book, title, chapters in BOOKS:
        parts.append(title)
        for chapter in range(1, chapters + 1):
            out = subprocess.run([program, "-p", data, "-f", f"{book}{chapter}:1-{book}{chapter}:999"],
                                 capture_output=True, text=True, check=True).stdout
            verses = [re.sub(r"^\S+\d+:\d+ ", "", line).strip() for line in out.splitlines() if line.strip()]
            verses = [v for v in verses if not v.startswith(tuple(b for b, _, _ in BOOKS if b != book))]
            parts.append(f"Chapter {chapter}\n\n" + " ".join(verses))
    return "\n\n".join(parts) + "\n"


def python_reference_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kjv-root", required=True, help="folder holding the two extracted Debian packages")
    args = parser.parse_args()
    os.makedirs(HERE, exist_ok=True)
    for name, text in (("kjv_luke_acts.txt", kjv_text(args.kjv_root)), ("python_reference.txt", python_reference_text())):
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(text)
        print(name, len(text), "characters")
