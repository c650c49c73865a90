"""The coordinator's Flower ServerApp: the round loop, federated evaluation, checkpoints and metrics.

The loop is written out here (rather than ``Strategy.start``) because the coordinator must
evaluate the starting adapter on the sites, checkpoint atomically after every round, and record
who was missing and what crossed the wire; the strategy still does sampling and aggregation.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from federation.adapter import from_array_record, num_elements, to_array_record
from federation.config import RunConfig, overrides_from_flat, run_config_to_json
from federation.compose import compose_config
from federation.model import initial_adapter, lora_shapes, peft_lora_config
from federation.protocol import RUN_CONFIG_KEY
from federation.store import (FEDERATION_RUN_ID_KEY, FEDERATION_RUN_ID_STATE, SERVER_STATE, GlobalAdapterStore,
                              MetricsLog, new_federation_run_id, read_peft_adapter)
from federation.validation import validate_coordinator_setup
from server.replies import (DP_SGD_EPSILON, EVAL_EXACT_MATCH, EVAL_GENERATED, EVAL_LOSS, EVAL_PERPLEXITY,
                            EVAL_ROUGE_L, EVAL_TOKEN_F1, TOKENS_PER_SECOND, TRAIN_LOSS, TRAIN_TOKENS, metric_or_none)
from server.secagg import secagg_params_for_run, secure_train_round
from server.report import plot_eval_metrics, plot_losses, summary_table
from server.run_config_once import RunConfigOnceGrid
from server import tracking
from server.gold_set import GoldSetScorer
from server.methods import build_coordinator
from server.methods.flora import check_site_ranks
from server.strategy import LoraDeltaStrategy, NonFiniteAggregate, RoundLedger, check_finite_aggregate
from strategies.fedavg import UpdateRejected, validate_update

log = logging.getLogger("fedtune.server")

# Flower wraps a ClientApp's exception as "<class '...'>:<'...'>" (Ray adds its traceback, Flower a preamble).
_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]*\.)?([^'.]*)'>:<'(.*)'>$", re.DOTALL)
_FLOWER_PREAMBLE = re.compile(r"Exception \w+ occurred\. Message:\s*")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# "SomeError: message" at the start of a line: the raised exception in a formatted traceback.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*): (\S.*)$", re.MULTILINE)
_WRAPPER_EXCEPTIONS = ("ClientAppException", "RayTaskError")


class FederationFailed(RuntimeError):
    """The run stopped because federation.max_failed_rounds rounds in a row aggregated nothing; str() is the summary."""


def starting_adapter(cfg: RunConfig) -> dict:
    """A fresh seeded adapter, or the one in federation.initial_adapter (checked against the model's LoRA shapes)."""
    if not cfg.federation.initial_adapter:
        return initial_adapter(cfg.model, cfg.lora)
    arrays = read_peft_adapter(cfg.federation.initial_adapter)
    check_fits_model(arrays, cfg, cfg.federation.initial_adapter)
    return arrays


def check_fits_model(arrays: dict, cfg: RunConfig, where: str | Path) -> None:
    """Raise ValueError unless `arrays` has exactly the LoRA keys/shapes of cfg's model and lora settings."""
    shapes = lora_shapes(cfg.model, cfg.lora)
    try:
        validate_update(arrays, {k: _Shape(s) for k, s in shapes.items()})
    except UpdateRejected as exc:
        raise ValueError(f"{where}: adapter does not fit the model/lora config of this run: {exc}") from exc


class _Shape:
    """Stands in for a reference array where only the shape matters."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def build_strategy(cfg: RunConfig) -> LoraDeltaStrategy:
    """The Flower strategy for cfg.strategy, built as its registry entry names (server/methods/; + central DP when
    cfg.privacy.central.enabled). cfg was validated when it was composed (federation.validation)."""
    strategy = build_coordinator(cfg)
    strategy.fold_order = cfg.federation.fold_order
    return strategy


# metrics.jsonl column <- aggregated evaluate metric (server/strategy.py aggregate_evaluate; None when absent).
EVAL_COLUMNS = {"eval_loss": EVAL_LOSS, "eval_perplexity": EVAL_PERPLEXITY, "eval_exact_match": EVAL_EXACT_MATCH,
                "eval_token_f1": EVAL_TOKEN_F1, "eval_rouge_l": EVAL_ROUGE_L}


def _evaluate(strategy: LoraDeltaStrategy, grid: Grid, server_round: int, arrays: ArrayRecord,
              config: ConfigRecord, timeout: float) -> dict[str, Any]:
    """The round's evaluation columns: union loss, perplexity, generation scores, and the per-site breakdown."""
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid)
    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
    metrics = strategy.aggregate_evaluate(server_round, replies)
    columns: dict[str, Any] = {column: metric_or_none(metrics, name) for column, name in EVAL_COLUMNS.items()}
    columns["eval_generated"] = metric_or_none(metrics, EVAL_GENERATED, int)
    columns["eval_per_site"] = {str(node): site for node, site in strategy.ledger(server_round).eval_per_site.items()}
    return columns


