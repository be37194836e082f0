"""/openapi.json describes the loaded bundle: features with their types, tasks as an enum."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ranker.bundle import load_bundle
from ranker.serving import ServingSettings, create_app
from ranker.serving.formats import ARROW_STREAM
from ranker.serving.predictor import load_model
from tests.serving_fixtures import TASKS, mmoe_bundle, shared_bottom_bundle


def _types(schema: dict) -> set[str]:
    return {s["type"] for s in schema.get("anyOf", [schema])}


def test_openapi_types_every_feature_and_lists_the_tasks() -> None:
    settings = ServingSettings(bundle=mmoe_bundle(), device="cpu", warmup_rows=16)
    app = create_app(settings, registry=CollectorRegistry())
    c = TestClient(app)
    doc = c.get("/openapi.json").json()
    op = doc["paths"]["/predict"]["post"]
    schemas = doc["components"]["schemas"]
    tasks = next(p for p in op["parameters"] if p["name"] == "tasks")
    assert tasks["schema"]["items"]["enum"] == list(TASKS) and tasks["explode"] is False
    assert set(schemas["PredictScores"]["properties"]["scores"]["properties"]) == set(TASKS)
    json_body = op["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in json_body} == {"PredictRows", "PredictColumnar"}
    assert ARROW_STREAM in op["requestBody"]["content"] and ARROW_STREAM in op["responses"]["200"]["content"]
    assert {"406", "413", "415", "422"} <= set(op["responses"])

    item, columns = schemas["PredictItem"]["properties"], schemas["PredictColumns"]["properties"]
    b = load_bundle(mmoe_bundle())
    assert set(item) == set(columns) == {f.source for f in b.config.features}
    for f in b.config.features:
        kind = b.featurizer.kinds.get(f.name)
        # booleans for ids: the parser takes them (a boolean training column hashes as 0/1)
        value = {"dense": {"number"}, "int": {"integer", "string", "boolean"}, "str": {"string"}}["dense" if f.type == "dense" else kind]
        row = item[f.source]
        assert f"`{f.name}`" in row["description"] and f.type in row["description"]
        if f.type == "multi_hot":
            arr = next(s for s in row["anyOf"] if s.get("type") == "array")
            assert _types(arr["items"]) == value | {"null"}
        else:
            assert _types(row) == value | {"null"}
        col = next(s for s in columns[f.source]["anyOf"] if s.get("type") == "array")
        assert col["items"]["anyOf"][-1] == {"type": "null"}
        assert (col["minItems"], col["maxItems"]) == (1, settings.max_items)  # one value per candidate, as items are bounded
    assert item["user_id"]["anyOf"][0]["maximum"] == 2**63 - 1  # int64 ids, also as decimal strings
    assert "item_category" in item and "category" not in item  # keyed by the request key, not the feature name
    assert "uniqueItems" not in tasks["schema"]  # ?tasks=ctr,ctr is served (a repeated name counts once)
    for body in ("PredictRows", "PredictColumnar"):  # "context": null is read as no context
        assert {"type": "null"} in schemas[body]["properties"]["context"]["anyOf"]

    # a reload to another model version rebuilds the document
    state = app.state.serving
    state.current = load_model(shared_bottom_bundle(), settings, warm=False)
    after = c.get("/openapi.json").json()["paths"]["/predict"]["post"]["description"]
    assert state.current.version in after and b.version not in after
