#!/bin/sh
# `make mutate [MODULE=sse] [MUTANTS='*[05]']`: one mutmut run per module, each in its own scratch copy under
# .mutate/<module>/ with that module's settings (mutate/<module>.cfg) as its setup.cfg, so each module's mutants
# run only the test files that module's tests live in, and each keeps its own results between runs.
# Called by the Makefile with MUTMUT (the mutmut to run), JOBS (parallel mutants) and the module names.
set -euf  # -f: MUTANTS holds globs for mutmut, not for the shell
root=$(pwd)
python=$(dirname "$MUTMUT")/python
for module in "$@"; do
    cfg="mutate/$module.cfg"
    if [ ! -f "$cfg" ]; then
        echo "make mutate: no module '$module' (one of: $(ls mutate | sed -n 's/\.cfg$//p' | tr '\n' ' '))" >&2
        exit 2
    fi
    work=".mutate/$module"
    mkdir -p "$work"
    # A fresh copy of the code and tests each time; mutants/ (mutmut's results) stays, so unchanged
    # functions are not run again.
    rm -rf "$work/proxy" "$work/policies" "$work/tests"
    cp -r proxy policies tests pyproject.toml "$work/"
    cp "$cfg" "$work/setup.cfg"
    find "$work" -path "$work/mutants" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
    echo "== $module: $(sed -n 's/^only_mutate = //p' "$cfg")" >&2
    # MUTANTS: mutant names or globs (fnmatch) to run only some, e.g. '*[05]' for about a fifth.
    (cd "$work" && nice -n 10 "$MUTMUT" run --max-children "$JOBS" ${MUTANTS:-} > run.log 2>&1) \
        || { tail -n 30 "$work/run.log" >&2; exit 1; }
    (cd "$work" && "$python" "$root/mutate/summary.py" "$module" ${MUTANTS:-})
done