def _eval_line(columns: dict[str, Any]) -> str:
    """The console's words for a round's evaluation."""
    text = f"union eval loss {columns['eval_loss']}"
    if columns.get("eval_exact_match") is not None:
        text += (f" (exact match {columns['eval_exact_match']:.3f}, token F1 {columns['eval_token_f1']:.3f}, "
                 f"ROUGE-L {columns['eval_rouge_l']:.3f} on {columns['eval_generated']} answers)")
    if columns.get("gold_loss") is not None:
        text += f", gold set loss {columns['gold_loss']:.4f}"
        if columns.get("gold_exact_match") is not None:
            text += f" (exact match {columns['gold_exact_match']:.3f})"
    return text


def _restore(store: GlobalAdapterStore, metrics_log: MetricsLog, strategy: LoraDeltaStrategy, cfg: RunConfig):
    """(last completed round, adapter arrays) from the newest checkpoint, with strategy and RNG state restored."""
    last_round, directory = store.latest()
    arrays, state = store.load(directory)
    check_fits_model(arrays, cfg, directory)
    if state.get("strategy") != cfg.strategy.name:
        raise ValueError(f"{directory}: checkpoint was written by strategy {state.get('strategy')!r}, "
                         f"this run uses {cfg.strategy.name!r}")
    strategy.aggregator.load_state_dict(store.load_strategy_state(directory))
    if strategy.central_dp is not None:
        if "privacy_state" not in state:
            raise ValueError(f"{directory}: checkpoint has no privacy ledger; cannot resume a DP run from it")
        strategy.central_dp.load_state_dict(state["privacy_state"])
    if "python_random_state" in state:
        version, internal, gauss = state["python_random_state"]
        random.setstate((version, tuple(internal), gauss))
    metrics_log.truncate_after(last_round)
    return last_round, arrays, state


