"""The ranking pool's worker process: load the ranker once, then rank the batches the parent sends.

Imports nothing heavy at load time: a spawned worker imports this module before it has set its thread
limits, and the limits must be in the environment before numpy or torch are imported.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

from selfrank.errors import UserError
from selfrank.ranking.config import RankingConfig

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _thread_limits_in_environ(threads: int):
    """Put the thread limits in the environment a spawned worker inherits.

    Setting them inside the worker is too late when the parent's main module (which a spawned
    child re-imports first) imports numpy: OpenBLAS reads its limit once, at load, and with more
    threads than free cores its spinning threads make small matrix ops ~50x slower.
    """
    with _ENV_LOCK:
        saved = {var: os.environ.get(var) for var in _THREAD_VARS}
        os.environ.update({var: str(threads) for var in _THREAD_VARS})
        try:
            yield
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value



def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _rank_batch(ranker, tasks: list) -> list:
    """``[(seq, ranked | None, error | None)]``; a bad group fails alone, never its batch."""
    from selfrank.ranking.ranker import check_group

    out: dict[int, tuple] = {}
    good = []
    for seq, gid, prompt, responses in tasks:
        group = {"id": gid, "prompt": prompt, "responses": responses}
        try:
            check_group(group)
            good.append((seq, group))
        except Exception as exc:
            out[seq] = (None, _describe(exc))
    try:
        for (seq, _), ranked in zip(good, ranker.rank([g for _, g in good])):
            out[seq] = (ranked, None)
    except Exception:
        # Find the culprit: rank one by one (the shared embedding call is lost, correctness is not).
        for seq, group in good:
            try:
                out[seq] = (ranker.rank([group])[0], None)
            except Exception as exc:
                out[seq] = (None, _describe(exc))
    return [(seq, *out[seq]) for seq, *_ in tasks]


def _worker_main(conn, config: RankingConfig, seed: int) -> None:
    """Entry point of a worker process: load the ranker once, then rank batches until told to stop."""
    threads = str(config.embedder.threads)
    for var in _THREAD_VARS:
        os.environ[var] = threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from selfrank.ranking.embed import LEXICAL
        from selfrank.ranking.ranker import Ranker

        if config.embedder.name != LEXICAL:
            import torch

            torch.set_num_threads(config.embedder.threads)
        ranker = Ranker(config, seed=seed)
        ranker.embedder  # load the model now, before reporting ready
        # The first group pays for lazy imports (networkx, scipy: ~0.5 s): pay it with a throwaway group,
        # so that a (re)started worker never holds real groups through it.
        ranker.rank([{"id": "warm-up", "prompt": "warm up", "responses": ["warm up one", "warm up two"]}])
    except BaseException as exc:
        kind = "UserError" if isinstance(exc, UserError) else "error"
        try:
            conn.send(("fatal", kind, str(exc) if kind == "UserError" else _describe(exc)))
        except OSError:
            pass
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message[0] == "stop":
            return
        before = (ranker.stats["embed_s"], ranker.stats["rank_s"])
        results = _rank_batch(ranker, message[1])
        timing = (ranker.stats["embed_s"] - before[0], ranker.stats["rank_s"] - before[1])
        try:
            conn.send(("done", results, timing))
        except OSError:
            return
