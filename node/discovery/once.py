"""Remember what was already logged, so a bad advert repeated every second is logged once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class Once:
    """``first(key)`` is True the first time a key is seen; bounded so hostile input cannot grow it."""

    def __init__(self, capacity: int = 4096) -> None:
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            return True

    def forget(self, key: Hashable) -> None:
        """Allow the key to be logged again (e.g. after a problem went away and came back)."""
        with self._lock:
            self._seen.pop(key, None)
