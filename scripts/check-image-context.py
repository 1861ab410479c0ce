#!/usr/bin/env python3
"""Builds what the Dockerfile's build stage would see, without a Docker engine.

It reads the Dockerfile's first stage, copies exactly what its COPY lines take from the build
context (after .dockerignore, with Docker's pattern rules) into an empty directory laid out as
the stage's filesystem, and runs the stage's `cargo build` there as `cargo check` with the same
flags. A manifest that names a file the image does not copy (a bench, an example) fails here as
it would in `docker build`.

    python3 scripts/check-image-context.py            # from the repository's root
    KEEP=1 python3 scripts/check-image-context.py     # keep the assembled directory

Deps are shared with the repository's own target/ (CARGO_TARGET_DIR), so a second run is quick.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pattern_regex(pattern):
    """A .dockerignore pattern as a regex over slash-separated paths (Go filepath.Match plus
    `**`, as moby's patternmatcher reads it)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out += re.escape(c)
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out += "[" + body + "]"
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def read_dockerignore(path):
    """[(regex, excluded)] in file order; a later match decides, as in Docker."""
    rules = []
    if not os.path.exists(path):
        return rules
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        if not exclude:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line == ".":
            continue
        rules.append((pattern_regex(line), exclude))
    return rules


def ignored(rel, rules):
    """Whether `rel` (slash-separated, relative to the context) is left out of the context.
    A pattern matching a parent directory matches everything under it."""
    parts = rel.split("/")
    verdict = False
    for regex, exclude in rules:
        for n in range(1, len(parts) + 1):
            if regex.match("/".join(parts[:n])):
                verdict = exclude
                break
    return verdict


def context_files(rules):
    """Every file of the build context, relative, after .dockerignore."""
    files = []
    has_exceptions = any(not exclude for _, exclude in rules)
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if not has_exceptions:
            dirnames[:] = [
                d for d in dirnames if not ignored(f"{rel_dir}/{d}".lstrip("/"), rules)
            ]
        for name in filenames:
            rel = f"{rel_dir}/{name}".lstrip("/")
            if not ignored(rel, rules):
                files.append(rel)
    return files


def instructions(dockerfile):
    """(keyword, arguments) of each instruction, continuation lines joined."""
    text = open(dockerfile, encoding="utf-8").read()
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        yield keyword.upper(), rest.strip()


def first_stage(dockerfile):
    stage, seen_from = [], False
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            if seen_from:
                break
            seen_from = True
            continue
        stage.append((keyword, rest))
    return stage


def copy_into(rootfs, workdir, args, files):
    """Applies one `COPY src... dest` from the context."""
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    if any(w.startswith("--from") for w in shlex.split(args)):
        return
    *sources, dest = words
    dest_abs = dest if dest.startswith("/") else os.path.join(workdir, dest)
    dest_is_dir = dest.endswith("/") or len(sources) > 1
    for source in sources:
        source = os.path.normpath(source).lstrip("/")
        regex = pattern_regex(source)
        matched = False
        for rel in files:
            if rel == source or regex.match(rel):
                target = os.path.join(dest_abs, os.path.basename(rel)) if dest_is_dir else dest_abs
            elif rel.startswith(source + "/") or source == ".":
                # A directory: its contents go under the destination.
                inner = rel if source == "." else rel[len(source) + 1 :]
                target = os.path.join(dest_abs, inner)
            else:
                continue
            matched = True
            out = os.path.join(rootfs, target.lstrip("/"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), out)
        if not matched:
            sys.exit(f"COPY {source}: nothing in the build context matches (see .dockerignore)")


def self_test():
    """Docker's .dockerignore rules on a few cases, so a wrong matcher fails loudly."""
    rules = [(pattern_regex(p), True) for p in ["target", "fuzz", "**/*.md"]]
    rules.append((pattern_regex("README.md"), False))
    cases = {
        "target/release/tokengate": True,
        "fuzz/Cargo.toml": True,
        "docs/BENCHMARKS.md": True,
        "CHANGES.md": True,
        "README.md": False,
        "src/main.rs": False,
        "targets.txt": False,
    }
    for path, want in cases.items():
        assert ignored(path, rules) == want, f".dockerignore matcher: {path} should be {want}"


def main():
    self_test()
    dockerfile = os.path.join(ROOT, "Dockerfile")
    rules = read_dockerignore(os.path.join(ROOT, ".dockerignore"))
    files = context_files(rules)
    build = tempfile.mkdtemp(prefix="tokengate-image-context-")
    rootfs = os.path.join(build, "rootfs")
    workdir, commands = "/", []
    for keyword, rest in first_stage(dockerfile):
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, rest)
            os.makedirs(os.path.join(rootfs, workdir.lstrip("/")), exist_ok=True)
        elif keyword == "COPY":
            copy_into(rootfs, workdir, rest, files)
        elif keyword == "RUN" and "cargo build" in rest:
            commands.append((workdir, rest.replace("cargo build", "cargo check", 1)))
    if not commands:
        sys.exit("the Dockerfile's first stage runs no `cargo build`")
    copied = [f for _, _, fs in os.walk(rootfs) for f in fs]
    top = sorted(os.listdir(os.path.join(rootfs, commands[0][0].lstrip("/"))))
    print(f"build context: {len(files)} files; the build stage copies {len(copied)}")
    print(f"  in {commands[0][0]}: {', '.join(top)}")
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target", "image-context"))
    status = 0
    for cwd, command in commands:
        where = os.path.join(rootfs, cwd.lstrip("/"))
        print(f"in {cwd}: {command}", flush=True)
        status = subprocess.call(command, shell=True, cwd=where, env=env)
        if status:
            break
    if os.environ.get("KEEP"):
        print(f"kept: {build}")
    else:
        shutil.rmtree(build)
    if status:
        sys.exit(f"the image's build fails: `{command}` exited {status}")
    print("the image's cargo command succeeds on exactly the image's build context")


if __name__ == "__main__":
    main()
