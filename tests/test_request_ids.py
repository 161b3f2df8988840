"""Request ids: `req_` and 24 hex digits, unique, and not shared by a forked worker with its parent (the ids come
from a generator in the process, reseeded in a forked child)."""

from __future__ import annotations

import os
import re

from proxy.app.errors import new_request_id


def test_ids_have_the_documented_shape_and_do_not_repeat():
    ids = [new_request_id() for _ in range(10000)]
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(new_request_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    mine = {new_request_id() for _ in range(5)}
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    assert len(child) == 5 and not child & mine
