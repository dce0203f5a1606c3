"""The distributed layer every training stage runs on: accelerate (DDP) or accelerate + DeepSpeed ZeRO.

One code path serves one process (no launcher), CPU multi-process (gloo) and GPU clusters (NCCL). A stage
written for one process is ported by swapping a handful of calls::

    acc = get_accelerator(cfg.grad_accum)
    batch = shard_batch(global_batch, acc)                  # this rank's contiguous slice
    model, opt = prepare_trainable(acc, model, opt, micro_batch_size=len(batch), max_grad_norm=cfg.max_grad_norm)
    ref = prepare_frozen(ref_model, acc)                    # reference / reward model, no optimizer
    with gathered_for_generation(model, acc) as m:          # full weights for fast generate()
        out = m.generate(...)
    loss_sum, n = token_sum_loss(...)                       # sum over tokens, and the token count
    acc.backward(global_mean_loss(loss_sum, n, acc))        # gradient of the GLOBAL token mean
    opt.step(); opt.zero_grad()
    save_full(model, acc, lambda m: save_model(m, tok, folder))   # plain save_pretrained folder

Batch rule: a stage configures the GLOBAL batch size; every rank takes its contiguous slice of each
global batch (:func:`shard_batch`), so each example is used exactly once per epoch across ranks and a
run on N processes follows the same trajectory as on one (up to float summation order).

Failure rule: the process group has a finite timeout, ``SELFRANK_DIST_TIMEOUT`` seconds (default 600).
A rank that dies or stalls makes the collective on the other ranks raise after at most that long
(usually at once: gloo/NCCL see the closed connection, and the launcher stops the remaining ranks), so a
job fails loudly instead of holding its nodes forever. Raise it for very long single steps (e.g. a
reference model that takes minutes to load on one rank while the others wait).
"""
from selfrank.train.dist.collectives import *  # noqa: F401,F403
from selfrank.train.dist.placement import *  # noqa: F401,F403