def run_federation(grid: Grid, cfg: RunConfig) -> list[dict[str, Any]]:
    """Run cfg.federation.rounds rounds against the nodes behind `grid`; returns the metrics rows."""
    from federation import progress

    validate_coordinator_setup(cfg)  # the tracker's package, a readable eval.gold_set: before any work
    grid = RunConfigOnceGrid(grid)  # the run config travels to each site once, then by its sha256
    console = progress.console()  # shared with the progress bars, so round lines print above them
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    run_dir = Path(cfg.output_dir)
    if not cfg.federation.resume and GlobalAdapterStore(run_dir).latest() is not None:
        raise FileExistsError(f"{run_dir} already holds a run; pass federation.resume=true to continue it, "
                              "or choose another output_dir (nothing was changed)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, sort_keys=True))
    tracker = tracking.start(cfg)
    gold_set = GoldSetScorer(cfg) if cfg.eval.gold_set else None  # loads the base model only when given
    store = GlobalAdapterStore(run_dir, keep_last=cfg.federation.keep_last_checkpoints)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    peft_config = peft_lora_config(cfg.lora, cfg.model.name if cfg.model.name != "preset"
                                   else f"preset:{cfg.model.preset_name}")
    strategy = build_strategy(cfg)
    strategy.spill_dir = str(run_dir)  # updates a robust aggregator keeps beyond its RAM budget go here
    secagg = secagg_params_for_run(cfg)  # None unless privacy.secagg.enabled
    # The sites key the state that rounds advance (error feedback, SCAFFOLD c_i, ...) by this id and the round
    # (client/site_state.py): a resumed run reuses the checkpointed id, so its sites continue where they were.
    run_id = (store.federation_run_id() if cfg.federation.resume else None) or new_federation_run_id()
    config = ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), FEDERATION_RUN_ID_KEY: run_id})
    timeout = cfg.federation.round_timeout_s
    # A site whose node config asks for another LoRA rank than a one-rank strategy trains: fail before round 0.
    check_site_ranks(grid, cfg, config, cfg.federation.query_timeout())

    if strategy.central_dp is not None:
        # Site-level DP's amplification by sampling assumes nobody can predict which sites a round samples.
        # Flower samples with the `random` module: under central DP it is seeded from OS entropy and its state
        # is never checkpointed (a resumed DP run samples afresh: not reproducible, by design).
        random.seed(os.urandom(32))

    def checkpoint(server_round: int, adapter: dict) -> str:
        state = {"strategy": cfg.strategy.name, FEDERATION_RUN_ID_STATE: run_id}
        if strategy.central_dp is None:
            state["python_random_state"] = list(random.getstate())
        else:
            state["privacy_state"] = strategy.central_dp.state_dict()
        path = store.save(server_round, adapter, peft_config, state, strategy.aggregator.state_dict())
        return json.loads((path / SERVER_STATE).read_text())["adapter_digest"]

    rows: list[dict[str, Any]] = []
    if cfg.federation.resume and store.latest() is not None:
        first_round, start_arrays, state = _restore(store, metrics_log, strategy, cfg)
        rows = metrics_log.rows()
        digest = state["adapter_digest"]
        if state.get(FEDERATION_RUN_ID_STATE) != run_id:
            log.warning("%s has no federation run id (written by an older fedtune): the sites' round state "
                        "(error feedback, SCAFFOLD c_i, ...) starts afresh", store.global_adapter_dir.resolve())
        console.print(f"[bold]resuming[/] after round {first_round} from {store.global_adapter_dir.resolve()} "
                      f"(adapter digest {digest[:16]}…, sha256 {state['adapter_sha256'][:16]}…)")
    else:
        first_round, start_arrays = 0, starting_adapter(cfg)
        digest = checkpoint(0, start_arrays)
    arrays = to_array_record(start_arrays)
    n_params = num_elements(start_arrays)
    console.print(f"[bold]fedtune[/] coordinator: rounds {first_round + 1}..{cfg.federation.rounds}, "
                  f"strategy={cfg.strategy.name}, adapter {n_params:,} params ({arrays.count_bytes() / 1e6:.2f} MB), "
                  f"run dir {run_dir}")

    if first_round == 0 and cfg.federation.evaluate_before_training:
        start = time.perf_counter()
        eval_columns = _evaluate(strategy, grid, 0, arrays, config, cfg.federation.evaluate_timeout())
        if gold_set is not None:
            eval_columns.update(gold_set.score(start_arrays, 0))
        ledger = strategy.ledger(0)
        row = {"round": 0, **eval_columns, "train_loss": None, "seconds": time.perf_counter() - start,
               "eval_failed": {str(k): v for k, v in ledger.eval_failed.items()},
               "eval_rejected": {str(k): v for k, v in ledger.eval_rejected.items()},
               "adapter_params": n_params, "adapter_digest": digest}
        metrics_log.append(row)
        rows.append(row)
        tracker.log_round(row)
        console.print(f"round 0/{cfg.federation.rounds}: {_eval_line(eval_columns)}")

    failed_rounds: list[int] = []  # the current streak of rounds that aggregated nothing
    # The bar's words are the round lines printed above it (plain=False: no second line per round off a terminal).
    with progress.track("rounds", cfg.federation.rounds, "rounds", completed=first_round, plain=False) as bar:
        for server_round in range(first_round + 1, cfg.federation.rounds + 1):
            start = time.perf_counter()
            start_digest = digest
            if secagg is not None:
                new_arrays, train_metrics = secure_train_round(strategy, grid, server_round, arrays, config, secagg,
                                                               timeout)
            else:
                new_arrays, train_metrics = strategy.train_round(server_round, arrays, ConfigRecord(dict(config)),
                                                                 grid, timeout)
            ledger = strategy.ledger(server_round)
            if new_arrays is not None and len(ledger.accepted) < cfg.federation.min_completed_clients:
                log.error("round %d: only %d usable updates (< federation.min_completed_clients=%d); "
                          "global adapter unchanged", server_round, len(ledger.accepted),
                          cfg.federation.min_completed_clients)
                new_arrays = None
            adapter = None if new_arrays is None else from_array_record(new_arrays)
            if adapter is not None:
                try:  # every strategy's (and SecAgg+'s) new adapter, as it would be saved and sent
                    check_finite_aggregate(adapter, "the new global adapter")
                except NonFiniteAggregate as exc:
                    ledger.aggregation_error = f"{type(exc).__name__}: {exc}"
                    log.error("round %d: %s; global adapter unchanged", server_round, exc)
                    adapter = new_arrays = None
            if new_arrays is not None:
                arrays = new_arrays
            trained = time.perf_counter()
            eval_columns = _evaluate(strategy, grid, server_round, arrays, config, cfg.federation.evaluate_timeout())
            if adapter is None:
                adapter = from_array_record(arrays)
            if gold_set is not None:
                eval_columns.update(gold_set.score(adapter, server_round))
            evaluated = time.perf_counter()
            digest = checkpoint(server_round, adapter)
            finished = time.perf_counter()
            row = {
                "round": server_round,
                "train_loss": metric_or_none(train_metrics, TRAIN_LOSS),
                **eval_columns,
                "clients_sampled": len(ledger.sampled),
                "clients_ok": len(ledger.accepted),
                "missing": ledger.missing,
                "failed": {str(k): v for k, v in ledger.failed.items()},
                "rejected": {str(k): v for k, v in ledger.rejected.items()},
                "eval_failed": {str(k): v for k, v in ledger.eval_failed.items()},
                "eval_rejected": {str(k): v for k, v in ledger.eval_rejected.items()},
                "aggregation_error": ledger.aggregation_error,
                "bytes_up": ledger.bytes_up,
                "bytes_down": ledger.bytes_down,
                "train_tokens": metric_or_none(train_metrics, TRAIN_TOKENS, int),
                "tokens_per_second": metric_or_none(train_metrics, TOKENS_PER_SECOND),
                "adapter_params": n_params,
                "per_site": {str(k): v for k, v in ledger.per_site.items()},
                "data_fingerprints": {str(k): v for k, v in ledger.data_fingerprints.items()},
                "aggregated": new_arrays is not None,
                "privacy": strategy.privacy_reports.get(server_round),
                "epsilon": strategy.privacy_reports.get(server_round, {}).get("epsilon"),
                "local_dp_epsilon": max((site[DP_SGD_EPSILON] for site in ledger.per_site.values()
                                         if DP_SGD_EPSILON in site), default=None),
                "start_adapter_digest": start_digest,
                "adapter_digest": digest,
                "seconds": finished - start,
                # Where the round's time went at the coordinator: the train exchange with aggregation, the evaluate
                # exchange (and gold set), the checkpoint.
                "phase_seconds": {"train": trained - start, "evaluate": evaluated - trained,
                                  "checkpoint": finished - evaluated},
            }
            metrics_log.append(row)
            rows.append(row)
            tracker.log_round(row)
            console.print(f"round {server_round}/{cfg.federation.rounds}: clients {row['clients_ok']}/"
                          f"{row['clients_sampled']}, train loss {row['train_loss']}, {_eval_line(eval_columns)}, "
                          f"{row['bytes_up'] / 1e6:.2f} MB up, {row['seconds']:.1f}s"
                          + (f", missing nodes {row['missing']}" if row["missing"] else "")
                          + (f", epsilon {row['epsilon']:.3f}" if row["epsilon"] is not None else ""))
            bar.advance()
            failed_rounds = failed_rounds + [server_round] if new_arrays is None else []
            if len(failed_rounds) >= cfg.federation.max_failed_rounds:
                tracker.finish(store.global_adapter_dir, failed=True)
                raise FederationFailed(failure_summary(cfg, strategy, failed_rounds, store.global_adapter_dir,
                                                       metrics_log.path))

    plot_losses(rows, run_dir / "loss.png", title=f"{cfg.strategy.name}, {cfg.federation.num_clients} sites")
    plot_eval_metrics(rows, run_dir / "eval_metrics.png",
                      title=f"{cfg.strategy.name}, {cfg.federation.num_clients} sites: union evaluation")
    console.print(summary_table(rows))
    tracker.finish(store.global_adapter_dir)
    console.print(f"global adapter: {store.global_adapter_dir} (PEFT directory), metrics: {metrics_log.path}")
    return rows


