"""The statistics `compress_groups` gathers, kept across the attempts of `search` within a
memory budget.

An entry is keyed by its unit and the choices made before it (the channels every earlier
group kept), so an entry after a long prefix of choices is reused only by an attempt that
made all of them again: when the Grams held exceed the budget, the entries after the
longest prefix go first (the oldest of those first). Without a bound, the Grams of every
group of every attempt stay: 10 GB on ConvNeXtXLarge's 8,192-channel groups.

Example:
    >>> cache = StatsCache(budget=2**30)
    >>> cache[("group", "dense", ("stem", (0, 3, 7)))] = stats  # kept while the Grams fit
    >>> cache.held <= 2**30
    True
"""

import collections.abc
import dataclasses

import numpy as np

STATS_CACHE_BUDGET = 1 << 30  # bytes of Gram and cross-product the cache keeps across attempts


def _bytes(value):
    """The bytes of the NumPy arrays a statistics record holds (0 for a model)."""
    if not dataclasses.is_dataclass(value):
        return 0
    fields = (getattr(value, field.name) for field in dataclasses.fields(value))  # astuple would copy them
    return sum(field.nbytes for field in fields if isinstance(field, np.ndarray))


def _prefix(key):
    """How many choices precede the entry (keys are (kind, name, *choices); others: none)."""
    return len(key) - 2 if isinstance(key, tuple) else 0


class StatsCache(collections.abc.MutableMapping):
    """A dict of statistics that keeps at most `budget` bytes of arrays (models are free)."""

    def __init__(self, budget=STATS_CACHE_BUDGET):
        self.budget, self.held, self._entries = budget, 0, {}

    def __getitem__(self, key):
        return self._entries[key][0]

    def __setitem__(self, key, value):
        if key in self._entries:
            del self[key]
        self._entries[key] = (value, _bytes(value))
        self.held += self._entries[key][1]
        while self.held > self.budget:
            victim = max(self._entries, key=lambda kept: (self._entries[kept][1] > 0, _prefix(kept)))
            del self[victim]

    def __delitem__(self, key):
        self.held -= self._entries.pop(key)[1]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)
