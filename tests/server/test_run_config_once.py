"""The run config travels to each site once; later messages name it by sha256; a site that lost it recovers."""

import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

import server.app
from client.app import app as client_app
from client.run_config_cache import (STATE_RECORD, UnknownRunConfigError, forget_recent_run_configs,
                                     restore_run_config)
from federation.adapter import to_array_record
from federation.config import run_config_to_json
from federation.model import initial_adapter
from federation.protocol import (RUN_CONFIG_KEY, RUN_CONFIG_SHA256_KEY, UNKNOWN_RUN_CONFIG_ERROR,
                                 run_config_sha256)
from server.run_config_once import RunConfigOnceGrid
from simulations.inprocess import InProcessGrid
from tests.flower_messages import instruction
from tests.server.test_hetero import RecordingGrid


def _config_bytes(msg) -> int:
    return sum(record.count_bytes() for record in msg.content.config_records.values())


def test_only_the_first_message_to_a_site_carries_the_run_config(make_cfg):
    cfg = make_cfg("federation.num_clients=2", "federation.rounds=2")
    grid = RecordingGrid(client_app, 2)
    rows = server.app.run_federation(grid, cfg)
    assert rows[-1]["clients_ok"] == 2 and all(reply is not None and not reply.has_error()
                                               for _, reply in grid.exchanges)
    text = run_config_to_json(cfg)
    for node in (1, 2):
        sent = [msg for msg, _ in grid.exchanges if msg.metadata.dst_node_id == node]
        assert len(sent) >= 4  # query, round-0 evaluate, 2 x (train, evaluate)
        assert all(msg.content["config"][RUN_CONFIG_SHA256_KEY] == run_config_sha256(text) for msg in sent)
        assert str(sent[0].content["config"][RUN_CONFIG_KEY]) == text
        assert not any(RUN_CONFIG_KEY in msg.content["config"] for msg in sent[1:])
        # What the config record costs: the first message pays for the JSON, every later one a few entries.
        assert _config_bytes(sent[0]) > len(text)
        assert all(_config_bytes(msg) < 256 < len(text) for msg in sent[1:])


