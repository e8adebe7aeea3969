"""The lease protocol on a store without an atomic create (S3 without conditional writes):
every interleaving of two runs' writes and listings gives at most one holder."""

from __future__ import annotations

import copy
import itertools
import random
import threading
import time

import pytest

from cbir_lib.common import lease


class ObjectStore:
    """S3's semantics in memory: a put replaces a whole object, a listing sees every put that
    returned before it began, and nothing is created exclusively. ``hook(op)`` runs before
    each put and listing (the tests' scheduler)."""

    def __init__(self, hook=lambda op: None):
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.lock = threading.Lock()
        self.hook = hook

    def put(self, name, data):
        self.hook("put")
        with self.lock:
            self.objects[name] = (data, time.time())

    def names(self):
        self.hook("names")
        with self.lock:
            return sorted(self.objects)

    def get(self, name):
        with self.lock:
            return self.objects.get(name, (None,))[0]

    def age_s(self, name):
        with self.lock:
            return time.time() - self.objects[name][1] if name in self.objects else None

    def delete(self, name):
        with self.lock:
            self.objects.pop(name, None)

    def view(self, hook) -> ObjectStore:
        """The same objects, seen by one run with its own scheduling hook."""
        other = copy.copy(self)
        other.hook = hook
        return other


def _me(holder: str, run_id: str = "r") -> dict:
    return {"holder": holder, "stage": "build_index", "run_id": run_id, "host": "h", "pid": 1}


class Schedule:
    """Lets each run's put and listing go in a given order (``"ABAB"``: A's put, B's put, ...)."""

    def __init__(self, order: str):
        self.order, self.cv = list(order), threading.Condition()

    def hook_for(self, who: str):
        def hook(op):
            with self.cv:
                assert self.cv.wait_for(lambda: not self.order or self.order[0] == who, timeout=10), "schedule stuck"
                if self.order:
                    self.order.pop(0)
                self.cv.notify_all()

        return hook


def _race(order: str) -> dict[str, bool]:
    store, sched = ObjectStore(), Schedule(order)
    held: dict[str, bool] = {}

    def run(who):
        try:
            lease.acquire(store.view(sched.hook_for(who)), _me(who), "t", dead=lambda c: False)
            held[who] = True
        except lease.ConcurrentRun:
            held[who] = False

    threads = [threading.Thread(target=run, args=(w,)) for w in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert set(held) == {"A", "B"}
    left = {n[:1] for n in store.objects}
    assert left == {w for w, h in held.items() if h}  # a refused run leaves no claim behind
    return held


ORDERS = sorted({"".join(p) for p in itertools.permutations("AABB")})


@pytest.mark.parametrize("order", ORDERS)
def test_every_interleaving_of_two_runs_gives_at_most_one_holder(order):
    held = _race(order)
    assert sum(held.values()) <= 1
    first, second = order[:2], order[2:]
    if first in ("AA", "BB"):  # one run wrote and listed before the other wrote: it holds, the other is refused
        assert held[first[0]] and not held[second[0]]
    # Else both wrote before either listed: the first to list backs off, and the other holds
    # only if that claim was already withdrawn when it listed. Never both.


def test_many_runs_racing_in_threads_never_overlap():
    rng = random.Random(0)
    store = ObjectStore(hook=lambda op: time.sleep(rng.random() * 0.002))
    inside, most, wins = [0], [0], [0]
    guard = threading.Lock()

    def run(i):
        for attempt in range(30):
            try:
                mine = lease.acquire(store, _me(f"{i:02d}-{attempt}"), "t", dead=lambda c: False)
            except lease.ConcurrentRun:
                time.sleep(rng.random() * 0.003)
                continue
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                wins[0] += 1
            time.sleep(0.002)
            with guard:
                inside[0] -= 1
            lease.release(store, mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1 and wins[0] > 0
    assert not store.objects


def _claim(holder, heartbeat, **kw) -> bytes:
    return lease.claim_bytes({**_me(holder, "old"), **kw}, heartbeat)


def test_a_stale_or_dead_claim_is_taken_over_and_a_live_one_is_named():
    store = ObjectStore()
    store.put("expired.json", _claim("expired", time.time() - 2 * lease.TTL_S))
    store.put("dead.json", _claim("dead", time.time(), pid=-7))
    mine = lease.acquire(store, _me("new"), "t", dead=lambda c: c.get("pid") == -7)
    assert sorted(store.objects) == [mine]  # both stale claims are gone
    with pytest.raises(lease.ConcurrentRun, match="build_index run r \\(host h, pid 1\\) is running"):
        lease.acquire(store, _me("late"), "t", dead=lambda c: False)
    assert sorted(store.objects) == [mine]
    lease.release(store, mine)
    assert not store.objects


def test_an_unreadable_claim_is_live_while_young_and_stale_when_old():
    store = ObjectStore()
    store.put("half.json", b'{"holder": "x", "heart')  # a local write caught halfway
    with pytest.raises(lease.ConcurrentRun, match="being written"):
        lease.acquire(store, _me("new"), "t")
    store.objects["half.json"] = (store.objects["half.json"][0], time.time() - 2 * lease.TTL_S)
    mine = lease.acquire(store, _me("new"), "t")
    assert sorted(store.objects) == [mine]


def test_a_replaces_temporary_sibling_is_not_a_claim():
    store = ObjectStore()
    store.put("other.json.1234.tmp", b"{}")
    assert lease.acquire(store, _me("new"), "t") == "new.json"