def _reason_line(reason: str) -> str:
    """One line of a site's error reply: the site's own exception (Flower's and Ray's wrapping removed)."""
    text = _ANSI_ESCAPE.sub("", str(reason or "")).strip()
    match = _FLOWER_REASON.match(text)
    raised = ""
    if match:
        raised, text = match.groups()
    # In a chained traceback the site's own exception comes first, the runtime's wrappers after it.
    for name, message in _EXCEPTION_LINE.findall(text):
        if not name.startswith(_WRAPPER_EXCEPTIONS) and "Traceback" not in message:
            return f"{name}: {message.strip()}"
    text = _FLOWER_PREAMBLE.sub("", text)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "no reason given")
    return f"{raised}: {line}" if raised and not raised.startswith(_WRAPPER_EXCEPTIONS) else line


def round_failure_cause(cfg: RunConfig, ledger: RoundLedger) -> str:
    """Why a round aggregated nothing, from its ledger: its accepted updates could not be aggregated, else the first
    site error or rejection, else silence or too few."""
    if ledger.aggregation_error:
        return f"the {len(ledger.accepted)} accepted updates could not be aggregated: {ledger.aggregation_error}"
    if ledger.failed:
        node, reason = next(iter(ledger.failed.items()))
        return f"node {node} failed: {_reason_line(reason)}"
    if ledger.rejected:
        node, reason = next(iter(ledger.rejected.items()))
        return f"the update of node {node} was rejected: {_reason_line(reason)}"
    if not ledger.sampled:
        return (f"no site was sampled (fewer than strategy.min_available_clients="
                f"{cfg.strategy.min_available_clients} connected)")
    if not ledger.accepted:
        return (f"no reply from nodes {ledger.missing} within federation.round_timeout_s="
                f"{cfg.federation.round_timeout_s:g}")
    return (f"only {len(ledger.accepted)} usable updates (< federation.min_completed_clients="
            f"{cfg.federation.min_completed_clients})")