def _evaluate_message(cfg, node):
    content = RecordDict({"arrays": to_array_record(initial_adapter(cfg.model, cfg.lora)),
                          "config": ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": 1})})
    return instruction(content, dst_node_id=node, message_type=MessageType.EVALUATE)


def test_a_restarted_site_gets_a_clear_error_and_then_the_full_config(make_cfg):
    cfg = make_cfg("federation.num_clients=2")
    inner = InProcessGrid(client_app, 2)
    grid = RunConfigOnceGrid(inner)
    first = list(grid.send_and_receive([_evaluate_message(cfg, 1), _evaluate_message(cfg, 2)]))
    assert not any(r.has_error() for r in first) and grid.confirmed == {1: {run_config_sha256(run_config_to_json(cfg))},
                                                                        2: {run_config_sha256(run_config_to_json(cfg))}}
    # Site 1 restarts: a new process, and Flower gives it a new Context, so neither holds the run config.
    forget_recent_run_configs()
    old = inner.contexts[1]
    inner.contexts[1] = Context(run_id=old.run_id, node_id=1, node_config=old.node_config, state=RecordDict(),
                                run_config={})
    second = {r.metadata.src_node_id: r for r in grid.send_and_receive([_evaluate_message(cfg, 1),
                                                                          _evaluate_message(cfg, 2)])}
    # Site 1 answered the hash-only message with UNKNOWN_RUN_CONFIG_ERROR; the grid sent it again with the JSON,
    # so the caller sees both sites answer, and site 1 holds the run config again.
    assert not second[1].has_error() and not second[2].has_error()
    assert STATE_RECORD in inner.contexts[1].state.config_records
    assert set(second) == {1, 2}


def test_a_restarted_site_answers_in_the_same_round_over_push_and_pull(make_cfg):
    """The streaming path (push_messages + pull_messages by the pushed ids): the resend's reply comes back under
    the id the caller pushed, and the site's lost-config error never reaches the caller."""
    cfg = make_cfg("federation.num_clients=2")
    inner = InProcessGrid(client_app, 2)
    grid = RunConfigOnceGrid(inner)
    list(grid.send_and_receive([_evaluate_message(cfg, 1), _evaluate_message(cfg, 2)]))
    forget_recent_run_configs()
    old = inner.contexts[1]
    inner.contexts[1] = Context(run_id=old.run_id, node_id=1, node_config=old.node_config, state=RecordDict(),
                                run_config={})
    ids = list(grid.push_messages([_evaluate_message(cfg, 1), _evaluate_message(cfg, 2)]))
    replies = []
    for _ in range(20):
        replies += list(grid.pull_messages([i for i in ids if i not in {r.metadata.reply_to_message_id
                                                                         for r in replies}]))
        if len(replies) == 2:
            break
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
    assert not any(r.has_error() for r in replies)
    # Without the resend the restarted site's reply is the clear error (the site side, as before).
    forget_recent_run_configs()
    inner.contexts[1] = Context(run_id=old.run_id, node_id=1, node_config=old.node_config, state=RecordDict(),
                                run_config={})
    raw = list(inner.send_and_receive([grid._compact(_evaluate_message(cfg, 1))]))
    assert raw[0].has_error() and raw[0].error.code == UNKNOWN_RUN_CONFIG_ERROR
    assert "holds no run config with sha256" in raw[0].error.reason


def test_a_site_stores_the_run_config_and_restores_it_by_hash(make_cfg):
    text = run_config_to_json(make_cfg())
    digest = run_config_sha256(text)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    forget_recent_run_configs()
    by_hash = instruction(RecordDict({"config": ConfigRecord({RUN_CONFIG_SHA256_KEY: digest, "server-round": 2})}), 1)
    with pytest.raises(UnknownRunConfigError):
        restore_run_config(by_hash, context)
    full = instruction(RecordDict({"config": ConfigRecord({RUN_CONFIG_SHA256_KEY: digest, RUN_CONFIG_KEY: text})}), 1)
    assert restore_run_config(full, context) is full
    restored = restore_run_config(by_hash, context)
    assert restored.content["config"][RUN_CONFIG_KEY] == text and restored.content["config"]["server-round"] == 2
    assert RUN_CONFIG_KEY not in by_hash.content["config"]  # the received message is left as it came
    tampered = instruction(RecordDict({"config": ConfigRecord({RUN_CONFIG_SHA256_KEY: digest,
                                                               RUN_CONFIG_KEY: text + " "})}), 1)
    with pytest.raises(ValueError, match="does not match its sha256"):
        restore_run_config(tampered, context)


def test_secagg_rounds_name_the_run_config_by_hash(make_cfg):
    """SecAgg+'s masked-vector stage carries the run config in Flower's legacy FitIns config: compacted there too."""
    cfg = make_cfg("privacy=secagg", "federation.num_clients=3", "federation.rounds=1",
                   "federation.evaluate_before_training=false", "strategy.fraction_evaluate=0.0")
    grid = RecordingGrid(client_app, 3)
    rows = server.app.run_federation(grid, cfg)
    assert rows[-1]["clients_ok"] == 3 and rows[-1]["aggregated"]
    named = [(msg, name) for msg, _ in grid.exchanges for name, record in msg.content.config_records.items()
             if RUN_CONFIG_SHA256_KEY in record]
    fit_configs = [(msg, name) for msg, name in named if name != "config"]  # the legacy FitIns config record
    assert len(fit_configs) == 3  # one masked-vector stage message per site, after each site answered the query
    assert not any(RUN_CONFIG_KEY in msg.content[name] for msg, name in fit_configs)


def test_the_client_app_itself_answers_a_message_that_names_the_run_config_by_hash(make_cfg):
    """What a deployed site runs (client/worker.py calls the ClientApp per message, no simulation grouping)."""
    cfg = make_cfg()
    text = run_config_to_json(cfg)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={})
    full = _evaluate_message(cfg, 1)
    full.content["config"] = ConfigRecord({**dict(full.content["config"]),
                                           RUN_CONFIG_SHA256_KEY: run_config_sha256(text)})
    assert not client_app(full, context).has_error()
    by_hash = _evaluate_message(cfg, 1)
    by_hash.content["config"] = ConfigRecord({RUN_CONFIG_SHA256_KEY: run_config_sha256(text), "server-round": 1})
    reply = client_app(by_hash, context)
    assert not reply.has_error() and reply.content["metrics"]["eval-tokens"] > 0
    forget_recent_run_configs()  # a restarted site: new process, new Context
    lost = client_app(by_hash, Context(run_id=1, node_id=1, node_config=context.node_config, state=RecordDict(),
                                       run_config={}))
    assert lost.has_error() and lost.error.code == UNKNOWN_RUN_CONFIG_ERROR


def test_a_context_saved_after_the_reply_still_restores_the_run_config_in_the_same_process(make_cfg):
    """The worker pushes the reply before the Context (Flower's order): the next message may come with the old
    Context. The process's own copy answers it, where the Context alone would have cost the site a round."""
    text = run_config_to_json(make_cfg())
    digest = run_config_sha256(text)
    forget_recent_run_configs()
    full = instruction(RecordDict({"config": ConfigRecord({RUN_CONFIG_SHA256_KEY: digest, RUN_CONFIG_KEY: text})}), 1)
    restore_run_config(full, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    stale = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    by_hash = instruction(RecordDict({"config": ConfigRecord({RUN_CONFIG_SHA256_KEY: digest})}), 1)
    assert restore_run_config(by_hash, stale).content["config"][RUN_CONFIG_KEY] == text
    assert STATE_RECORD in stale.state.config_records  # and the Context holds it again from now on
    forget_recent_run_configs()
    with pytest.raises(UnknownRunConfigError):
        restore_run_config(by_hash, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
