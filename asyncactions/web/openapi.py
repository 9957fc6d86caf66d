"""The OpenAPI 3.1 document of the HTTP API. Written by hand to say exactly what the
handlers answer; the schemathesis test holds the running server to it."""

from __future__ import annotations

from typing import Any

from ..processors import MAX_RETRIES
from ..schema import STATUSES

NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
NULLABLE_SECONDS = {"type": ["number", "null"], "description": "seconds"}
DURATION = {"type": "string", "description": "a duration: 500ms, 30s, 5m, 2h or 7d",
            "examples": ["30s"]}

ACTION = {
    "type": "object",
    "description": "Every field of the action, as `asyncactions show ID --format json`.",
    "required": ["id", "name", "processor", "status", "attempts", "errors", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "examples": ["ASYNC-00000042"]},
        "processor": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "data": {"description": "the payload, any JSON value"},
        "related_id": NULLABLE_STRING,
        "priority": {"type": "integer"},
        "retries": {"type": ["integer", "null"]},
        "attempts": {"type": "integer"},
        "error": NULLABLE_STRING,
        "errors": {"description": "failed attempts, newest last (text when a stored row "
                                  "does not decode)",
                   "anyOf": [{"type": "array", "items": {"type": "object"}},
                             {"type": "string"}]},
        "result": {"description": "the processor's return value, any JSON value"},
        "unique_key": NULLABLE_STRING,
        "next_eligible_at": {"type": "string", "format": "date-time"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": NULLABLE_TIME,
        "finished_at": NULLABLE_TIME,
        "claimed_by": NULLABLE_STRING,
        "lease_expires_at": NULLABLE_TIME,
        "ordering_key": NULLABLE_STRING,
        "progress": {"description": "what the running (or last) attempt reported",
                     "anyOf": [{"type": "object"}, {"type": "null"}, {"type": "string"}]},
        "trace_context": NULLABLE_STRING,
        "event": NULLABLE_STRING,
        "queued": NULLABLE_SECONDS,
        "run_time": NULLABLE_SECONDS,
    },
}

PROCESSOR_STATE = {"type": "object", "required": ["name", "state"], "properties": {
    "name": {"type": "string"}, "state": {"type": "string", "enum": ["paused", "running"]},
    "paused_at": NULLABLE_TIME, "paused_by": NULLABLE_STRING}}
EVENT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "data": {"description": "any JSON value"},
        "related_id": NULLABLE_STRING,
        "delay": {**DURATION, "type": ["string", "null"]},
    },
}

ENQUEUE = {
    "type": "object",
    "required": ["processor"],
    "additionalProperties": False,
    "properties": {
        "processor": {"type": "string", "minLength": 1},
        "data": {"description": "any JSON value"},
        "related_id": NULLABLE_STRING,
        "delay": {**DURATION, "type": ["string", "null"]},
        "priority": {"type": "integer", "minimum": -32768, "maximum": 32767},
        "unique_key": NULLABLE_STRING,
        "ordering_key": NULLABLE_STRING,
        "retries": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_RETRIES},
    },
}


def _list(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [key], "properties": {
        key: {"type": "array", "items": item}}}


STATS_ROW = {"type": "object", "required": ["processor", "total"], "properties": {
    "processor": {"type": "string"}, "total": {"type": "integer"},
    **{s: {"type": "integer"} for s in STATUSES},
    "success_rate": {"type": ["number", "null"]}, "retry_rate": {"type": ["number", "null"]},
    "mean_run_time": NULLABLE_SECONDS, "p95_run_time": NULLABLE_SECONDS,
    "top_errors": {"type": "array", "items": {"type": "object", "properties": {
        "error": {"type": "string"}, "count": {"type": "integer"}}}}}}
WORKER_ROW = {"type": "object", "required": ["id"], "properties": {
    "id": {"type": "string"}, "hostname": {"type": "string"}, "pid": {"type": "integer"},
    "processors": {"type": "array", "items": {"type": "string"}},
    "started_at": {"type": "string"}, "heartbeat_at": {"type": "string"},
    "heartbeat_age": {"type": "number"}, "running": {"type": "integer"}}}
PROCESSOR_ROW = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "retries": {"type": "integer"},
    "retry_interval": {"type": "string"}, "backoff": {"type": "string"},
    "max_retry_interval": {"type": "string"}, "timeout": NULLABLE_STRING,
    "batch_size": {"type": "integer"}, "enabled": {"type": "boolean"},
    "transactional": {"type": "boolean"}, "overridden": {"type": "string"},
    "state": {"type": "string"}, "concurrency": {"type": ["integer", "null"]},
    "rate_limit": NULLABLE_STRING, "paused_at": NULLABLE_TIME, "paused_by": NULLABLE_STRING,
    "served": {"type": "string"}}}
