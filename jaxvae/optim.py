"""The optax optimizer and learning-rate schedule described by ``config.optimizer``."""

from __future__ import annotations

import ml_collections
import optax


def schedule_length(
    opt: ml_collections.ConfigDict, num_train_steps: int, steps_per_epoch: int
) -> int | None:
    """The step count ``opt.schedule`` is built with: its decay (or transition) length, from
    ``num_train_steps`` or ``steps_per_epoch``; ``None`` for ``constant``, which has none.

    Runs of different lengths whose schedules have the same length build the same programs
    (``jaxvae.run_setup.build_programs`` keys on this, not on the run's length).
    """
    if opt.schedule == "constant":
        return None
    if opt.schedule == "exponential":
        return max(1, opt.transition_steps or steps_per_epoch)
    if opt.schedule == "cosine":
        return max(1, num_train_steps)
    if opt.schedule == "warmup_cosine":
        return max(opt.warmup_steps + 1, num_train_steps)
    raise ValueError(
        "config.optimizer.schedule must be constant, exponential, cosine or warmup_cosine, "
        f"got {opt.schedule!r}."
    )


def learning_rate_schedule(
    opt: ml_collections.ConfigDict, num_train_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """``step -> learning rate`` for ``opt.schedule``.

    - ``constant``: ``learning_rate``.
    - ``exponential``: ``learning_rate * decay_rate ** (step // transition_steps)`` (staircase);
      ``transition_steps = 0`` means one epoch, i.e. PyTorch's ``ExponentialLR`` stepped per epoch.
    - ``cosine``: cosine decay to 0 over ``num_train_steps``.
    - ``warmup_cosine``: linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0.
    """
    lr, length = opt.learning_rate, schedule_length(opt, num_train_steps, steps_per_epoch)
    if opt.schedule == "constant":
        return optax.constant_schedule(lr)
    if opt.schedule == "exponential":
        return optax.exponential_decay(lr, length, opt.decay_rate, staircase=True)
    if opt.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, length)
    return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, length)


def create_optimizer(
    opt: ml_collections.ConfigDict, num_train_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)``: optional ``clip_by_global_norm`` then Adam or AdamW."""
    schedule = learning_rate_schedule(opt, num_train_steps, steps_per_epoch)
    if opt.name == "adam":
        # Like torch.optim.Adam(weight_decay=w): L2 added to the gradient, not decoupled.
        core = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
        if opt.weight_decay:
            core = optax.chain(optax.add_decayed_weights(opt.weight_decay), core)
    elif opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"config.optimizer.name must be adam or adamw, got {opt.name!r}.")
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
    return core, schedule


__all__ = ["create_optimizer", "learning_rate_schedule", "schedule_length"]
