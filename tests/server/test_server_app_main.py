"""The `flwr run .` entry (server/app.py main): the run config's flat overrides, and what it does not do."""

import logging

from flwr.app import Context, RecordDict

import server.app as server_app


def test_flwr_run_says_clients_per_batch_does_not_apply(monkeypatch, caplog):
    composed = []
    monkeypatch.setattr(server_app, "run_federation", lambda grid, cfg: composed.append(cfg))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"federation.clients_per_batch": 4, "federation.rounds": 2})
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        server_app.main(None, context)
    assert composed[0].federation.rounds == 2 and composed[0].federation.clients_per_batch == 4
    assert "clients_per_batch=4 applies to `fedtune simulate` only" in caplog.text
