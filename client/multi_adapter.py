"""Multi-adapter batched training: the virtual clients of a round share one resident base and train together.

Every LoRA layer of the resident peft model is rerouted to K stacked adapters, A (K, r, in) and B (K, out, r);
row n of a batch goes through adapter ``row_adapter[n]`` (its factors gathered per row, one batched matmul), as
in multi-LoRA training (mLoRA, Ye et al. 2023). Small per-client batches then share one forward/backward that
fills the GPU. Nothing couples the clients, so each client's adapter is the one solo training gives:

* the loss is sum_k L_k / tokens_k: the gradient of client k's factors is exactly its solo gradient;
* gradient clipping is per client, with the formula of ``torch.nn.utils.clip_grad_norm_``;
* AdamW is elementwise, so one AdamW over the stacked tensors is K independent AdamWs with one schedule;
* each client's batches come from the solo trainer's own loader and seed (same data order);
* train.kernels / train.attention run as the solo fast trainer resolved them: its kernel set's loss summed per
  client, varlen attention over every packed row of the combined batch;
* with the solo fast trainer's fused LoRA on, each base matmul runs as in its fused functions
  (client/fused_lora.py fused_base_forward): a 4-bit weight dequantized by the NF4 kernel where its nf4_kernel
  setting enabled it, again in backward, nothing dense kept. Otherwise (PEFT's trainer) the base layer's forward.

Equal up to floating-point summation order (tests/client/test_multi_adapter.py bounds it). LoRA dropout > 0
draws other masks than a solo run (same distribution). Not supported, so left to solo training by
``batchable``: DP-SGD (per-example clipping), SCAFFOLD's gradient correction, FedSA/FLoRA/FlexLoRA/FedEx site
state, SecAgg+ messages, and clients of one group with different step counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, Error, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.fast_train import (FastLocalTrainer, causal_lm_parts, host_to_device, linear_cross_entropy_per_token,
                               shift_labels)
from client.fused_lora import fused_base_forward
from client.kernels import mask_free_forward, packed_attention_kwargs
from client.trainer import LocalTrainer, TrainResult, elapsed_and_peak, make_lr_scheduler, planned_steps
from federation import progress
from federation.adapter import ADAPTER_NAME, AdapterMismatch, check_adapter_keys, lora_parameters
from federation.data import IGNORE_INDEX, SiteDataset

log = logging.getLogger("fedtune.client")


@dataclass
class _StackedLayer:
    module: torch.nn.Module
    key_a: str
    key_b: str
    lora_a: torch.nn.Parameter  # (K, r, in)
    lora_b: torch.nn.Parameter  # (K, out, r)
    scaling: float


class StackedLoRA:
    """Context manager: the model's LoRA layers use K stacked adapters, row n of a batch adapter row_adapter[n].

    fused_base: the base layers run through client/fused_lora.py fused_base_forward (the fast trainer's
    dequantize), else their own forward.
    """

    def __init__(self, model: torch.nn.Module, initial: Mapping[str, np.ndarray], num_adapters: int,
                 fused_base: bool = False):
        from peft.tuners.lora import LoraLayer

        if num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
        self.num_adapters = num_adapters
        self.fused_base = fused_base
        self.row_adapter: torch.Tensor | None = None
        self._previous_forwards: list[Callable | None] = []
        live = lora_parameters(model)
        check_adapter_keys(live, initial)
        self.layers: list[_StackedLayer] = []
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            if module.use_dora.get(ADAPTER_NAME) or getattr(module, "merged", False):
                raise AdapterMismatch(f"{name}: DoRA or merged LoRA layers cannot be stacked")
            key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            self.layers.append(_StackedLayer(module, key_a, key_b, self._stack(live[key_a], initial[key_a]),
                                             self._stack(live[key_b], initial[key_b]),
                                             float(module.scaling[ADAPTER_NAME])))
        covered = {k for layer in self.layers for k in (layer.key_a, layer.key_b)}
        if covered != set(live):
            raise AdapterMismatch(f"LoRA parameters outside stackable layers: {sorted(set(live) - covered)[:3]}")

    def _stack(self, live: torch.nn.Parameter, value: np.ndarray) -> torch.nn.Parameter:
        start = torch.from_numpy(np.ascontiguousarray(value)).to(live.device, live.dtype)
        stacked = start.unsqueeze(0).repeat(self.num_adapters, *([1] * start.dim())).contiguous()
        return torch.nn.Parameter(stacked, requires_grad=live.requires_grad)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The stacked tensors that train (lora_A is frozen under FFA-LoRA)."""
        return [p for layer in self.layers for p in (layer.lora_a, layer.lora_b) if p.requires_grad]

    def adapter_arrays(self) -> list[dict[str, np.ndarray]]:
        """Every adapter as float32 numpy arrays under PEFT's saved keys (as federation.adapter.get_adapter_arrays)."""
        # One device-to-host copy per stacked tensor, not one per client and tensor.
        host = {}
        for layer in self.layers:
            host[layer.key_a] = layer.lora_a.detach().float().cpu().numpy()
            host[layer.key_b] = layer.lora_b.detach().float().cpu().numpy()
        return [{key: value[index].copy() for key, value in host.items()} for index in range(self.num_adapters)]

    def clip_grad_norm_per_adapter(self, max_norm: float) -> torch.Tensor:
        """Clip each adapter's gradient to L2 norm max_norm as clip_grad_norm_ would alone; returns the norms (K,)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(self.num_adapters)
        squares = sum(g.float().pow(2).reshape(self.num_adapters, -1).sum(dim=1) for g in grads)
        norms = squares.sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
        return norms

    def _forward(self, layer: _StackedLayer):
        base = layer.module.base_layer

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            fused = self.fused_base and not args and not kwargs
            result = fused_base_forward(base, x) if fused else base(x, *args, **kwargs)
            rows = self.row_adapter
            if rows is None or rows.shape[0] != x.shape[0]:
                raise RuntimeError("StackedLoRA.row_adapter must give one adapter index per batch row")
            lora_a = layer.lora_a.index_select(0, rows)  # (N, r, in)
            lora_b = layer.lora_b.index_select(0, rows)  # (N, out, r)
            inputs = layer.module.lora_dropout[ADAPTER_NAME](x)
            if not torch.is_autocast_enabled():  # as peft: the LoRA matmuls in the adapter's dtype
                inputs = inputs.to(lora_a.dtype)
            update = torch.matmul(torch.matmul(inputs, lora_a.transpose(1, 2)), lora_b.transpose(1, 2))
            return result + (update * layer.scaling).to(result.dtype)

        return forward

    def __enter__(self) -> StackedLoRA:
        # The forward each layer had (PEFT's, or the fast trainer's fused one, an instance attribute) is put back.
        self._previous_forwards = [layer.module.__dict__.get("forward") for layer in self.layers]
        for layer in self.layers:
            layer.module.forward = self._forward(layer)  # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc) -> None:
        for layer, previous in zip(self.layers, self._previous_forwards):
            if previous is None:
                layer.module.__dict__.pop("forward", None)
            else:
                layer.module.forward = previous


def _pad_right(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    pad = torch.full((tensor.shape[0], width - tensor.shape[1]), value, dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)


def combine_batches(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of every client's collated batch in one (N, T) batch plus row_adapter (N,) = which client a row is.

    Takes the solo trainers' batches: padded (input_ids, attention_mask, labels) or packed (input_ids,
    position_ids, target_ids). Returns input_ids, targets (shifted, -100 = no loss) and attention_mask or
    position_ids. Right padding changes no real token's result: the causal mask (padded) or a separate
    position-id segment (packed) keeps it out of every real token's attention.
    """
    width = max(b["input_ids"].shape[1] for b in batches)
    packed = "target_ids" in batches[0]
    out = {"input_ids": torch.cat([_pad_right(b["input_ids"], width, pad_token_id) for b in batches]),
           "row_adapter": torch.cat([torch.full((b["input_ids"].shape[0],), k, dtype=torch.long)
                                     for k, b in enumerate(batches)])}
    if packed:
        out["targets"] = torch.cat([_pad_right(b["target_ids"], width, IGNORE_INDEX) for b in batches])
        positions = []
        for b in batches:
            tail = width - b["position_ids"].shape[1]
            positions.append(torch.cat([b["position_ids"], torch.arange(tail).expand(b["position_ids"].shape[0], tail)],
                                       dim=1))
        out["position_ids"] = torch.cat(positions)
    else:
        out["targets"] = torch.cat([_pad_right(shift_labels(b["labels"]), width, IGNORE_INDEX) for b in batches])
        out["attention_mask"] = torch.cat([_pad_right(b["attention_mask"], width, 0) for b in batches])
    return out


