"""Experiment tracking of a run (tracking=none | mlflow | tensorboard): start(cfg), log_round(row), finish(adapter).

MLflow gets the resolved config as params, every round's numeric metrics (step = round), each site's data
fingerprint as tags, and the final global adapter as an artifact; by default in a local file store at
<output_dir>/mlruns (tracking.uri to choose another). TensorBoard gets event files in <output_dir>/tensorboard.
Both packages are optional; federation.validation.validate_coordinator_setup refuses a tracker whose package is
missing before the run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from federation.config import RunConfig

# metrics.jsonl columns that are tracked as metrics (when numeric): the round's headline numbers.
ROUND_METRICS = ("train_loss", "eval_loss", "eval_perplexity", "eval_exact_match", "eval_token_f1", "eval_rouge_l",
                 "eval_generated", "clients_sampled", "clients_ok", "bytes_up", "bytes_down", "train_tokens",
                 "tokens_per_second", "epsilon", "local_dp_epsilon", "seconds", "gold_loss", "gold_perplexity",
                 "gold_exact_match", "gold_token_f1", "gold_rouge_l")
# Per-site evaluate metrics tracked as site/<partition id or node id>/<metric>.
SITE_METRICS = ("eval-loss", "eval-exact-match", "eval-token-f1", "eval-rouge-l")
MLFLOW_BATCH = 100  # MLflow's limit of params / metrics per log_batch call


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def round_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one metrics.jsonl row: ROUND_METRICS plus each site's evaluate scores."""
    scalars = {key: _number(row.get(key)) for key in ROUND_METRICS}
    for node, site in (row.get("eval_per_site") or {}).items():
        label = site.get("partition-id", -1)
        name = f"site/{label if isinstance(label, int) and label >= 0 else node}"
        scalars.update({f"{name}/{metric}": _number(site.get(metric)) for metric in SITE_METRICS})
    return {key: value for key, value in scalars.items() if value is not None}


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as {"train.lr": "0.005", ...} (lists and dicts as JSON)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, str) else json.dumps(node)

    walk(dataclasses.asdict(cfg), "")
    return out


class Tracker:
    """tracking=none: nothing is recorded beyond metrics.jsonl and the plots."""

    def start(self, cfg: RunConfig) -> None:
        """Begin a tracked run with the resolved config."""

    def log_round(self, row: dict[str, Any]) -> None:
        """Record one metrics.jsonl row."""

    def finish(self, adapter_dir: str | Path | None, failed: bool = False) -> None:
        """Close the run; attach the final global adapter directory (when there is one)."""


class MlflowTracker(Tracker):
    """MLflow through its client API (no process-wide active run): params, metrics per round, tags, artifact."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client, self.run_id = None, None

    def start(self, cfg: RunConfig) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=Path(cfg.output_dir).name,
                                             tags={"fedtune.output_dir": str(Path(cfg.output_dir).resolve())}
                                             ).info.run_id
        params = [Param(key, value) for key, value in flat_params(cfg).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_BATCH])

    def log_round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, int(row["round"])) for key, value in round_scalars(row).items()]
        tags = [RunTag(f"data_fingerprint.{site}", f"{fp['sha256']} ({fp['examples']} examples)")
                for site, fp in (row.get("data_fingerprints") or {}).items()]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MLFLOW_BATCH])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def finish(self, adapter_dir: str | Path | None, failed: bool = False) -> None:
        if adapter_dir is not None and Path(adapter_dir).is_dir():
            # resolve(): global_adapter is a symlink to the newest checkpoint
            self.client.log_artifacts(self.run_id, str(Path(adapter_dir).resolve()), artifact_path="global_adapter")
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TensorBoardTracker(Tracker):
    """TensorBoard event files (torch's SummaryWriter): scalars per round, the config as text."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer = log_dir, None

    def start(self, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("config", "```\n" + json.dumps(dataclasses.asdict(cfg), indent=1) + "\n```", 0)

    def log_round(self, row: dict[str, Any]) -> None:
        for key, value in round_scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["round"]))
        self.writer.flush()

    def finish(self, adapter_dir: str | Path | None, failed: bool = False) -> None:
        if adapter_dir is not None:
            self.writer.add_text("global_adapter", str(Path(adapter_dir).resolve()), 0)
        self.writer.close()


def start(cfg: RunConfig) -> Tracker:
    """The tracker of cfg.tracking, started (its package was checked by validate_coordinator_setup)."""
    run_dir = Path(cfg.output_dir)
    if cfg.tracking.name == "mlflow":
        uri = cfg.tracking.uri
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow >= 3.7 refuses its file store unless asked: the local default is what we want here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracker: Tracker = MlflowTracker(uri, cfg.tracking.experiment)
    elif cfg.tracking.name == "tensorboard":
        tracker = TensorBoardTracker(run_dir / "tensorboard")
    else:
        tracker = Tracker()
    tracker.start(cfg)
    return tracker
