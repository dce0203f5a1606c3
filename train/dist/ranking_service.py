"""The ranking pool a training process uses: its own pool alone, its node's shared pool under a launcher.

One process: a plain ``RankingPool`` with ``workers`` processes. Several processes: local rank 0 of
each node serves one ``RankingPool`` of ``workers`` processes (workers per node, sized to the node's
spare CPUs) and every rank of the node, itself included, submits through a ``NodePoolClient``; the
socket's name and key come from global rank 0 over the process group (``ranking.node_pool``).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from typing import Iterator

from selfrank.ranking.config import RankingConfig

from selfrank.train import dist


@contextlib.contextmanager
def ranking_pool(config: RankingConfig, workers: int, *, group=None, wait=None,
                 max_pending: int = 256, ready: bool = False) -> Iterator:
    """Yield this process's pool handle; collective under a launcher (every rank must enter and leave).

    ``group``: the process group that carries the socket name and key (a gloo group; default: the
    job's); ``wait``: a barrier callable, so that the server outlives every client of its node;
    ``ready``: return only once the workers have loaded their rankers (so that the first groups are
    not held up by start-up)."""
    from selfrank.ranking.node_pool import NodePoolClient, NodePoolServer
    from selfrank.ranking.pool import RankingPool

    if dist.world_size() == 1:
        pool = RankingPool(config, workers=workers, max_pending=max_pending)
        try:
            if ready:
                pool.wait_ready()
            yield pool
        finally:
            pool.close()
        return

    import torch.distributed as tdist

    payload = [secrets.token_hex(8), secrets.token_bytes(32)] if dist.is_main() else [None, None]
    tdist.broadcast_object_list(payload, src=0, group=group)
    token, key = payload
    address = os.path.join(tempfile.gettempdir(), f"selfrank-pool-{token}.sock")
    server = NodePoolServer(config, address, key, workers=workers, max_pending=max_pending) \
        if dist.local_rank() == 0 else None
    client = None
    try:
        if server is not None and ready:
            server.wait_ready()
        if ready and wait is not None:
            wait()
        client = NodePoolClient(address, key, max_pending=max_pending)
        yield client
    finally:
        if client is not None:
            client.close()
        if wait is not None:
            wait()  # every client of this node is done before its server stops
        if server is not None:
            server.close()  # the listener removes its socket file
