"""Local training and evaluation of the LoRA adapter on one site's data.

A plain PyTorch loop rather than transformers.Trainer: a round is a few hundred steps on a model
that stays resident across rounds, and the loop must hand back exact step/token counts and
reproduce a site's data order from (seed, round), which is simpler to guarantee by hand.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler

from federation.config import TrainConfig
from federation.data import SiteDataset, collate_batch
from federation import progress
from federation.evaluation import batch_loss_sum  # one loss for training, evaluation and the gold set


@dataclass
class TrainResult:
    """What one local training round did."""

    num_examples: int
    steps: int
    train_loss: float
    target_tokens: int
    input_tokens: int
    seconds: float
    peak_memory_bytes: int

    @property
    def tokens_per_second(self) -> float:
        """Non-padding input tokens processed (forward + backward) per wall-clock second."""
        return self.input_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalResult:
    """Token-level mean loss over a dataset."""

    loss: float
    num_tokens: int
    num_examples: int


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(p for p in model.parameters()).device


def elapsed_and_peak(device: torch.device, start: float) -> tuple[float, int]:
    """(seconds since `start` once the GPU has finished, peak GPU bytes since the last reset; 0 on CPU)."""
    if device.type != "cuda":
        return time.perf_counter() - start, 0
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device)


def planned_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps for one round: local_steps, or local_epochs over the data."""
    if cfg.local_epochs > 0:
        per_step = cfg.batch_size * cfg.grad_accum
        return max(1, math.ceil(cfg.local_epochs * num_examples / per_step))
    return cfg.local_steps


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    """Linear warm-up over warmup_ratio of `steps`, then cfg.lr_schedule (cosine | linear | constant)."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_schedule, cfg.lr_schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)


class LocalTrainer:
    """Trains the model's trainable (LoRA) parameters with AdamW + warm-up and train.lr_schedule."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, cfg: TrainConfig, label: str = "local"):
        self.model = model
        self.pad_token_id = pad_token_id
        self.cfg = cfg
        self.label = label  # names this trainer's progress bars, e.g. "site 2"

    def _loader(self, dataset: SiteDataset, seed: int, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=self._collate)

    # The four batch-level pieces a faster trainer overrides (client/fast_train.py packs and chunks the loss);
    # the loop, optimizer, schedule and accounting stay here, once.
    def _collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_batch(examples, self.pad_token_id)

    def _batch_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return batch_loss_sum(self.model, batch)

    def _target_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def _input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def train(self, dataset: SiteDataset, seed: int, proximal_mu: float = 0.0, before_step=None) -> TrainResult:
        """Run one round of local steps; the data order is a pure function of `seed`.

        proximal_mu > 0 adds FedProx's mu/2 * ||w - w_start||^2 over the trainable (LoRA) parameters.
        before_step(params) runs after backward and before clipping/optimizer.step (gradient corrections).
        """
        from client.proximal import proximal_term

        cfg = self.cfg
        steps = planned_steps(cfg, len(dataset))
        params = [p for p in self.model.parameters() if p.requires_grad]
        start_params = [p.detach().clone() for p in params] if proximal_mu > 0 else None
        # Fresh optimizer state every round: Adam moments from the previous global model would be stale.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = make_lr_scheduler(optimizer, cfg, steps)
        loader = self._loader(dataset, seed, cfg.batch_size, shuffle=True)
        batches = iter(loader)

        def next_micro_batches() -> list[dict[str, torch.Tensor]]:
            nonlocal batches
            micro = []
            for _ in range(cfg.grad_accum):
                try:
                    micro.append(next(batches))
                except StopIteration:  # epoch boundary: a new pass with a fresh shuffle from the same generator
                    batches = iter(loader)
                    micro.append(next(batches))
            return micro

        device = _model_device(self.model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        # The loss sum stays on the device until the end: float() per micro-batch would wait for each step's
        # backward to finish before the next step could be queued.
        loss_sum, token_sum, input_tokens = torch.zeros((), dtype=torch.float64, device=device), 0, 0
        start = time.perf_counter()
        with progress.track(f"{self.label} training", steps, "steps", rate_unit="tokens") as bar:
            upcoming = next_micro_batches()
            for step in range(steps):
                tokens_before = input_tokens
                micro = upcoming
                step_tokens = sum(self._target_tokens(b) for b in micro)
                for batch in micro:
                    summed, n_tok = self._batch_loss_sum(batch)
                    # Normalise by the step's token count so accumulation equals one big batch.
                    (summed / max(step_tokens, 1)).backward()
                    loss_sum += summed.detach().double()
                    token_sum += n_tok
                    input_tokens += self._input_tokens(batch)
                if step + 1 < steps:
                    # The next step's batches are collated now, while the GPU still runs this step's backward:
                    # after the optimizer step it would sit idle while Python packs them (~4 ms a step at llama-1b).
                    upcoming = next_micro_batches()
                if start_params is not None:
                    proximal_term(params, start_params, proximal_mu).backward()
                if before_step is not None:
                    before_step(params)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.advance(1, input_tokens - tokens_before)
        seconds, peak = elapsed_and_peak(device, start)
        return TrainResult(len(dataset), steps, float(loss_sum) / max(token_sum, 1), token_sum, input_tokens, seconds,
                           peak)

    def train_dp_sgd(self, dataset: SiteDataset, dp_cfg, rounds: int, accountant_state: dict | None,
                     before_training=None) -> tuple[TrainResult, dict, float]:
        """One round of Opacus DP-SGD (Poisson sampling, per-example clipping, noise) on the LoRA parameters.

        A target epsilon is calibrated for `rounds` x this round's planned steps, the steps that really run.
        Sampling and noise come from OS entropy (federation/dp_sgd.py), so no seed replays them.
        `before_training(noise_multiplier, sample_rate, steps)` runs once the round's mechanism is known and before
        any step (the site's privacy ledger charges it there, or refuses by raising).
        Returns (result, accountant state to carry into the next round, epsilon so far at dp_cfg.delta).
        """
        from federation.dp_sgd import dp_train_steps, make_dp_sgd

        cfg = self.cfg
        steps = planned_steps(cfg, len(dataset))
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Only len() and collate of this loader matter: make_dp_sgd replaces its sampling and generator.
        loader = DataLoader(dataset, batch_size=cfg.batch_size,
                            collate_fn=lambda b: collate_batch(b, self.pad_token_id))
        self.model.train()  # Opacus validates the module in training mode
        budget = dict(noise_multiplier=dp_cfg.noise_multiplier) if dp_cfg.target_epsilon <= 0 else dict(
            target_epsilon=dp_cfg.target_epsilon, target_delta=dp_cfg.delta, total_steps=rounds * steps)
        setup = make_dp_sgd(self.model, optimizer, loader, max_grad_norm=dp_cfg.max_grad_norm,
                            accountant=dp_cfg.accountant, accountant_state=accountant_state, **budget)
        start = time.perf_counter()
        try:
            if before_training is not None:
                # Opacus' accountant records each step at this noise multiplier and sample rate 1 / len(loader).
                before_training(float(setup.optimizer.noise_multiplier), 1.0 / len(loader), steps)
            losses = dp_train_steps(setup, steps, label=self.label)
            epsilon = setup.epsilon(dp_cfg.delta)
        finally:
            state = setup.close()
        seconds = time.perf_counter() - start
        finite = [x for x in losses if math.isfinite(x)]
        result = TrainResult(len(dataset), steps, sum(finite) / max(len(finite), 1), 0, 0, seconds, 0)
        return result, state, epsilon

    @torch.no_grad()
    def evaluate(self, dataset: SiteDataset) -> EvalResult:
        """Mean next-token loss over all target tokens of `dataset`."""
        self.model.eval()
        loss_sum, token_sum = 0.0, 0
        loader = self._loader(dataset, 0, self.cfg.eval_batch_size, shuffle=False)
        with progress.track(f"{self.label} eval loss", len(loader), "batches", rate_unit="tokens") as bar:
            for batch in loader:
                summed, n_tok = self._batch_loss_sum(batch)
                loss_sum += float(summed)
                token_sum += n_tok
                bar.advance(1, n_tok)
        return EvalResult(loss_sum / max(token_sum, 1), token_sum, len(dataset))
