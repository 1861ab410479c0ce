"""Atomic read-modify-write instructions (`lock`-prefixed, and `xchg` with memory) executed per
request, by function, from a callgrind profile taken with per-instruction counts:

    CG_EXTRA="--dump-instr=yes" python3 benches/compare.py --profile
    python3 benches/locked_ops.py target/compare/callgrind-tokengate.out.1 REQUESTS

REQUESTS is the request count `--profile` printed for that profile. Callgrind counts are
repeatable, so this is a deterministic figure (docs/BENCHMARKS.md, "Atomic operations").
"""

import collections
import re
import subprocess
import sys


def profile_costs(path):
    """-> {object file: {address: instructions executed there}}, {address: function}."""
    names = {}

    def name(token, table):
        m = re.match(r"\((\d+)\)(?: (.*))?", token)
        if not m:
            return token
        if m.group(2):
            table[(id(table), m.group(1))] = m.group(2)
        return table[(id(table), m.group(1))]

    objects, functions = {}, {}
    costs = collections.defaultdict(collections.Counter)
    function_at = {}
    obj = fn = None
    after_call = False
    last = 0
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("ob="):
            obj = name(line[3:], objects)
        elif line.startswith("fn="):
            fn = name(line[3:], functions)
        elif line.startswith("cob="):
            name(line[4:], objects)
        elif line.startswith("cfn="):
            name(line[4:], functions)
        elif line.startswith("calls="):
            after_call = True  # the next cost line is the call's inclusive cost
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            token, *rest = line.split()
            if token.startswith("0x"):
                last = int(token, 16)
            elif token[0] == "+":
                last += int(token[1:])
            elif token[0] == "-":
                last -= int(token[1:])
            if after_call:
                after_call = False
                continue
            costs[obj][last] += int(rest[1]) if len(rest) > 1 else 0
            function_at[(obj, last)] = fn
    return costs, function_at


def locked_addresses(obj):
    """The addresses of the object's atomic read-modify-write instructions (objdump's)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj],
                          capture_output=True, text=True).stdout
    locked = set()
    for m in re.finditer(r"^\s+([0-9a-f]+):\s+(\S+)(.*)$", text, re.M):
        op, args = m.group(2), m.group(3)
        if op == "lock" or (op.startswith("xchg") and "(" in args):
            locked.add(int(m.group(1), 16))
    return locked


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    costs, function_at = profile_costs(path)
    by_function = collections.Counter()
    total = 0
    for obj, at in costs.items():
        if not obj or not obj.startswith("/"):
            continue
        locked = locked_addresses(obj)
        for address, executed in at.items():
            if address in locked:
                total += executed
                by_function[function_at[(obj, address)]] += executed
    print(f"{total / requests:.1f} atomic read-modify-write instructions per request")
    for fn, executed in by_function.most_common(25):
        print(f"{executed / requests:6.2f}  {fn[:120]}")


if __name__ == "__main__":
    main()
