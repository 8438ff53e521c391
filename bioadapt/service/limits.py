"""Per-user limits, so that one user never holds what every user shares: calls running at once (waiting their
turn at the door, on the event loop, holding no thread) and jobs running at once (refused beyond the limit)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from bioadapt.errors import BioadaptError


def _from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


@dataclass(frozen=True)
class Limits:
    """``calls``: one user's calls running at once; ``slow_calls``: of those, calls that can take long (opening
    images, loading models, sampling, Ray tasks); ``waiting``: calls of one user waiting for a turn before more are
    refused; ``jobs``: one user's jobs running at once. Defaults come from $BIOADAPT_MAX_CALLS_PER_USER,
    $BIOADAPT_MAX_SLOW_CALLS_PER_USER and $BIOADAPT_MAX_JOBS_PER_USER when set."""

    calls: int = 8
    slow_calls: int = 2
    waiting: int = 64
    jobs: int = 4

    @classmethod
    def from_env(cls) -> Limits:
        return cls(calls=_from_env("BIOADAPT_MAX_CALLS_PER_USER", cls.calls),
                   slow_calls=_from_env("BIOADAPT_MAX_SLOW_CALLS_PER_USER", cls.slow_calls),
                   jobs=_from_env("BIOADAPT_MAX_JOBS_PER_USER", cls.jobs))


class CallGate:
    """Turns for one user's calls: at most ``calls`` at once, of which at most ``slow_calls`` slow ones; the
    others wait (a coroutine each, no thread), and beyond ``waiting`` waiting calls the next is refused."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._all: dict[str, asyncio.Semaphore] = {}
        self._slow: dict[str, asyncio.Semaphore] = {}
        self._inside: Counter[str] = Counter()  # calls of a user waiting or running

    @asynccontextmanager
    async def turn(self, user: str, slow: bool) -> AsyncIterator[None]:
        if self._inside[user] >= self.limits.calls + self.limits.waiting:
            raise BioadaptError(f"you have {self._inside[user]} calls running or waiting on this service; wait for "
                                "them to answer before sending more")
        self._inside[user] += 1
        every = self._all.setdefault(user, asyncio.Semaphore(self.limits.calls))
        slow_ones = self._slow.setdefault(user, asyncio.Semaphore(self.limits.slow_calls)) if slow else None
        try:
            if slow_ones is not None:  # the slow turn first: a waiting slow call holds none of the user's turns
                await slow_ones.acquire()
            try:
                async with every:
                    yield
            finally:
                if slow_ones is not None:
                    slow_ones.release()
        finally:
            self._inside[user] -= 1
            if not self._inside[user]:  # forget idle users: the tables do not grow with every user ever seen
                del self._inside[user]
                self._all.pop(user, None)
                self._slow.pop(user, None)


class JobQuota:
    """At most ``limit`` running jobs per user, counted by ``running(user)``; a call holds a reservation from its
    check until its job is registered, so that concurrent calls cannot all pass the check."""

    def __init__(self, limit: int, running: Callable[[str], int]):
        self.limit = limit
        self._running = running
        self._reserved: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, user: str) -> Iterator[None]:
        with self._lock:
            busy = self._running(user) + self._reserved[user]
            if busy >= self.limit:
                raise BioadaptError(f"you have {busy} jobs running, the most this service runs for one user at once "
                                    f"({self.limit} jobs); wait for one to finish, or cancel one with cancel_job")
            self._reserved[user] += 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved[user] -= 1
                if not self._reserved[user]:
                    del self._reserved[user]
