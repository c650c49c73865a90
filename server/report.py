"""End-of-run outputs: loss-per-round and eval-metrics-per-round PNGs and a console summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(rows: list[dict[str, Any]], path: str | Path, title: str = "fedtune") -> Path:
    """Train and union eval loss per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train loss (sites, local)"), ("eval_loss", "eval loss (union of sites)")):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# metrics.jsonl column -> label of the generation scores (server/app.py EVAL_COLUMNS), all in [0, 1].
SCORE_COLUMNS = {"eval_exact_match": "exact match", "eval_token_f1": "token F1", "eval_rouge_l": "ROUGE-L"}


def plot_eval_metrics(rows: list[dict[str, Any]], path: str | Path, title: str = "fedtune") -> Path:
    """Union exact match, token F1 and ROUGE-L per round (left axis) and eval perplexity (right, log) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in SCORE_COLUMNS.items():
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("score (union of sites' answers)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    perplexity = [(r["round"], r["eval_perplexity"]) for r in rows if r.get("eval_perplexity") is not None]
    if perplexity:
        right = ax.twinx()
        right.plot(*zip(*perplexity), color="grey", linestyle="--", marker=".", label="perplexity")
        right.set_yscale("log")
        right.set_ylabel("eval perplexity")
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def summary_table(rows: list[dict[str, Any]], title: str = "federation summary"):
    """A rich Table of the per-round metrics."""
    from rich.table import Table

    table = Table(title=title)
    with_eps = any(r.get("epsilon") is not None or r.get("local_dp_epsilon") is not None for r in rows)
    with_scores = any(r.get("eval_exact_match") is not None for r in rows)
    cols = ["round", "clients", "missing", "train loss", "eval loss", "eval ppl"]
    cols += list(SCORE_COLUMNS.values()) if with_scores else []
    with_gold = any(r.get("gold_loss") is not None for r in rows)
    cols += ["gold loss", "gold EM"] if with_gold else []
    cols += ["MB up", "MB down", "seconds"]
    for col in cols + (["epsilon"] if with_eps else []):
        table.add_column(col, justify="right")

    def fmt(value, spec="{:.4f}"):
        return "-" if value is None else spec.format(value)

    for r in rows:
        table.add_row(str(r["round"]), f"{r.get('clients_ok', 0)}/{r.get('clients_sampled', 0)}",
                      ",".join(str(x) for x in r.get("missing", [])) or "-",
                      fmt(r.get("train_loss")), fmt(r.get("eval_loss")), fmt(r.get("eval_perplexity"), "{:.2f}"),
                      *([fmt(r.get(key), "{:.3f}") for key in SCORE_COLUMNS] if with_scores else []),
                      *([fmt(r.get("gold_loss")), fmt(r.get("gold_exact_match"), "{:.3f}")] if with_gold else []),
                      fmt(r.get("bytes_up", 0) / 1e6, "{:.3f}"), fmt(r.get("bytes_down", 0) / 1e6, "{:.3f}"),
                      fmt(r.get("seconds"), "{:.1f}"),
                      *([fmt(r.get("epsilon") if r.get("epsilon") is not None else r.get("local_dp_epsilon"), "{:.3f}")]
                        if with_eps else []))
    return table
