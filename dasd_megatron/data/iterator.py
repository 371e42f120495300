"""`PromptIterator`: an endless, epoch-aware, resumable walk over the training examples.

Epoch `e` visits the examples in the permutation `argsort(splitmix64(key(seed, e) + i))` (or in order when
`shuffle=False`). The permutation is integer arithmetic, not a library RNG, so it is the same on every machine and
every numpy/Python version: a checkpoint resumes with the same next prompts anywhere. The position is
`(epoch, offset)`; `state_dict()` saves it together with the seed, the shuffle flag, the number of examples and a
fingerprint of the examples, and `load_state_dict()` refuses a state taken on different data (the resumed order
would silently differ).

Batches may straddle an epoch boundary: `next_batch(n)` finishes the current epoch and continues with the next one.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np

from dasd_megatron.data.errors import DataError
from dasd_megatron.data.example import MathExample

_M = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch `epoch` (a permutation of range(n)), a pure function of (n, seed, epoch)."""
    key = _splitmix64(np.array([(seed * 0x100000001B3 + epoch) & _M], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(n, dtype=np.uint64) + key)
    return np.argsort(keys, kind="stable")


def fingerprint(examples: Sequence[MathExample]) -> str:
    """A short hash of the examples' (index, problem, answer), to tell whether a saved position fits this data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.index}\x1f{ex.problem}\x1f{ex.answers}\x1e".encode())
    return h.hexdigest()[:16]


class PromptIterator:
    """Yields `MathExample`s forever, epoch after epoch; `state_dict()`/`load_state_dict()` resume the position."""

    def __init__(self, examples: Sequence[MathExample], seed: int = 1234, shuffle: bool = True):
        if len(examples) == 0:
            raise DataError("PromptIterator got no examples. Fix: check the data set and data.limit")
        self.examples = examples
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._epoch = 0
        self._offset = 0
        self._order_epoch = -1
        self._order: np.ndarray = np.arange(0)
        self._fingerprint = fingerprint(examples)

    @classmethod
    def from_config(cls, examples: Sequence[MathExample], cfg) -> "PromptIterator":
        """Build from a `DataConfig` (`cfg.seed`, `cfg.shuffle`)."""
        return cls(examples, seed=cfg.seed, shuffle=cfg.shuffle)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def offset(self) -> int:
        """Examples already taken from the current epoch."""
        return self._offset

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            n = len(self.examples)
            self._order = epoch_permutation(n, self.seed, self._epoch) if self.shuffle else np.arange(n)
            self._order_epoch = self._epoch
        return self._order

    def __iter__(self) -> Iterator[MathExample]:
        return self

    def __next__(self) -> MathExample:
        ex = self.examples[int(self._current_order()[self._offset])]
        self._offset += 1
        if self._offset == len(self.examples):
            self._epoch, self._offset = self._epoch + 1, 0
        return ex

    def next_batch(self, n: int) -> list[MathExample]:
        """The next `n` examples (crossing into the next epoch when needed)."""
        if n < 1:
            raise ValueError(f"next_batch(n={n}): n must be >= 1")
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "offset": self._offset, "seed": self.seed, "shuffle": self.shuffle,
                "num_examples": len(self.examples), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses a state from other data or another seed/shuffle setting."""
        for key, mine in (("num_examples", len(self.examples)), ("fingerprint", self._fingerprint),
                          ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise DataError(
                    f"prompt iterator state: {key}={state[key]!r} but this run has {mine!r}, so the resumed prompt "
                    "order would differ. Fix: resume with the same data set, data.limit, data.dedupe, "
                    "data.max_prompt_tokens, data.seed and data.shuffle as the checkpointed run"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self.examples):
            raise DataError(f"prompt iterator state: epoch={epoch} offset={offset} is out of range for "
                            f"{len(self.examples)} examples. Fix: use the state saved by state_dict()")
        self._epoch, self._offset = epoch, offset
