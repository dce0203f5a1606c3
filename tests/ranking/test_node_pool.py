"""One ranking pool per node: real server, real client processes over a real Unix socket."""
from __future__ import annotations

import multiprocessing
import os
import queue
import secrets
import stat
from multiprocessing.connection import AuthenticationError, Client

import pytest

from selfrank.ranking.node_pool import NodePoolClient, NodePoolServer
from selfrank.ranking.pool import PoolError
from selfrank.ranking.ranker import Ranker
from tests.ranking.gates import Gates
from tests.ranking.test_pool import LEXICAL, make_groups


def _client_main(address: str, key: bytes, tag: str, n: int, out) -> None:
    """A training process: submits its own groups (same ids as the other client) and drains them."""
    groups = [{**g, "prompt": f"{tag} {g['prompt']}"} for g in make_groups(n, seed=hash(tag) % 1000)]
    with NodePoolClient(address, key, max_pending=4) as client:
        for g in groups:
            client.submit(g["id"], g["prompt"], g["responses"], policy_version=7)
        results = client.poll() + client.drain()
        stats = client.stats()
    out.put((tag, [(r.id, r.policy_version, r.ranked.to_json()) for r in results], stats,
             [r.to_json() for r in Ranker(LEXICAL).rank(groups)]))


@pytest.fixture
def server(tmp_path):
    key = secrets.token_bytes(32)
    address = str(tmp_path / "pool.sock")
    with NodePoolServer(LEXICAL, address, key, workers=2, max_pending=6, batch_groups=2) as srv:
        yield srv, address, key


def test_two_processes_share_one_pool_and_each_gets_its_own_results(server):
    srv, address, key = server
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(address, key, tag, 15, out)) for tag in ("rank0", "rank1")]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        tag, results, stats, expected = out.get(timeout=600)
        got[tag] = (results, stats, expected)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for tag, (results, stats, expected) in got.items():
        ids = sorted(r[0] for r in results)
        assert ids == sorted(f"g{i}" for i in range(15))  # each group exactly once, to its owner
        by_id = {r[0]: r[2] for r in results}
        assert [by_id[e["id"]] for e in expected] == expected  # same ranking as in process, own prompts
        assert all(r[1] == 7 for r in results)
        assert stats["client_completed"] == 15 and stats["client_unfinished"] == 0
        assert stats["workers"] == 2  # the shared pool's figures come along
    assert srv.pool.stats()["completed"] == 30


def test_socket_is_private_and_a_wrong_key_is_refused(server):
    srv, address, key = server
    assert stat.S_IMODE(os.stat(address).st_mode) == 0o600
    with pytest.raises(AuthenticationError):
        Client(address, family="AF_UNIX", authkey=b"not the key")
    # The server keeps serving after refusing the intruder.
    with NodePoolClient(address, key) as client:
        group = make_groups(1)[0]
        client.submit(group["id"], group["prompt"], group["responses"])
        (result,) = client.drain(timeout=600)
        assert result.ok and result.id == group["id"]


def test_client_backpressure_and_duplicate_ids(server, tmp_path):
    _, address, key = server
    groups = make_groups(3)
    gated, gate = Gates(tmp_path).group("a")  # holds the server's reader for this client until opened
    with NodePoolClient(address, key, max_pending=2) as client:
        client.submit("a", gated["prompt"], gated["responses"])
        with pytest.raises(ValueError, match="already in the pool"):
            client.submit("a", groups[0]["prompt"], groups[0]["responses"])
        client.submit("b", groups[1]["prompt"], groups[1]["responses"])
        with pytest.raises(queue.Full):
            client.submit("c", groups[2]["prompt"], groups[2]["responses"], block=False)
        gate.open()
        assert sorted(r.id for r in client.drain(timeout=600)) == ["a", "b"]
        client.submit("c", groups[2]["prompt"], groups[2]["responses"], block=False)  # room again
        assert [r.id for r in client.drain(timeout=600)] == ["c"]


def test_a_bad_group_fails_alone_and_a_closed_server_is_reported(server):
    srv, address, key = server
    client = NodePoolClient(address, key)
    client.submit("bad", "prompt", "not a list of answers")
    client.submit("good", *[make_groups(1)[0][k] for k in ("prompt", "responses")])
    results = {r.id: r for r in client.drain(timeout=600)}
    assert not results["bad"].ok and results["bad"].error and results["good"].ok
    srv.close()
    client._reader.join(timeout=600)  # its reader ends when it sees the closed socket
    assert not client._reader.is_alive()
    with pytest.raises(PoolError, match="went away"):
        client.poll()
    client.close()
