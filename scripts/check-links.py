#!/usr/bin/env python3
"""Checks that every relative link in the repository's Markdown resolves to a file inside it.

    python3 scripts/check-links.py
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "target", "corpus", "artifacts"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def main():
    problems, checked = [], 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if not name.endswith(".md"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            for number, line in enumerate(open(path, encoding="utf-8"), 1):
                for target in LINK.findall(line):
                    if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                        continue
                    checked += 1
                    file_part = target.split("#", 1)[0]
                    resolved = os.path.normpath(os.path.join(dirpath, file_part))
                    if os.path.relpath(resolved, ROOT).startswith(".."):
                        problems.append(f"{rel}:{number}: `{target}` points outside the repository")
                    elif not os.path.exists(resolved):
                        problems.append(f"{rel}:{number}: `{target}` does not exist")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{checked} relative links, all inside the repository and present")


if __name__ == "__main__":
    main()
