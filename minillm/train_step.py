"""One optimizer step of data-parallel training, and the batch streams it draws from.

`train_step` runs forward + backward of one micro-batch per generator (--grad-accum K of them; each in a few
parts side by side, minillm.batch_parts), sums the gradients in micro-batch order, averages them over every
rank's micro-batches (minillm.distributed: a fixed-order reduction, so a run is bit-identical when repeated
with the same N), clips and applies AdamW.
`batch_rngs` gives each rank its generators: micro-batch k of rank r draws from stream r * K + k, so N ranks
with K micro-batches draw exactly the batches of one process with --grad-accum N * K.
"""

import math
from typing import NamedTuple

import numpy as np

from minillm import batch_parts, checkpoint, data, device, distributed, optim
from minillm.arrays import array_module
from minillm.nn import ops
from minillm.tree import flatten


def batch_rngs(opts, world, trainer_state=None):
    """This rank's generators, one per micro-batch of a step: micro-batch k of rank r draws from stream
    s = r * grad_accum + k, np.random.default_rng([seed, s]) (data.batch_rngs; stream 0 is default_rng(seed),
    the stream of a single process). trainer_state (a resumed run's): the streams continue where they
    stopped, which needs the same world size and --grad-accum (one clear error otherwise)."""
    k, n = opts.grad_accum, world.size
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"--grad-accum must be a positive integer, got {k!r}")
    mine = range(world.rank * k, (world.rank + 1) * k)
    state = trainer_state or {}
    if not state.get("rng_state"):
        return data.batch_rngs(opts.seed, mine)
    saved_n, saved_k = int(state.get("world_size", 1)), int(state.get("grad_accum", 1))
    if saved_n != n:
        raise distributed.AllRanksError(
            f"--resume: the checkpoint in {opts.out!r} was trained on {saved_n} MPI process(es), this run has {n}: "
            f"resume it with `mpiexec -n {saved_n}` (each rank continues its own batch stream)")
    if saved_k != k:
        raise distributed.AllRanksError(f"--resume: the checkpoint in {opts.out!r} was trained with --grad-accum "
                                        f"{saved_k}, this run asks for {k}: resume with --grad-accum {saved_k}")
    states = state.get("rng_states") or [state["rng_state"]]
    if len(states) != n * k:
        raise distributed.AllRanksError(f"--resume: {opts.out!r} has {len(states)} batch RNG states, "
                                        f"{n * k} needed")
    return [checkpoint.rng_from_state(states[s]) for s in mine]


def rng_record(rngs, world):
    """The trainer_state.json entries of the batch streams (a collective: every rank calls it): rng_state
    (stream 0, as a single process has always saved it), world_size, grad_accum, and with several streams
    rng_states (all of them, in stream order); rank 0 gets the record, the others None."""
    every = world.gather([checkpoint.rng_state(r) for r in rngs])
    if every is None:
        return None
    states = [s for rank in every for s in rank]
    record = {"rng_state": states[0], "world_size": world.size, "grad_accum": len(rngs)}
    if len(states) > 1:
        record["rng_states"] = states
    return record


def params_array_module(params):
    """numpy or cupy: where the params live (the batches are moved there)."""
    return array_module(next(iter(flatten(params).values())))


class Diverged(distributed.AllRanksError):
    """The loss became NaN/inf (on every rank at once under MPI: the reduced loss is checked)."""


def _summed_stats(all_stats):
    """Per-micro-batch model statistics -> one host vector (their sum) and a function back to a dict."""
    keys = list(all_stats[0])
    host = [[np.asarray(device.to_host(s[k])) for k in keys] for s in all_stats]
    shapes = [a.shape for a in host[0]]
    kinds = [a.dtype.kind for a in host[0]]
    vec = np.sum([np.concatenate([a.reshape(-1).astype(np.float64) for a in row]) for row in host], axis=0)

    def back(total, count):
        out, i = {}, 0
        for key, shape, kind in zip(keys, shapes, kinds):
            size = int(np.prod(shape))
            part = total[i:i + size].reshape(shape)
            out[key] = part.astype(np.int64) if kind in "iu" else part / count   # counts add up, losses average
            i += size
        return out

    return vec, back