def failure_summary(cfg: RunConfig, strategy: LoraDeltaStrategy, failed_rounds: list[int], adapter_dir: Path,
                    metrics_path: Path) -> str:
    """One paragraph: which rounds aggregated nothing, the first cause, and what was kept."""
    first = strategy.ledger(failed_rounds[0])
    counts = (f"{len(first.failed)} failed, {len(first.rejected)} rejected and "
              f"{len(set(first.missing) - set(first.failed) - set(first.rejected))} silent of "
              f"{len(first.sampled)} sampled sites")
    rounds = (f"round {failed_rounds[0]}" if len(failed_rounds) == 1
              else f"rounds {failed_rounds[0]}-{failed_rounds[-1]}")
    return (f"the federation stopped after round {failed_rounds[-1]}: {rounds} aggregated nothing "
            f"(federation.max_failed_rounds={cfg.federation.max_failed_rounds}). First cause, round "
            f"{failed_rounds[0]}: {round_failure_cause(cfg, first)} ({counts}). The global adapter is unchanged "
            f"since round {failed_rounds[0] - 1} ({adapter_dir}); per-round details in {metrics_path}.")


def make_server_app(cfg: RunConfig, wrap_grid: Callable[[Grid], Grid] | None = None) -> ServerApp:
    """A ServerApp bound to an already composed config (simulation); wrap_grid(grid) is the Grid the rounds use."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(wrap_grid(grid) if wrap_grid is not None else grid, cfg)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .` entry: hydra defaults from conf/ plus the run config's flat overrides."""
    cfg = compose_config(overrides_from_flat(dict(context.run_config)))
    if cfg.federation.clients_per_batch > 1:
        # Grouping virtual clients is `fedtune simulate`'s (simulations/virtual_grid.py); here every node is one
        # client (a real site, or one of Flower's own simulated nodes), so say so rather than ignore it silently.
        log.warning("federation.clients_per_batch=%d applies to `fedtune simulate` only; under `flwr run` each "
                    "node trains on its own", cfg.federation.clients_per_batch)
    run_federation(grid, cfg)
