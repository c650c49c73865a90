"""`fedtune eval`: scores a saved PEFT adapter or the base model on a JSONL file; mistakes are one line, exit 2."""

import json

import pytest
import torch

from federation.compose import compose_config
from simulations.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A JSONL file, a zero-B adapter (= the base model) and a random-B one, saved as PEFT directories."""
    from federation.model import build_lora_model

    root = tmp_path_factory.mktemp("eval-cli")
    overrides = [f"model.cache_dir={root / 'models'}", "eval.max_new_tokens=6"]
    cfg = compose_config(overrides)
    data = root / "eval.jsonl"
    records = [{"instruction": f"Reverse: {w}", "output": w[::-1]} for w in ("abc", "hello", "tiny", "model")]
    data.write_text("".join(json.dumps(r) + "\n" for r in records + [{"text": "no prompt here"}]))
    model, _, _ = build_lora_model(cfg.model, cfg.lora)
    model.save_pretrained(root / "zero")
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(root / "trained")
    return root, overrides, data


def _scores(setup, *which):
    root, overrides, data = setup
    out = root / f"scores-{len(list(root.iterdir()))}.json"
    assert main(["eval", *which, "--data", str(data), "--json", str(out), *overrides]) == 0
    return json.loads(out.read_text())


def test_scores_match_a_direct_evaluation_and_base_only_equals_a_zero_adapter(setup, capsys):
    from peft import PeftModel

    from federation.evaluation import evaluate_generation
    from client.trainer import LocalTrainer
    from federation.data import SiteDataset
    from federation.model import load_base_model, load_tokenizer

    root, overrides, data = setup
    trained = _scores(setup, "--adapter", str(root / "trained"))
    assert "exact" in capsys.readouterr().out
    cfg = compose_config(overrides)
    base, _, _ = load_base_model(cfg.model)
    model, tokenizer = PeftModel.from_pretrained(base, str(root / "trained")), load_tokenizer(cfg.model)
    dataset = SiteDataset.from_jsonl(data, tokenizer, cfg.data)
    assert trained["examples"] == 5 and trained["answers"] == 4  # the plain record has no prompt to answer
    assert trained["loss"] == pytest.approx(LocalTrainer(model, tokenizer.pad_token_id, cfg.train).evaluate(dataset).loss)
    direct = evaluate_generation(model, tokenizer, dataset, cfg.eval).scores.means()
    assert trained["exact_match"] == direct["exact_match"] and trained["rouge_l"] == direct["rouge_l"]
    base_only, zero = _scores(setup, "--base-only"), _scores(setup, "--adapter", str(root / "zero"))
    assert base_only["loss"] == pytest.approx(zero["loss"]) and base_only["exact_match"] == zero["exact_match"]
    assert trained["loss"] != pytest.approx(base_only["loss"])


def test_mistakes_are_one_line_and_exit_2(setup, tmp_path, capsys):
    root, overrides, data = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    assert main(["eval", "--base-only", "--data", str(bad), *overrides]) == 2
    assert capsys.readouterr().err.strip().startswith(f"config error: --data: {bad}:2: invalid JSON")
    assert main(["eval", "--adapter", str(tmp_path), "--data", str(data), *overrides]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err
    assert main(["eval", "--base-only", "--data", str(data), *overrides, "eval.max_new_tokens=0"]) == 2
    assert "eval.max_new_tokens must be >= 1" in capsys.readouterr().err


def test_quiet_libraries_keeps_user_settings_and_silences_transformers_notes(monkeypatch):
    import os
    import warnings

    from simulations.cli import QUIET_ENVIRONMENT, quiet_libraries

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's own choice stays
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        quiet_libraries()
        warnings.warn_explicit("deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["PYTHONWARNINGS"] == QUIET_ENVIRONMENT["PYTHONWARNINGS"]
    assert caught == []


def test_harness_runs_a_locally_defined_task_on_the_adapter(setup, tmp_path):
    """Targets are the adapter's own greedy answers, so the harness scores 1.0 only if it runs the adapter."""
    pytest.importorskip("lm_eval")  # installed by the test extra; skipped only where it genuinely is not
    from federation.evaluation import generate_answers
    from simulations.evaluate import load_scored_model

    root, overrides, _ = setup
    cfg = compose_config(overrides)
    model, tokenizer = load_scored_model(cfg, str(root / "trained"))
    instructions = ["Reverse: abc", "Add: 2+3", "Uppercase: cat", "Count vowels: tree"]
    prompts = [tokenizer(text + "\n", add_special_tokens=False)["input_ids"] for text in instructions]
    answers, _ = generate_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=4)
    base_answers, _ = generate_answers(load_scored_model(cfg, None)[0], tokenizer, prompts, 4, 4)
    assert answers != base_answers  # otherwise the test could not tell the adapter from the base
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "output": a.split("\n")[0]}) + "\n"
                            for i, a in zip(instructions, answers)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(f"""task: fedtune_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{instruction}}}}\\n"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    out = tmp_path / "scores.json"
    assert main(["eval", "--adapter", str(root / "trained"), "--data", str(data), "--harness", "fedtune_local",
                 "--harness-include", str(tasks), "--json", str(out), *overrides]) == 0
    assert json.loads(out.read_text())["harness"]["fedtune_local"]["exact_match,none"] == 1.0


def test_harness_without_lm_eval_is_one_config_line(setup, monkeypatch, capsys):
    import importlib.util

    root, overrides, data = setup
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", "--base-only", "--data", str(data), "--harness", "x", *overrides]) == 2
    assert capsys.readouterr().err.strip() == ("config error: --harness needs EleutherAI's lm-evaluation-harness, "
                                               "which is not installed: pip install lm_eval")
