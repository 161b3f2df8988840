"""After `mutmut run` in a module's scratch copy: the counts, the survival rate and each surviving mutant as
file:line and the change, printed and kept in survivors.txt beside mutmut's own results.

mutmut names a mutant after its function (`proxy.upstream.sse.xǁSseScannerǁfeed__mutmut_7`) and `mutmut show`
prints its diff against the function alone, so the line is found by looking the removed line up in the file,
from the function's `def` on.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

MUTMUT = str(Path(sys.executable).with_name("mutmut"))
CAUGHT = ("killed", "timeout", "segfault", "suspicious")  # the tests noticed the change (or hung on it)


def results() -> dict[str, str]:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def where(name: str, removed: str) -> str:
    """`path:line` of the mutated line: the first line equal to `removed` after the function's def."""
    module, _, last = name.rpartition(".")
    base = last.rsplit("__mutmut_", 1)[0]  # "xǁClassǁmethod" or "x_function"
    func = base.split("ǁ")[-1] if "ǁ" in base else base[2:]
    path = Path(*module.split(".")).with_suffix(".py")
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(rf"\s*(async )?def {re.escape(func)}\b", ln)), 0)
    for i in range(start, len(lines)):
        if lines[i].strip() == removed.strip():
            return f"{path}:{i + 1}"
    return f"{path} ({func})"


def show(name: str) -> str:
    """`path:line: - old  + new` for one mutant."""
    diff = subprocess.run([MUTMUT, "show", name], capture_output=True, text=True).stdout.splitlines()
    removed = [ln[1:] for ln in diff if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:] for ln in diff if ln.startswith("+") and not ln.startswith("+++")]
    old = removed[0] if removed else ""
    return f"{where(name, old)}: {old.strip()}  ->  {' / '.join(a.strip() for a in added) or '(removed)'}"


def main(module: str, patterns: list[str]) -> None:
    status = results()
    if patterns:
        status = {k: v for k, v in status.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
    counts = Counter(status.values())
    ran = sum(n for s, n in counts.items() if s != "not checked")
    caught = sum(counts[s] for s in CAUGHT)
    survived = [k for k, v in status.items() if v in ("survived", "no tests")]
    rate = f"{len(survived) / ran * 100:.1f}%" if ran else "-"
    lines = [f"{module}: {ran} mutants run ({len(status)} selected), {caught} caught, {len(survived)} survived "
             f"({rate}); " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    lines += [f"  {show(k)}" + ("  [no test reaches it]" if status[k] == "no tests" else "") for k in survived]
    text = "\n".join(lines)
    Path("survivors.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