def _loss_and_grads(model, params, config, x, y, keep, step, world):
    """Forward + backward of one micro-batch (or part of one: minillm.batch_parts), x, y: (b, T) ->
    (loss, aux loss, model stats, gradients of the params that `keep` keeps)."""
    logits, cache = model.forward(params, x, config)
    loss, loss_cache = ops.cross_entropy_forward(logits, y)
    aux = model.aux_loss(cache) if hasattr(model, "aux_loss") else 0.0
    if world.size == 1 and not math.isfinite(loss + aux):  # under MPI: the reduced loss, in train_step
        raise Diverged(f"the loss became {loss + aux} at step {step}")
    grads = model.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)
    # frozen params' gradients are neither clipped nor used (as torch)
    grads = {n: g for n, g in flatten(grads).items() if keep(n)}
    return loss, aux, model.stats(cache) if hasattr(model, "stats") else {}, grads


def micro_batch(model, params, config, x, y, parts=1, keep=None, step=0, world=None):
    """Forward + backward of one micro-batch x, y: (B, T) in `parts` equal parts (minillm.batch_parts) ->
    (loss, aux loss, [model stats per part], gradients), each a sum over the parts (gradients added in part
    order: a mean needs / parts); keep: a predicate on the dotted names of the params to keep gradients of."""
    keep = optim.trainable_predicate(keep)
    world = world or distributed.world()
    rows = len(x) // parts
    jobs = [(model, params, config, x[i:i + rows], y[i:i + rows], keep, step, world) for i in range(0, len(x), rows)]
    done = batch_parts.run(_loss_and_grads, jobs)
    grads = done[0][3]
    for part in done[1:]:
        grads = {n: grads[n] + g for n, g in part[3].items()}
    return sum(part[0] for part in done), sum(part[1] for part in done), [part[2] for part in done], grads


class StepResult(NamedTuple):
    loss: float           # mean over every micro-batch of every rank
    aux: float            # the MoE load-balancing loss, likewise (0.0 without experts)
    stats: dict           # model statistics, means (integer ones, the expert token counts, are sums)
    grad_norm: float      # before clipping
    lr: float
    stop: bool            # some rank asked to stop (stop_requested), agreed by every rank


def train_step(model, params, config, train_ids, opts, rngs, opt_state, step, mask, trainable=None, world=None,
               stop_requested=None):
    """One optimizer step: forward + backward of one micro-batch per generator in rngs (each in
    opts.batch_parts parts, see minillm.batch_parts), the gradients summed (in part, then micro-batch
    order), averaged over every rank's parts, clipped, AdamW. -> StepResult.
    Raises Diverged (before any update) when the loss is not finite.

    stop_requested: a callable -> bool (Ctrl-C seen), or None. Under MPI each rank's answer rides in the
    reduction of the losses, so every rank gets the same `stop` without a collective of its own (a request
    that comes after that reduction counts in the next step); in one process it is asked after the update."""
    world = world or distributed.world()
    xp = params_array_module(params)
    keep = optim.trainable_predicate(trainable)
    parts = batch_parts.count(getattr(opts, "batch_parts", 1), opts.batch_size, config, xp.empty(0))
    total, losses, auxes, stats = None, [], [], []
    for rng in rngs:
        x, y = (xp.asarray(a) for a in data.get_batch(train_ids, opts.batch_size, config["context"], rng))
        loss, aux, part_stats, grads = micro_batch(model, params, config, x, y, parts, keep, step, world)
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
        losses.append(loss)
        auxes.append(aux)
        stats.extend(part_stats)
    count = len(rngs) * parts * world.size
    stop = None
    if count == 1:
        loss, aux, stats = losses[0], auxes[0], stats[0]
    else:
        vec, back = _summed_stats(stats) if stats[0] else (np.zeros(0), None)
        asked = float(bool(stop_requested())) if stop_requested is not None and world.size > 1 else 0.0
        summed = world.sum_floats(np.concatenate([[sum(losses), sum(auxes), asked], vec]))
        loss, aux = float(summed[0] / count), float(summed[1] / count)
        stop = bool(summed[2] > 0) if world.size > 1 else None
        stats = back(summed[3:], count) if back else {}
        if not math.isfinite(loss + aux):
            raise Diverged(f"the loss became {loss + aux} at step {step}")
    grads = world.average_gradients(total, len(rngs) * parts)
    grad_norm = optim.clip_grad_norm(grads, opts.grad_clip)
    lr = optim.lr_at(step, opts.lr, opts.warmup, opts.steps, opts.min_lr_ratio)
    optim.adamw_step(params, grads, opt_state, lr, weight_decay=opts.weight_decay, mask=mask,
                     trainable=trainable)
    if stop is None:                                     # one process: no reduction to ride in
        stop = bool(stop_requested()) if stop_requested is not None else False
    return StepResult(loss, aux, stats, grad_norm, lr, stop)
