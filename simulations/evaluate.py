"""`fedtune eval`: score a saved PEFT adapter (or the base model alone) on a JSONL file.

The same numbers a site reports in a federated evaluate round (client/evaluation.py): loss and perplexity over
the response tokens, and exact match / token F1 / ROUGE-L of greedy answers to the prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from federation.config import RunConfig


@dataclass
class AdapterScores:
    """What `fedtune eval` prints for one model on one file."""

    model: str
    examples: int
    loss: float
    perplexity: float
    answers: int
    exact_match: float | None
    token_f1: float | None
    rouge_l: float | None
    generated_tokens: int
    tokens_per_second: float


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `fedtune eval` options."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="a PEFT adapter directory, e.g. runs/<run>/global_adapter")
    which.add_argument("--base-only", action="store_true", help="score the base model without any adapter")
    parser.add_argument("--data", required=True, help="a JSONL file of examples (alpaca, chat or plain records)")
    parser.add_argument("--json", dest="json_out", help="also write the scores to this JSON file")
    parser.add_argument("--show", type=int, default=0, help="print the first N prompts' answers and references")
    parser.add_argument("--harness", metavar="TASKS",
                        help="also run EleutherAI lm-evaluation-harness tasks (comma-separated; needs lm_eval)")
    parser.add_argument("--harness-include", metavar="DIR", help="a directory of your own lm_eval task YAMLs")
    parser.add_argument("--harness-limit", type=int, help="at most this many documents per harness task")
    parser.add_argument("overrides", nargs="*",
                        help="hydra overrides for the base model and decoding, e.g. model=hub model.name=DIR "
                             "eval.max_examples=0 eval.max_new_tokens=64 data.prompt_template=...")
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    from federation.store import ADAPTER_WEIGHTS
    from federation.validation import ConfigError, check_jsonl_files

    check_jsonl_files([args.data], "--data")
    if args.adapter and not (Path(args.adapter) / ADAPTER_WEIGHTS).is_file():
        raise ConfigError("--adapter", f"--adapter {args.adapter}: no {ADAPTER_WEIGHTS} here (expected a PEFT "
                          "adapter directory, e.g. runs/<run>/global_adapter)")


def load_scored_model(cfg: RunConfig, adapter: str | None):
    """(model, tokenizer): the base model of cfg.model, with the PEFT adapter directory loaded on top if given."""
    from federation.model import load_base_model, load_tokenizer

    base, _, _ = load_base_model(cfg.model)
    if adapter:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, adapter)
    return base, load_tokenizer(cfg.model)


def score_model(model, tokenizer, cfg: RunConfig, data_path: str, name: str, keep_texts: bool = False):
    """(AdapterScores, GenerationResult) of `model` on the JSONL file: loss, perplexity and generation scores."""
    from federation.evaluation import evaluate_generation
    from client.trainer import LocalTrainer
    from federation.data import SiteDataset
    from federation.text_metrics import perplexity

    dataset = SiteDataset.from_jsonl(data_path, tokenizer, cfg.data)
    loss = LocalTrainer(model, tokenizer.pad_token_id, cfg.train).evaluate(dataset)
    generation = evaluate_generation(model, tokenizer, dataset, cfg.eval, keep_texts=keep_texts)
    means = generation.scores.means()
    scores = AdapterScores(name, len(dataset), loss.loss, perplexity(loss.loss), generation.scores.count,
                           means.get("exact_match"), means.get("token_f1"), means.get("rouge_l"),
                           generation.generated_tokens, generation.tokens_per_second)
    return scores, generation


def scores_table(scores: AdapterScores, title: str):
    """A rich Table of one model's scores."""
    from rich.table import Table

    table = Table(title=f"{title}\n{scores.model}")
    for column in ("examples", "loss", "perplexity", "answers", "exact match", "token F1", "ROUGE-L",
                   "gen tok/s"):
        table.add_column(column, justify="right")

    def fmt(value, spec="{:.4f}"):
        return "-" if value is None else spec.format(value)

    table.add_row(str(scores.examples), fmt(scores.loss), fmt(scores.perplexity, "{:.2f}"),
                  str(scores.answers), fmt(scores.exact_match, "{:.3f}"), fmt(scores.token_f1, "{:.3f}"),
                  fmt(scores.rouge_l, "{:.3f}"), fmt(scores.tokens_per_second, "{:.0f}"))
    return table


def _check_harness_available() -> None:
    import importlib.util

    from federation.validation import ConfigError

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--harness", "--harness needs EleutherAI's lm-evaluation-harness, which is not installed: "
                          "pip install lm_eval")


def run_harness(model, tokenizer, tasks: list[str], include: str | None, limit: int | None,
                batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-evaluation-harness on the model (a PEFT adapter merged into its base)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if hasattr(model, "merge_and_unload"):  # the harness takes a plain transformers model
        model = model.merge_and_unload()
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                         device=str(next(model.parameters()).device))
    results = simple_evaluate(model=harness_model, tasks=tasks, limit=limit,
                              task_manager=TaskManager(include_path=include) if include else TaskManager())
    return {task: {metric: float(value) for metric, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric}
            for task, values in results["results"].items()}


def eval_main(args: argparse.Namespace) -> int:
    """`fedtune eval`: compose the config from the overrides, check the inputs, score, print a table (exit 0)."""
    from rich.console import Console

    from federation.compose import compose_config

    cfg = compose_config(list(args.overrides))
    _check_inputs(args)
    if args.harness:
        _check_harness_available()
    name = "base model" if args.base_only else str(args.adapter)
    model, tokenizer = load_scored_model(cfg, None if args.base_only else args.adapter)
    scores, generation = score_model(model, tokenizer, cfg, args.data, name, keep_texts=args.show > 0)
    console = Console()
    console.print(scores_table(scores, f"fedtune eval: {args.data}"))
    for prediction, reference in list(zip(generation.predictions, generation.references))[:args.show]:
        console.print(f"answer {prediction!r}  reference {reference!r}", markup=False)
    out = dataclasses.asdict(scores)
    if args.harness:
        out["harness"] = run_harness(model, tokenizer, args.harness.split(","), args.harness_include,
                                     args.harness_limit, cfg.eval.batch_size)
        from rich.table import Table

        table = Table(title="lm-evaluation-harness")
        for column in ("task", "metric", "value"):
            table.add_column(column)
        for task, values in out["harness"].items():
            for metric, value in values.items():
                table.add_row(task, metric, f"{value:.4f}")
        console.print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0
