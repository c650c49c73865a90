"""Local record-level DP-SGD (Abadi et al. 2016) for a PEFT LoRA model, with Opacus.

A site that wants its own examples protected (not just its identity, which central DP covers) trains
with per-example clipping + Gaussian noise. The site keeps ONE accountant for the whole federation:
every round rebuilds the optimizer and the Opacus hooks, but the accountant history is carried over
(``accountant_state``), so epsilon keeps growing across rounds instead of restarting at zero.

Why Opacus' plain "hooks" grad-sample mode is enough here (checked on a tiny LlamaForCausalLM + peft
LoRA with Opacus 1.6; tests/federation/test_dp_sgd.py compares against per-example autograd):
Opacus attaches hooks only to modules that own a trainable parameter directly. With LoRA those are
exactly peft's ``lora_A`` / ``lora_B`` sub-modules, which are plain ``nn.Linear`` (Opacus has an exact
per-sample rule for them, including the (batch, seq, features) inputs of a transformer). The peft
``lora.Linear`` wrapper, its frozen ``base_layer`` (also a bnb ``Linear4bit`` under QLoRA), embeddings,
RMSNorms and attention own no trainable parameter, so they need no grad sampler and are just part of
the frozen computation. We attach hooks in place (``wrap_model=False``) so the PEFT model keeps its
own class and state_dict names (a GradSampleModule wrapper would prefix them with ``_module.``).
Gradient checkpointing is not supported: with it the LoRA layers get no per-sample gradients.

Randomness: Opacus draws the Poisson sample of each batch from the data loader's generator
(``DPDataLoader.from_data_loader`` takes it unless secure_mode supplies torchcsprng's; the
``UniformWithReplacementSampler`` calls ``torch.rand(num_examples, generator=...)`` per step) and the
noise from the optimizer's ``noise_generator`` (``torch.normal(..., generator=...)`` in
``opacus.optimizers.optimizer._generate_noise``); without a generator both fall back to torch's global
one, which train.seed seeds. ``make_dp_sgd`` gives both a fresh generator filled from OS entropy every
round (federation/secure_random.py), so nobody, the coordinator included, can replay a site's
sampling or noise from the config, the seed, the round and the partition.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from federation import progress
from federation.privacy import DEFAULT_MAX_NOISE_MULTIPLIER, calibrate_noise_multiplier
from federation.secure_random import os_entropy_torch_generator

IGNORE_INDEX = -100
log = logging.getLogger("fedtune.dp_sgd")
_announced_os_entropy = False


class DPSGDSetup(NamedTuple):
    """What make_dp_sgd returns: train `model` with `optimizer` on batches of `data_loader`."""

    model: nn.Module  # the same PEFT model that was passed in, with Opacus hooks attached
    optimizer: DPOptimizer
    data_loader: DataLoader  # Poisson-sampled: batch sizes vary, a batch may be empty
    engine: PrivacyEngine
    hooks: Any  # opacus GradSampleHooks; close() removes them
    collate_fn: Any  # the caller's collate (list of examples -> batch), used by dp_train_steps

    def epsilon(self, delta: float) -> float:
        """Record-level epsilon at `delta` spent by this site so far, all rounds included."""
        return float(self.engine.accountant.get_epsilon(delta=delta))

    def accountant_state(self) -> dict[str, Any]:
        """The site's accountant history; pass it as `accountant_state` next round (JSON-friendly)."""
        state = self.engine.accountant.state_dict()
        return {"mechanism": state["mechanism"], "history": [list(entry) for entry in state["history"]]}

    def close(self) -> dict[str, Any]:
        """Remove the Opacus hooks from the model (before evaluation / export); returns accountant_state()."""
        self.hooks.cleanup()
        return self.accountant_state()


