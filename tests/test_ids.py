"""Event ids: sortable by creation time, unique, and carrying their time."""

from __future__ import annotations

import os
import time

from mfo_actors.ids import id_time, new_id


def test_ids_sort_in_creation_order_and_are_unique() -> None:
    """Ids made one after another sort as made, even within one millisecond."""
    ids = [new_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)


def test_id_time_recovers_the_creation_time() -> None:
    """The first 10 characters are the millisecond timestamp."""
    before = time.time()
    made = new_id()
    after = time.time()
    assert before - 0.002 <= id_time(made) <= after + 0.002


def test_forked_child_draws_different_ids() -> None:
    """A forked child reseeds its generator, so parent and child never share random bits."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write_fd, new_id()[10:].encode())
        os._exit(0)
    os.close(write_fd)
    parent_part = new_id()[10:]
    os.waitpid(pid, 0)
    with os.fdopen(read_fd) as pipe:
        child_part = pipe.read()
    assert child_part and child_part != parent_part
