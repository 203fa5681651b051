"""Whether anything of a Dynamo-way call ran before Dynamo failed (NOTE [Dynamo failures after part of the call
ran] in ``aot/dynamo_progress.py``): the condition for an eager rerun."""

from __future__ import annotations

import threading

import torch

from aotcache.aot.dynamo_progress import DynamoProgress, marks_region_calls


@marks_region_calls
def _backend(gm, example_inputs):
    return gm.forward


def _region():
    gm = torch.fx.symbolic_trace(lambda x: x.add_(1))
    return _backend(gm, [torch.zeros(2)])


def test_a_region_called_since_the_mark_means_part_of_the_call_ran():
    """A cached frame running a region compiles no frame (another thread's first call compiled it): the region's
    own count is what shows that part of the call ran."""
    region, progress = _region(), DynamoProgress()
    mark = progress.mark()
    buf = torch.zeros(2)
    region(buf)
    assert buf.tolist() == [1.0, 1.0]  # the backend's callable runs the region
    assert not progress.nothing_ran_since(mark)
    assert progress.settled  # every later failure of the entry raises


def test_nothing_called_since_the_mark_allows_the_rerun():
    region, progress = _region(), DynamoProgress()
    region(torch.zeros(2))  # before the mark
    assert progress.nothing_ran_since(progress.mark())
    assert not progress.settled


def test_a_frame_dynamo_completed_since_the_mark_means_part_of_the_call_ran():
    progress = DynamoProgress()
    mark = progress.mark()
    torch.compile(lambda x: x + 1, backend="eager")(torch.zeros(2))
    assert not progress.nothing_ran_since(mark)


def test_region_calls_are_counted_per_thread():
    """Another thread's region call is none of this thread's call."""
    region, progress = _region(), DynamoProgress()
    mark = progress.mark()
    worker = threading.Thread(target=region, args=(torch.zeros(2),))
    worker.start()
    worker.join()
    assert progress.nothing_ran_since(mark)
