"""The site's side of FedEx-LoRA: FedAvg'd factors of the run's one rank, trained on top of the frozen residuals.

The frozen update (the sum of the rounds' residuals mean(s B_i A_i) - s mean(B) mean(A)) is kept and received
exactly as FLoRA's (client/flora.py); the site's own LoRA is the FedAvg of the factors, not re-initialised.
Handlers (registered in client/app.py) of ``train.fedex_lora`` and ``evaluate.fedex_lora``.
"""

from __future__ import annotations

from flwr.app import Context, Message

from client import task
from client.flora import hetero_evaluate, hetero_train


def train(msg: Message, context: Context) -> Message:
    """Train the shared-rank LoRA (this site's local steps) on top of the frozen residuals; reply with the delta."""
    return hetero_train(task.for_this_site(msg, context), context)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global factors with the frozen residuals applied."""
    return hetero_evaluate(task.for_this_site(msg, context), context)
