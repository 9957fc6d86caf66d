"""The OpenAPI document holds against the running server: schemathesis generates
requests from it (bounded), and every answer must be no 5xx and match its schema."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema_rs

from asyncactions import cancel, init_action

from .conftest import Db, start_worker, wait_until
from .web_server import TOKEN, serve

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")


def test_schemathesis_finds_no_5xx_and_no_answer_off_its_schema(db: Db, tmp_path: Path
                                                                 ) -> None:
    (tmp_path / "stprocs.py").write_text(textwrap.dedent("""
        from asyncactions import processor

        @processor("seeded")
        def seeded(action):
            return {"seen": action.data}
    """))
    for i in range(3):
        init_action(db.engine, "seeded", {"i": i, "html": "<b>"}, related_id=f"r{i}")
    cancel(db.engine, 1)
    with serve(db.url, tmp_path) as server, server.client() as api:
        # A worker runs what the fuzzer enqueues, so blocking requests end quickly.
        worker = start_worker(tmp_path, db.url, "--import", "stprocs")
        wait_until(lambda: api.get("/api/v1/workers").json()["workers"], timeout=30,
                   what="the worker to register")
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run",
             f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
             "--checks", CHECKS, "--max-examples", "10", "--seed", "1", "--workers", "1",
             "--generation-database", "none", "--request-timeout", "40", "--no-color",
             "--phases", "examples,coverage,fuzzing"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env={**os.environ, "NO_COLOR": "1"})
        worker.terminate()
        worker.wait()
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout


def test_real_answers_match_the_documented_schemas(db: Db, tmp_path: Path) -> None:
    """Every kind of answer the API gives, validated against its OpenAPI schema."""
    action = init_action(db.engine, "sync_invoice", {"x": 1})
    with serve(db.url, tmp_path) as server, server.client() as api:
        document = api.get("/openapi.json").json()

        def check(path: str, method: str, answer: object) -> None:
            responses = document["paths"][path][method]["responses"]
            media = responses[str(answer.status_code)]["content"]["application/json"]
            schema = {**media["schema"], "components": document["components"]}
            jsonschema_rs.validator_for(schema, validate_formats=True).validate(answer.json())

        check("/api/v1/actions", "post", api.post("/api/v1/actions", json={
            "processor": "sync_invoice", "data": {"y": [1, 2]}, "related_id": "order:1"}))
        check("/api/v1/actions", "post", api.post("/api/v1/actions", json={"processor": "?"}))
        check("/api/v1/actions", "get", api.get("/api/v1/actions", params={"limit": 1}))
        check("/api/v1/actions/{id}", "get", api.get(f"/api/v1/actions/{action.id}"))
        check("/api/v1/actions/{id}", "get", api.get("/api/v1/actions/424242"))
        check("/api/v1/actions/{id}/cancel", "post",
              api.post(f"/api/v1/actions/{action.id}/cancel"))
        check("/api/v1/actions/{id}/cancel", "post",
              api.post(f"/api/v1/actions/{action.id}/cancel"))  # 409
        check("/api/v1/actions/{id}/retry", "post",
              api.post(f"/api/v1/actions/{action.id}/retry"))
        for path in ("/api/v1/stats", "/api/v1/workers", "/api/v1/processors",
                     "/api/v1/schedules"):
            check(path, "get", api.get(path))
        check("/healthz", "get", api.get("/healthz"))


