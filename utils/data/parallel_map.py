"""An ordered, memory-bounded parallel map for the data scripts.

`Pool.imap` reads its whole input iterable ahead of the workers, so a generator of 4 MB text
chunks would be pulled into RAM at once. `ordered_map` keeps at most `max_inflight` tasks
submitted and yields results in submission order: output is the same for any number of
workers, and memory stays flat.
"""
import collections
import multiprocessing


def ordered_map(func, tasks, num_workers: int, max_inflight: int = None):
    """Yield func(task) for each task, in order; `num_workers` <= 1 runs in this process."""
    if num_workers <= 1:
        for task in tasks:
            yield func(task)
        return
    max_inflight = max_inflight or 2 * num_workers
    with multiprocessing.get_context().Pool(num_workers) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(func, (task,)))
            if len(pending) >= max_inflight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
