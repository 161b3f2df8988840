"""After `mutmut run` in a module's scratch copy: the counts, the survival rate and each surviving mutant as
file:line and the change, printed and kept in survivors.txt beside mutmut's own results.

mutmut names a mutant after its function (`proxy.upstream.sse.xǁSseScannerǁfeed__mutmut_7`) and `mutmut show`
prints its diff against the function alone, so the line is found by looking the removed line up in the file,
from the function's `def` on. The diffs come from mutmut's copy of the file, where every mutant is a function
of its own beside the original (`mutmut show` per survivor took minutes on a big module).
"""

from __future__ import annotations

import difflib
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


def function_bodies(path: Path) -> dict[str, list[str]]:
    """Every function of mutmut's copy of a file (the original as `..._mutmut_orig`, each mutant as
    `..._mutmut_N`), by name, without its `def` line: read once, instead of one `mutmut show` a survivor."""
    bodies: dict[str, list[str]] = {}
    name, indent, body = None, 0, []
    for line in (Path("mutants") / path).read_text().splitlines():
        stripped = line.lstrip()
        depth = len(line) - len(stripped)
        if name is not None and stripped and depth <= indent:
            bodies[name], name = body, None
        if name is None and (m := re.match(r"(?:async )?def (\S+?)\(", stripped)):
            name, indent, body = m.group(1), depth, []
        elif name is not None:
            body.append(line)
    if name is not None:
        bodies[name] = body
    return bodies


_STRING = re.compile(r"""[rRbBfFuU]{0,2}("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


def wording_only(old: str, new: str) -> bool:
    """Whether a mutant changes nothing but the words of a message: the lines are equal with their string
    literals blanked, and each literal that changed is prose (three words or more, not bytes)."""
    if _STRING.sub('""', old) != _STRING.sub('""', new):
        return False
    changed = set(_STRING.findall(old)) - set(_STRING.findall(new))
    return all(not lit.startswith(("b", "B")) and len(lit.split()) >= 3 for lit in
               (m.group(0) for m in _STRING.finditer(old) if m.group(1) in changed))


def show(name: str, bodies: dict[str, list[str]]) -> tuple[str, bool]:
    """`path:line: old  ->  new` for one mutant, and whether it changes only a message's wording."""
    func = name.rpartition(".")[2]
    orig = bodies.get(func.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", [])
    diff = list(difflib.ndiff(orig, bodies.get(func, [])))
    removed = [ln[2:] for ln in diff if ln.startswith("- ")]
    added = [ln[2:] for ln in diff if ln.startswith("+ ")]
    old = removed[0] if removed else ""
    text = f"{where(name, old)}: {old.strip()}  ->  {' / '.join(a.strip() for a in added) or '(removed)'}"
    return text, len(removed) == len(added) == 1 and wording_only(old, added[0])


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
    paths = {Path(*k.rpartition(".")[0].split(".")).with_suffix(".py") for k in survived}
    bodies = {n: b for path in paths for n, b in function_bodies(path).items()}
    shown = {k: show(k, bodies) for k in survived}
    wording = [k for k in survived if shown[k][1]]
    lines[0] += f"; {len(wording)} of the survivors only reword a message"
    lines += [f"  {shown[k][0]}" + ("  [no test reaches it]" if status[k] == "no tests" else "")
              for k in survived if k not in wording]
    if wording:
        lines += ["  only the wording of a message:"] + [f"    {shown[k][0]}" for k in wording]
    text = "\n".join(lines)
    Path("survivors.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
