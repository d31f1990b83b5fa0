"""Counting the places where the host waits for the device, on any device (a CPU run included).

On a GPU the host queues kernels ahead of the device, unless it needs a value the device has not computed
yet: a tensor read as a Python value (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``) or an operator
whose output shape depends on the data (``nonzero``, ``masked_select``, boolean indexing, ``unique``...).
Each such read drains the queue. :class:`HostSyncCounter` counts them while it is active, so a CPU test can
bound a step's syncs (``tests/unit/test_ctc.py``, ``tests/e2e/equivalence_worker.py``) and ``bench gpu`` can
report them.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default",
                      "aten.masked_select.default", "aten.unique_consecutive.default",
                      "aten._unique2.default", "aten.repeat_interleave.Tensor",
                      "aten.nonzero_static.default", "aten.index.Tensor"})
"""Operators that read a value or size their output by the data (``index.Tensor`` counts only with a boolean
index, which is a ``nonzero``)."""


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.by_op``; :meth:`paused`
    leaves a region out (e.g. the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._paused = 0
        self._tolist: Any = None

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if not self._paused and name in SYNC_OPS and (name != "aten.index.Tensor" or _boolean_index(args)):
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        self._tolist = torch.Tensor.tolist
        counter, tolist = self, self._tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:  # reads the whole tensor without the dispatcher
            if not counter._paused:
                counter.by_op["Tensor.tolist"] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign,assignment]
        super().__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None
                 ) -> None:
        super().__exit__(kind, error, trace)
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]

    def paused(self) -> _Paused:
        return _Paused(self)


class _Paused:
    def __init__(self, counter: HostSyncCounter) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.counter._paused += 1

    def __exit__(self, *exc: object) -> None:
        self.counter._paused -= 1


def _boolean_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
