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

The rules (global batches, failure timeout) are in ``collectives``; model placement in ``placement``;
a DeepSpeed engine's partitioned training state in checkpoints in ``engine_state``.
"""
from selfrank.train.dist.collectives import *  # noqa: F401,F403
from selfrank.train.dist.placement import *  # noqa: F401,F403
from selfrank.train.dist.engine_state import load_engine_states, stage_engine_states  # noqa: F401,E402
