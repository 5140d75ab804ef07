"""Joining a collaboration from settings: the one sequence every integration runs (Lightning, Accelerate, scripts).

settings -> DHT (bounded start-up, join hint) -> the collaborative optimizer of the chosen ``algorithm`` -> a
:class:`Membership` that the caller closes when it leaves. Lightning's strategy and Accelerate's
``prepare_collaborative`` call :func:`join`; nothing here knows about either trainer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import hivemind
import torch

from collab_core.dht import start_dht
from collab_core.diloco import DiLoCoOptimizer
from collab_core.optimizer import CollaborativeAdaptiveOptimizer, CollaborativeOptimizer
from collab_core.settings import CollaborativeSettings


def resolve_algorithm(settings: CollaborativeSettings) -> str:
    """The averaging scheme ``settings`` select.

    ``algorithm`` decides. For configurations written before it existed, a non-empty ``average_opt_statistics``
    with the default ``algorithm: gradient`` still selects ``adaptive``, with a ``FutureWarning``.
    """
    if settings.algorithm == "gradient" and settings.average_opt_statistics:
        warnings.warn(
            "average_opt_statistics is set but algorithm is 'gradient': selecting algorithm 'adaptive' as before. "
            "Set algorithm: adaptive (COLLAB_ALGORITHM=adaptive) explicitly; this implicit switch will be removed.",
            FutureWarning,
            stacklevel=3,
        )
        return "adaptive"
    return settings.algorithm


def make_collaborative_optimizer(
    optimizer: torch.optim.Optimizer,
    settings: CollaborativeSettings,
    *,
    dht: hivemind.DHT,
    scheduler: Any | None = None,
    grad_scaler: Any | None = None,
    **overrides: Any,
) -> CollaborativeOptimizer:
    """The collaborative optimizer of ``settings.algorithm`` around ``optimizer``.

    Args:
        optimizer: the plain PyTorch optimizer over the model's parameters.
        settings: the peer's settings.
        dht: a running DHT (see :func:`collab_core.start_dht`).
        scheduler: stepped once per collaborative step, or None.
        grad_scaler: the fp16 ``torch.amp.GradScaler`` scaling the loss (ignored when disabled), or None.
        **overrides: optimizer arguments that replace those from ``settings`` (e.g. ``batch_size_per_step``).

    Returns:
        A :class:`~collab_core.CollaborativeOptimizer` (``gradient``),
        :class:`~collab_core.CollaborativeAdaptiveOptimizer` (``adaptive``) or :class:`~collab_core.DiLoCoOptimizer`
        (``diloco``, with ``optimizer`` as its inner optimizer).

    Raises:
        ValueError: with ``diloco`` and an enabled fp16 ``grad_scaler`` (train the inner steps in bf16 instead).
    """
    kwargs = dict(settings.optimizer_kwargs(), dht=dht, scheduler=scheduler, **overrides)
    if grad_scaler is not None and grad_scaler.is_enabled():
        kwargs["grad_scaler"] = grad_scaler
    algorithm = resolve_algorithm(settings)
    if algorithm == "diloco":
        return DiLoCoOptimizer(optimizer, **settings.outer_kwargs(), **kwargs)
    if algorithm == "adaptive":
        statistics = settings.average_opt_statistics
        return CollaborativeAdaptiveOptimizer(optimizer, average_opt_statistics=statistics, **kwargs)
    return CollaborativeOptimizer(optimizer, **kwargs)


@dataclass
class Membership:
    """This peer's place in a collaboration, as returned by :func:`join`.

    Attributes:
        optimizer: the collaborative optimizer.
        dht: the DHT it runs on.
        join_hint: how other peers join (their ``COLLAB_INITIAL_PEERS``).
        owns_dht: whether :meth:`close` shuts the DHT down (it was started by :func:`join`).
    """

    optimizer: CollaborativeOptimizer
    dht: hivemind.DHT
    join_hint: str
    owns_dht: bool

    def close(self) -> None:
        """Leave: shut the optimizer down (its ``state_dict`` keeps working) and the DHT if :func:`join` started it.
        Idempotent."""
        try:
            self.optimizer.shutdown()
        finally:
            if self.owns_dht and self.dht.is_alive():
                self.dht.shutdown()


def join(
    optimizer: torch.optim.Optimizer,
    settings: CollaborativeSettings,
    *,
    scheduler: Any | None = None,
    grad_scaler: Any | None = None,
    dht: hivemind.DHT | None = None,
    print_hint: bool = True,
    **overrides: Any,
) -> Membership:
    """Join the collaboration ``settings`` describe: start the DHT (unless given) and the collaborative optimizer.

    Args:
        optimizer: the plain PyTorch optimizer over the model's parameters.
        settings: the peer's settings.
        scheduler: stepped once per collaborative step, or None.
        grad_scaler: the fp16 ``torch.amp.GradScaler`` scaling the loss, or None.
        dht: an already running DHT to use (then the caller shuts it down).
        print_hint: print how other peers join.
        **overrides: optimizer arguments that replace those from ``settings``.

    Returns:
        The :class:`Membership`; call its ``close()`` when leaving.

    Raises:
        collab_core.dht.DHTStartupError: if the DHT cannot start or reach ``initial_peers``.
        ValueError: for invalid optimizer arguments (nothing is left running then).
    """
    owns_dht = dht is None
    dht, hint = start_dht(settings, dht=dht, print_hint=print_hint)
    try:
        collaborative = make_collaborative_optimizer(
            optimizer, settings, dht=dht, scheduler=scheduler, grad_scaler=grad_scaler, **overrides
        )
    except BaseException:
        if owns_dht:
            dht.shutdown()
        raise
    return Membership(collaborative, dht, hint, owns_dht)


__all__ = ["Membership", "join", "make_collaborative_optimizer", "resolve_algorithm"]