SCHEDULE_ROW = {"type": "object", "required": ["name", "processor"], "properties": {
    "name": {"type": "string"}, "processor": {"type": "string"}, "when": {"type": "string"},
    "timezone": {"type": "string"}, "next_fire": {"type": "string"}, "data": {}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    why = {400: "bad input; the message names the field", 401: "no or wrong token",
           403: "read-only server, cross-site request or missing CSRF token",
           404: "no such action or processor",
           409: "the action's status does not allow the change",
           503: "the database does not answer"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, why[c]) for c in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


ACTION_ID = {"name": "id", "in": "path", "required": True,
             "schema": {"type": "string", "examples": ["42", "ASYNC-00000042"]},
             "description": "the action's id: 42 or ASYNC-00000042"}
READ = (400, 401, 403, 503)
WRITE = (400, 401, 403, 503)


def document(root_path: str = "") -> dict[str, Any]:
    action_ref = {"$ref": "#/components/schemas/Action"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "asyncactions", "version": "1",
                 "description": "Enqueue work, follow it and steer it (SPEC §7)."},
        "servers": [{"url": root_path or "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Action": ACTION, "Enqueue": ENQUEUE,
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
            },
        },
        "paths": {
            "/api/v1/actions": {
                "post": {
                    "summary": "Enqueue an action",
                    "parameters": [
                        _query("blocking", {"type": "string", "enum": ["true", "false"]},
                               "wait for the action to end"),
                        _query("timeout", DURATION, "with blocking: how long to wait "
                                                    "(default 30s, at most 5m)")],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Enqueue"}}}},
                    "responses": {
                        "200": _json(action_ref, "blocking: the action ended in time"),
                        "202": _json(action_ref, "enqueued (or still running when "
                                                 "blocking timed out)"),
                        **_errors(*WRITE)},
                },
                "get": {
                    "summary": "List actions, newest first",
                    "parameters": [
                        _query("status", {"type": "string"},
                               "statuses, comma-separated"),
                        _query("processor", {"type": "string"}, "one processor"),
                        _query("related_id", {"type": "string"}, "one business record"),
                        _query("since", DURATION, "created within"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                               "at most this many (default 50)"),
                        _query("before", {"type": "string"},
                               "only ids below this one: pass `next` to page on")],
                    "responses": {"200": _json({
                        "type": "object", "required": ["actions", "next"], "properties": {
                            "actions": {"type": "array", "items": action_ref},
                            "next": {"type": ["integer", "null"]}}}, "a page of actions"),
                        **_errors(*READ)},
                },
            },
            "/api/v1/actions/{id}": {"get": {
                "summary": "One action, every field", "parameters": [ACTION_ID],
                "responses": {"200": _json(action_ref, "the action"),
                              **_errors(*READ, 404)}}},
            "/api/v1/actions/{id}/retry": {"post": {
                "summary": "Run a finished action again now", "parameters": [ACTION_ID],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "additionalProperties": False,
                               "properties": {"retries": {"type": ["integer", "null"],
                                                          "minimum": 0,
                                                          "maximum": MAX_RETRIES}}}}}},
                "responses": {"200": _json(action_ref, "the action, pending again"),
                              **_errors(*WRITE, 404, 409)}}},
            "/api/v1/actions/{id}/cancel": {"post": {
                "summary": "Cancel a pending or running action", "parameters": [ACTION_ID],
                "responses": {"200": _json(action_ref, "the canceled action"),
                              **_errors(*WRITE, 404, 409)}}},
            "/api/v1/stats": {"get": {
                "summary": "Per processor over a window",
                "parameters": [_query("since", DURATION, "window (default 24h)")],
                "responses": {"200": _json(_list("stats", STATS_ROW), "as `stats`"),
                              **_errors(*READ)}}},
            "/api/v1/workers": {"get": {
                "summary": "Live workers",
                "responses": {"200": _json(_list("workers", WORKER_ROW), "as `workers`"),
                              **_errors(*READ)}}},
            "/api/v1/processors": {"get": {
                "summary": "Registered processors and their effective settings",
                "responses": {"200": _json(_list("processors", PROCESSOR_ROW),
                                           "as `processors`"), **_errors(*READ)}}},
            "/api/v1/schedules": {"get": {
                "summary": "Configured schedules",
                "responses": {"200": _json(_list("schedules", SCHEDULE_ROW),
                                           "as `schedules`"), **_errors(*READ)}}},
            **{f"/api/v1/processors/{{name}}/{verb}": {"post": {
                "summary": f"{verb.capitalize()} claiming a processor's actions, cluster-wide",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json(PROCESSOR_STATE, "the processor's state"),
                              **_errors(*WRITE, 404)}}} for verb in ("pause", "resume")},
            "/api/v1/events/{event}": {"post": {
                "summary": "Publish an event: one action per processor its rules bind",
                "parameters": [{"name": "event", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1,
                                           "maxLength": 200}}],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": EVENT}}},
                "responses": {"202": _json(_list("actions", action_ref),
                                           "the actions its rules created"),
                              **_errors(*WRITE)}}},
            "/healthz": {"get": {
                "summary": "Does the database answer?", "security": [],
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "status": {"const": "ok"}}}, "it does"),
                    "503": _json({"type": "object", "properties": {
                        "status": {"const": "unavailable"}}}, "it does not")}}},
        },
    }