class MultiAdapterTrainer:
    """Trains K clients' adapters from one start in one loop; `solo` supplies collation, data order and settings."""

    def __init__(self, solo: LocalTrainer):
        self.solo = solo
        self.model = solo.model
        self.cfg = solo.cfg
        fast = isinstance(solo, FastLocalTrainer)
        self.autocast_dtype = solo.autocast_dtype if fast else None
        self.loss_chunk_tokens = solo.settings.loss_chunk_tokens if fast else 2048
        # train.kernels / train.attention as the solo fast trainer resolved them (an explicit choice that cannot
        # run here already raised there) and applied them to the resident model this trainer shares.
        self.linear_ce_sum = solo.kernel_set.linear_ce_sum if fast else None
        self.varlen = fast and solo.attention == "varlen"
        # The base matmuls as the solo trainer's fused functions run them (its nf4_kernel setting already applied
        # to the shared model); with fused_lora off (the benchmarks' PEFT baseline) or PEFT's trainer, the base
        # layer's own forward, so the batched path keeps computing what its solo trainer computes.
        self.fused_base = fast and solo.settings.fused_lora

    def _adapter_loss_sums(self, combined: dict[str, torch.Tensor], num_adapters: int,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(each adapter's CE summed over its target tokens (K,) fp32, differentiable; its target tokens (K,))."""
        _, decoder, lm_head = causal_lm_parts(self.model)
        kwargs = {"input_ids": host_to_device(combined["input_ids"], device), "use_cache": False}
        varlen = self.varlen and "position_ids" in combined
        if "position_ids" in combined:
            kwargs.update(position_ids=host_to_device(combined["position_ids"], device), attention_mask=None)
            if varlen:  # every packed example and every padding tail of the combined rows is its own sequence
                kwargs.update(packed_attention_kwargs(combined["position_ids"], device))
        else:
            kwargs.update(attention_mask=host_to_device(combined["attention_mask"], device))
        autocast = (torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None and device.type == "cuda" else contextlib.nullcontext())
        with autocast, mask_free_forward(self.model) if varlen else contextlib.nullcontext():
            hidden = decoder(**kwargs).last_hidden_state
        # Target positions and each one's adapter are found on the host, where combine_batches built them:
        # on the GPU, nonzero and tolist would wait for the whole queued forward.
        targets = combined["targets"].reshape(-1)
        keep = (targets != IGNORE_INDEX).nonzero()[:, 0]
        adapter_of_token = combined["row_adapter"].index_select(0, keep // combined["targets"].shape[1])
        counts = torch.bincount(adapter_of_token, minlength=num_adapters)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, host_to_device(keep, device))
        selected = selected.to(lm_head.weight.dtype)
        selected_targets = host_to_device(targets.index_select(0, keep), device)
        tokens = host_to_device(counts, device)
        adapter_of_token = host_to_device(adapter_of_token, device)
        if self.linear_ce_sum is None:
            losses = linear_cross_entropy_per_token(selected, lm_head.weight, selected_targets, self.loss_chunk_tokens)
            sums = torch.zeros(num_adapters, dtype=losses.dtype, device=device).index_add(0, adapter_of_token, losses)
            return sums, tokens
        # The kernel set's loss sums its input, so it runs once per adapter; combine_batches puts the rows in
        # adapter order, so each adapter's target tokens are one contiguous run of `selected`.
        sizes = counts.tolist()
        sums = [self.linear_ce_sum(h, lm_head.weight, t).float()
                for h, t in zip(selected.split(sizes), selected_targets.split(sizes))]
        return torch.stack(sums), tokens

    def train(self, datasets: Sequence[SiteDataset], seeds: Sequence[int], initial: Mapping[str, np.ndarray],
              proximal_mu: float = 0.0, label: str | None = None) -> list[tuple[TrainResult, dict[str, np.ndarray]]]:
        """Train one adapter per dataset from `initial`; returns (result, adapter arrays) per client, in order.

        Client k's data order is the solo trainer's for seeds[k]; every client runs the same number of steps.
        Progress (steps, the group's input tokens/s) shows as "<label> training together" (default: "K clients").
        """
        from client.proximal import proximal_term

        if len(datasets) != len(seeds) or not datasets:
            raise ValueError(f"need one seed per dataset, got {len(datasets)} datasets and {len(seeds)} seeds")
        cfg, k_clients = self.cfg, len(datasets)
        steps_each = {planned_steps(cfg, len(ds)) for ds in datasets}
        if len(steps_each) != 1:
            raise ValueError(f"clients trained together must run the same number of steps, got {sorted(steps_each)}")
        steps = steps_each.pop()
        device = next(p for p in self.model.parameters()).device
        loaders = [self.solo._loader(ds, seed, cfg.batch_size, shuffle=True) for ds, seed in zip(datasets, seeds)]
        iterators = [iter(loader) for loader in loaders]
        # Per-client sums stay on the device until the end: no host sync per micro-batch.
        loss_sum = torch.zeros(k_clients, dtype=torch.float64, device=device)
        target_tokens = torch.zeros(k_clients, dtype=torch.long, device=device)
        input_tokens = torch.zeros(k_clients, dtype=torch.long)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        with StackedLoRA(self.model, initial, k_clients, fused_base=self.fused_base) as stacked:
            params = stacked.parameters()
            start_params = [p.detach().clone() for p in params] if proximal_mu > 0 else None
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            scheduler = make_lr_scheduler(optimizer, cfg, steps)
            start = time.perf_counter()
            description = f"{label or f'{k_clients} clients'} training together"
            with progress.track(description, steps, "steps", rate_unit="tokens") as bar:
                upcoming = self._next_step(iterators, loaders, k_clients, device)
                for step in range(steps):
                    tokens_before = int(input_tokens.sum())
                    micro, step_tokens, combined_batches = upcoming
                    for j, combined in enumerate(combined_batches):
                        stacked.row_adapter = host_to_device(combined["row_adapter"], device)
                        sums, tokens = self._adapter_loss_sums(combined, k_clients, device)
                        # Each client's loss normalised by its own step's tokens: its gradient is the solo one.
                        (sums / step_tokens).sum().backward()
                        loss_sum += sums.detach().double()
                        target_tokens += tokens
                        for k in range(k_clients):
                            input_tokens[k] += self.solo._input_tokens(micro[k][j])
                    if step + 1 < steps:  # built while the GPU runs this step's backward (LocalTrainer.train)
                        upcoming = self._next_step(iterators, loaders, k_clients, device)
                    if start_params is not None:
                        proximal_term(params, start_params, proximal_mu).backward()
                    if cfg.max_grad_norm > 0:
                        stacked.clip_grad_norm_per_adapter(cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    bar.advance(1, int(input_tokens.sum()) - tokens_before)
            seconds, peak = elapsed_and_peak(device, start)
            stacked.row_adapter = None
            adapters = stacked.adapter_arrays()
        loss_sum, target_tokens = loss_sum.cpu(), target_tokens.cpu()
        out = []
        total_input = max(int(input_tokens.sum()), 1)
        for k, ds in enumerate(datasets):
            # One wall clock for the group, shared out by input tokens, so the clients' seconds add up to it.
            share = seconds * int(input_tokens[k]) / total_input
            result = TrainResult(len(ds), steps, float(loss_sum[k]) / max(int(target_tokens[k]), 1),
                                 int(target_tokens[k]), int(input_tokens[k]), share, peak)
            out.append((result, adapters[k]))
        return out

    def _next_step(self, iterators: list, loaders: list, k_clients: int, device: torch.device):
        """One step's batches: (per client its grad_accum batches, per client its step's target tokens (K,) on the
        device, the clients' batches combined per micro-batch index)."""
        cfg = self.cfg
        micro = [[self._next(iterators, loaders, k) for _ in range(cfg.grad_accum)] for k in range(k_clients)]
        step_tokens = torch.tensor([max(sum(self.solo._target_tokens(b) for b in batches), 1) for batches in micro],
                                   dtype=torch.float32)
        combined = [combine_batches([micro[k][j] for k in range(k_clients)], self.solo.pad_token_id)
                    for j in range(cfg.grad_accum)]
        return micro, host_to_device(step_tokens, device), combined

    @staticmethod
    def _next(iterators: list, loaders: list, k: int):
        try:
            return next(iterators[k])
        except StopIteration:  # epoch boundary: a fresh pass from the same generator, as the solo loop does
            iterators[k] = iter(loaders[k])
            return next(iterators[k])


# -------------------------------------------------------------------------------------- ClientApp side


def batchable(msg: Message, context: Context) -> bool:
    """True for a plain train message that multi-adapter training reproduces exactly (see the module docstring)."""
    from client.secagg import _requires_secagg
    from client.task import for_this_site
    from federation.protocol import LEGACY_FIT_PARAMETERS, RUN_CONFIG_KEY
    from strategies.registry import strategy_spec

    # Only the default train handler of strategies that allow it; train.<action> messages run their method's handler.
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return False
    content = msg.content
    if LEGACY_FIT_PARAMETERS in content.array_records or RECORD_KEY_CONFIGS in content.config_records:
        return False
    if "config" not in content.config_records or RUN_CONFIG_KEY not in content["config"] or _requires_secagg(context):
        return False
    try:
        for_this_site(msg, context, site_steps=False)
    except ValueError:  # e.g. a site rank the strategy cannot use: the solo handler raises the clear error
        return False
    run = json.loads(str(content["config"][RUN_CONFIG_KEY]))
    return (int(run["federation"].get("clients_per_batch", 1)) > 1
            and strategy_spec(run["strategy"]["name"]).batched_training
            and not run["privacy"]["local_dp_sgd"]["enabled"])


def train_replies(messages: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
    """Replies to batchable train messages with one run config, trained together; each as client.app.train gives."""
    from client.task import (build_train_reply, configure_trainable, get_runtime, make_trainer, parse_run_config,
                             progress_label, site_datasets, site_seed)
    from federation.protocol import RUN_CONFIG_KEY, TRAINED_TOGETHER
    from federation.adapter import adapter_delta, from_array_record

    texts = {str(msg.content["config"][RUN_CONFIG_KEY]) for msg in messages}
    if len(texts) != 1:
        raise ValueError("messages trained together must carry one run config")
    cfg = parse_run_config(texts.pop())
    runtime = get_runtime(cfg)
    configure_trainable(runtime.model, cfg)
    global_arrays = from_array_record(messages[0].content["arrays"])
    for msg in messages[1:]:
        record = msg.content["arrays"]
        # In-process messages of one round share the record; anything else is compared in full.
        if any(record[key] is not messages[0].content["arrays"][key] for key in record) and not _same_arrays(
                from_array_record(record), global_arrays):
            raise ValueError("messages trained together must carry one global adapter")
    datasets = [site_datasets(runtime, cfg, ctx)[0] for ctx in contexts]
    rounds = [int(msg.content["config"].get("server-round", 0)) for msg in messages]
    seeds = [site_seed(cfg, r, ctx) for r, ctx in zip(rounds, contexts)]
    trainer = MultiAdapterTrainer(make_trainer(runtime, cfg))
    results = trainer.train(datasets, seeds, global_arrays, proximal_mu=cfg.strategy.proximal_mu,
                            label=", ".join(progress_label(ctx) for ctx in contexts))
    log.info("round %d: %d virtual clients trained together in %.1fs", rounds[0], len(messages),
             sum(r.seconds for r, _ in results))
    together = {TRAINED_TOGETHER: len(messages)}
    return [build_train_reply(msg, ctx, cfg, result, adapter_delta(arrays, global_arrays), together)
            for (result, arrays), msg, ctx in zip(results, messages, contexts)]


def reply_or_error(app: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """app's reply to msg, or an error reply naming the exception (as Flower's runtime turns a crashing ClientApp)."""
    try:
        return app(msg, context)
    except Exception as exc:  # noqa: BLE001 - one crashing site must not take its group down
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"), reply_to=msg)


def answer_together(app: Callable[[Message, Context], Message], messages: Sequence[Message],
                    contexts: Sequence[Context]) -> list[Message]:
    """Replies to messages (one per virtual client, in order): batchable train messages with one run config in
    groups of <= federation.clients_per_batch trained together, every other message by app one at a time."""
    from client.run_config_cache import UnknownRunConfigError, restore_run_config
    from federation.protocol import RUN_CONFIG_KEY

    def full(msg: Message, context: Context) -> Message:
        try:  # batchable() reads the run config: put it back where the message names it by hash only
            return restore_run_config(msg, context)
        except (UnknownRunConfigError, ValueError):  # app's mod answers it with the clear error
            return msg

    messages = [full(msg, context) for msg, context in zip(messages, contexts)]
    replies: list[Message | None] = [None] * len(messages)
    by_config: dict[str, list[int]] = {}
    for i, (msg, context) in enumerate(zip(messages, contexts)):
        if batchable(msg, context):
            by_config.setdefault(str(msg.content["config"][RUN_CONFIG_KEY]), []).append(i)
    for config, indices in by_config.items():
        size = int(json.loads(config)["federation"]["clients_per_batch"])
        for start in range(0, len(indices), size):
            group = indices[start:start + size]
            if len(group) < 2:
                continue
            try:
                answers = train_replies([messages[i] for i in group], [contexts[i] for i in group])
            except Exception:  # never lose a round to the batched path: the same messages, one site at a time
                log.warning("multi-adapter training of %d clients failed; training them one by one:\n%s",
                            len(group), traceback.format_exc())
                continue
            for i, answer in zip(group, answers):
                replies[i] = answer
    return [reply if reply is not None else reply_or_error(app, msg, context)
            for reply, msg, context in zip(replies, messages, contexts)]


def _same_arrays(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