def make_dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    total_steps: int | None = None,
    accountant: str = "rdp",
    accountant_state: Mapping[str, Any] | None = None,
    grad_sample_mode: str = "hooks",
    secure_mode: bool = False,
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER,
) -> DPSGDSetup:
    """Make one round of local training record-level DP; give `noise_multiplier` or a target budget.

    Target budget: (`target_epsilon`, `target_delta`) for `total_steps` = optimizer steps over ALL rounds
    of the federation; sigma is calibrated from scratch for that many steps at this loader's sample rate,
    which gives the same sigma every round, so the carried-over history ends exactly on budget.
    `accountant_state` is the previous round's DPSGDSetup.accountant_state() (None on the first round).
    Per-example clipping: `max_grad_norm`; sampling: Poisson with rate 1 / len(data_loader).
    Poisson sampling and noise come from fresh OS-entropy generators (`data_loader`'s own generator is
    replaced); `secure_mode=True` hands both to Opacus' torchcsprng instead (needs that package).
    """
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError(
            "DP-SGD needs per-example gradients, which Opacus hooks cannot get through gradient "
            "checkpointing: call model.gradient_checkpointing_disable() (ModelConfig.gradient_checkpointing=false)"
        )
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier or target_epsilon (+ target_delta, total_steps)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters")

    engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    if accountant_state is not None:
        engine.accountant.load_state_dict(
            {
                "mechanism": accountant_state["mechanism"],
                "history": [tuple(entry) for entry in accountant_state["history"]],
            }
        )
    if noise_multiplier is None:
        if target_delta is None or total_steps is None:
            raise ValueError("target_epsilon needs target_delta and total_steps")
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=target_delta,
            sample_rate=1.0 / len(data_loader),
            rounds=total_steps,
            accountant=accountant,
            max_noise_multiplier=max_noise_multiplier,
        )
    sampling_generator = noise_generator = None
    if not secure_mode:
        sampling_generator = os_entropy_torch_generator("cpu")  # the sampler's torch.rand runs on the CPU
        data_loader.generator = sampling_generator
        device = next(p for p in model.parameters() if p.requires_grad).device
        noise_generator = os_entropy_torch_generator(device)  # torch.normal needs it on the noise's device
        _announce_os_entropy()
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator,
        # In place, see the module docstring.
        wrap_model=False,
        # loss = mean over the batch of per-sequence losses; Opacus rescales per-sample grads to match.
        loss_reduction="mean",
    )
    if not secure_mode and (getattr(dp_loader.batch_sampler, "generator", None) is not sampling_generator
                            or getattr(dp_optimizer, "generator", None) is not noise_generator):
        hooks.cleanup()
        raise RuntimeError("Opacus did not take the OS-entropy generators for Poisson sampling and noise; refusing "
                           "to train replayably (check federation/dp_sgd.py against this Opacus version)")
    collate_fn = data_loader.collate_fn or default_collate
    return DPSGDSetup(model, dp_optimizer, dp_loader, engine, hooks, collate_fn)


def _announce_os_entropy() -> None:
    global _announced_os_entropy
    if not _announced_os_entropy:
        _announced_os_entropy = True
        log.info("DP-SGD: Poisson sampling and noise are drawn from OS entropy and are not reproducible by design; "
                 "seeds reproduce everything else")


def per_sequence_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(batch, seq, vocab) logits, (batch, seq) labels -> (batch,) mean next-token CE per sequence.

    HF's model(labels=...) loss averages over all tokens of the batch, which ties each example's
    gradient to the other examples' lengths. DP-SGD needs loss_i to depend on example i only, so we
    average tokens within a sequence and let the caller average sequences (loss_reduction="mean").
    A sequence with no target token contributes 0.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(shifted_labels.shape)
    mask = (shifted_labels != ignore_index).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _poisson_batches(setup: DPSGDSetup) -> Iterator[Any | None]:
    """Collated Poisson batches, endlessly; None for an empty one.

    We read the index lists from the DP loader's sampler and collate them ourselves rather than iterate the
    loader: Opacus' empty-batch collate needs a non-empty batch before it to copy the structure from, and on
    an empty *first* batch of dict examples it raises (Opacus 1.6, data_loader.CollateFnWithEmpty).
    """
    dataset = setup.data_loader.dataset
    while True:
        for indices in setup.data_loader.batch_sampler:
            yield setup.collate_fn([dataset[i] for i in indices]) if len(indices) else None


def _noise_only_step(optimizer: DPOptimizer) -> None:
    # Poisson sampling can draw an empty batch, which a transformer cannot run. The DP guarantee still
    # needs the step to happen (noise on a zero sum, accountant advanced), as Opacus does itself for
    # empty batches: hand it zero-length per-sample gradients.
    for param in optimizer.params:
        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dp_train_steps(setup: DPSGDSetup, num_steps: int, label: str = "local") -> list[float]:
    """Run `num_steps` DP-SGD steps on batches {input_ids, labels[, attention_mask]}; batch losses.

    Empty Poisson batches still take a (noise-only) step and report NaN as their loss. Progress (steps, input
    tokens/s) shows as "<label> DP-SGD training" (federation/progress.py), as the plain trainer's does.
    """
    model, optimizer = setup.model, setup.optimizer
    model.train()
    losses: list[float] = []
    device = next(p for p in model.parameters() if p.requires_grad).device
    batches = _poisson_batches(setup)
    with progress.track(f"{label} DP-SGD training", num_steps, "steps", rate_unit="tokens") as bar:
        for _ in range(num_steps):
            collated = next(batches)
            if collated is None:
                _noise_only_step(optimizer)
                losses.append(math.nan)
                bar.advance(1, 0)
                continue
            batch = {key: value.to(device) for key, value in collated.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            loss = per_sequence_causal_lm_loss(logits, batch["labels"]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            mask = collated.get("attention_mask")
            bar.advance(1, int(mask.sum()) if mask is not None else collated["input_ids"].numel())
    return losses
