"""Progress: rich bars on a terminal console, plain log lines elsewhere; the trainer reports tokens/s."""

import io
import logging

import pytest
from rich.console import Console

from federation import progress


@pytest.fixture
def console_of(monkeypatch):
    """Make the process's progress console a rich Console writing to a buffer; returns the buffer."""
    def use(terminal: bool) -> io.StringIO:
        buffer = io.StringIO()
        monkeypatch.setattr(progress, "_console", Console(file=buffer, force_terminal=terminal, width=120))
        return buffer
    return use


def test_on_a_terminal_a_bar_with_the_rate_and_no_log_lines(console_of, caplog):
    buffer = console_of(terminal=True)
    with caplog.at_level(logging.INFO, logger="fedtune.progress"):
        with progress.track("site 0 training", 4, "steps", rate_unit="tokens") as bar:
            for _ in range(4):
                bar.advance(1, 250)
            progress._bars.refresh()
            shown = buffer.getvalue()
    assert "site 0 training" in shown and "4/4" in shown and "tokens/s" in shown
    assert "\x1b[" in shown  # drawn with terminal control codes
    assert caplog.records == []
    assert progress._bars is None  # the live display stops with its last bar


def test_bars_nest_in_one_live_display(console_of):
    """The in-process engine runs a site's step bar inside the coordinator's round bar (rich allows one live)."""
    buffer = console_of(terminal=True)
    with progress.track("rounds", 2, "rounds", plain=False) as rounds:
        with progress.track("site 1 training", 3) as steps:
            steps.advance(3)
            progress._bars.refresh()
        rounds.advance()
        assert progress._bars is not None
    assert progress._bars is None
    assert "rounds" in buffer.getvalue() and "site 1 training" in buffer.getvalue()


def test_off_a_terminal_plain_lines_and_nothing_drawn(console_of, caplog, monkeypatch):
    buffer = console_of(terminal=False)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a line for every step, not one per 10 s
    with caplog.at_level(logging.INFO, logger="fedtune.progress"):
        with progress.track("site 2 generation", 3, "answers", rate_unit="tokens") as bar:
            for _ in range(3):
                bar.advance(1, 10)
        with progress.track("rounds", 2, "rounds", plain=False) as rounds:
            rounds.advance(2)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["site 2 generation: 1/3 answers", "site 2 generation: 2/3 answers",
                                                       "site 2 generation: 3/3 answers"]
    assert "tokens/s" in lines[-1]
    assert buffer.getvalue() == ""


def test_off_a_terminal_the_console_is_wide_enough_for_the_summary_table(monkeypatch):
    from server.report import summary_table

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(progress, "_console", None)
    console = progress.console()  # pytest captures stdout: not a terminal
    assert not console.is_terminal
    row = {"round": 1, "clients_ok": 4, "clients_sampled": 4, "train_loss": 3.1, "eval_loss": 3.2,
           "eval_perplexity": 24.5, "eval_exact_match": 0.1, "eval_token_f1": 0.2, "eval_rouge_l": 0.3,
           "gold_loss": 3.3, "gold_exact_match": 0.1, "bytes_up": 1e5, "bytes_down": 2e5, "seconds": 1.0,
           "epsilon": 2.0}
    with console.capture() as captured:
        console.print(summary_table([row]))
    text = captured.get()
    assert "…" not in text  # no header or cell elided
    for header in ("exact match", "token F1", "ROUGE-L", "gold EM", "MB down", "seconds", "epsilon"):
        assert header in text


def test_local_training_reports_its_steps_and_tokens_per_second(console_of, caplog):
    import torch

    from client.trainer import LocalTrainer
    from federation.compose import compose_config
    from federation.data import load_site_split
    from federation.model import build_lora_model

    console_of(terminal=False)
    cfg = compose_config(["train.local_steps=2", "data.demo.examples_per_skill=8", "data.demo.eval_examples_per_skill=2"])
    torch.manual_seed(0)
    model, tokenizer, _ = build_lora_model(cfg.model, cfg.lora)
    train_ds, _ = load_site_split(cfg.data, tokenizer, 0, cfg.federation.num_clients)
    with caplog.at_level(logging.INFO, logger="fedtune.progress"):
        result = LocalTrainer(model, tokenizer.pad_token_id, cfg.train, label="site 0").train(train_ds, seed=0)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("site 0 training: 2/2 steps, ") and " tokens/s, " in line
    rate = float(line.split(", ")[1].split()[0].replace(",", ""))
    assert rate == pytest.approx(result.tokens_per_second, rel=0.5)  # same tokens, timed a little differently


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_dp_sgd_training_reports_its_steps_and_tokens_per_second(console_of, caplog):
    import time

    import torch

    from federation.dp_sgd import dp_train_steps
    from tests.federation.test_dp_sgd import setup_dp, tiny_lora_model

    console_of(terminal=False)
    torch.manual_seed(0)
    setup = setup_dp(tiny_lora_model())
    tokens = []

    def counting_collate(examples):
        batch = setup.collate_fn(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="fedtune.progress"):
        dp_train_steps(setup._replace(collate_fn=counting_collate), 3, label="site 1")
    seconds = time.perf_counter() - start
    setup.close()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fedtune.progress"]
    assert line.startswith("site 1 DP-SGD training: 3/3 steps, ") and " tokens/s, " in line
    rate = float(line.split(", ")[1].split()[0].replace(",", ""))
    assert sum(tokens) > 0 and rate == pytest.approx(sum(tokens) / seconds, rel=0.5)


def test_multi_adapter_training_reports_the_groups_steps_and_tokens_per_second(console_of, caplog):
    import torch

    from client.multi_adapter import MultiAdapterTrainer
    from client.trainer import LocalTrainer
    from federation.adapter import get_adapter_arrays
    from federation.compose import compose_config
    from federation.data import load_site_split
    from federation.model import build_lora_model

    console_of(terminal=False)
    cfg = compose_config(["train.local_steps=2", "data.demo.examples_per_skill=8",
                          "data.demo.eval_examples_per_skill=2"])
    torch.manual_seed(0)
    model, tokenizer, _ = build_lora_model(cfg.model, cfg.lora)
    datasets = [load_site_split(cfg.data, tokenizer, pid, 2)[0] for pid in range(2)]
    trainer = MultiAdapterTrainer(LocalTrainer(model, tokenizer.pad_token_id, cfg.train))
    with caplog.at_level(logging.INFO, logger="fedtune.progress"):
        results = trainer.train(datasets, [0, 1], get_adapter_arrays(model), label="site 0, site 1")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fedtune.progress"]
    assert line.startswith("site 0, site 1 training together: 2/2 steps, ") and " tokens/s, " in line
    rate = float(line.split(", ")[2].split()[0].replace(",", ""))
    # the clients' seconds are shares of the group's one wall clock, so they add up to it
    group_rate = sum(r.input_tokens for r, _ in results) / sum(r.seconds for r, _ in results)
    assert rate == pytest.approx(group_rate, rel=0.5)
