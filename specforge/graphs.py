"""CUDA graphs of plain functions over static input buffers: the decoder's and the generator's forwards are
replayed from them, so that a step costs one launch instead of one per kernel."""

from __future__ import annotations

import torch


class CapturedCall:
    """A CUDA graph of fn over static input buffers; replay copies new inputs into them first.
    Any other tensor fn reads must outlive the graph (a module buffer, not a temporary of the first call):
    replays read the memory the capture saw. `pool` (`torch.cuda.graph_pool_handle()`): a memory pool shared
    with other graphs, whose temporaries then overlap: safe when the graphs never run at once and each one's
    outputs are read (cloned) before another replays."""

    def __init__(self, fn, args, pool=None):
        self.inputs = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up, twice: kernels chosen, workspaces allocated, and any torch.compile'd code compiled (a
            # recompile on the second call included), since nothing may compile or synchronise while capturing.
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)
        self.graph.replay()

    def replay(self, args):
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
