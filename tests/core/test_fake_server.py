"""The loopback fake behaves like 1ClickImpact as the real ``makeimpact`` SDK sees it."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
import requests
from makeimpact import Environment, OneClickImpact, OneClickImpactError
from makeimpact.types import CarbonCapturedRecord

from carbonoffset.testing import FakeOneClickImpact, Fault

KEY = "test_fake_server_key_01"


def sdk(server: FakeOneClickImpact, key: str = KEY) -> OneClickImpact:
    client = OneClickImpact(api_key=key, environment=Environment.SANDBOX)
    client.base_url = server.url
    return client


def raw(
    server: FakeOneClickImpact, method: str, path: str, key: str = KEY, **kw: object
) -> requests.Response:
    return requests.request(method, server.url + path, headers={"x-api-key": key}, timeout=5, **kw)  # type: ignore[arg-type]


def test_capture_returns_a_receipt_and_keeps_a_record(server: FakeOneClickImpact) -> None:
    response = sdk(server).capture_carbon(amount=3, metadata={"carbonoffset_offset_id": "abc", "run": "r1"})
    assert response.carbon_captured == 3
    assert response.user_id.startswith("U")
    when = dt.datetime.strptime(response.time_utc, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs((dt.datetime.utcnow() - when).total_seconds()) < 60
    assert response.time_utc.endswith("Z") and len(response.time_utc.split(".")[1]) == 4  # milliseconds + Z
    assert server.total_lb() == 3 == server.total_lb(KEY)
    assert server.total_lb("test_someone_else") == 0
    (record,) = server.captures
    assert record.metadata == {"carbonoffset_offset_id": "abc", "run": "r1"}
    assert KEY not in repr(record)  # the fake keeps a fingerprint, not the key
    assert ("POST", "/v1/capture_carbon", 200) in server.requests


@pytest.mark.parametrize("amount", [0, -1, 1.5, 10_000_001, "2", True])
def test_capture_validates_whole_pounds(server: FakeOneClickImpact, amount: object) -> None:
    with pytest.raises(OneClickImpactError, match="amount must be a whole number of pounds") as info:
        sdk(server).capture_carbon(amount=amount)  # type: ignore[arg-type]
    assert getattr(info.value.__context__, "error_type", None) == "invalid_request_error"
    assert server.requests[-1] == ("POST", "/v1/capture_carbon", 400)
    assert server.captures == []


@pytest.mark.parametrize(
    "metadata",
    [
        {"gift": "x"},
        {"widgetID": "x"},
        {"k" * 41: "v"},
        {"k": "v" * 501},
        {f"k{i}": "v" for i in range(21)},
        {"n": 1},
    ],
)
def test_capture_validates_metadata(server: FakeOneClickImpact, metadata: dict[str, object]) -> None:
    with pytest.raises(OneClickImpactError):
        sdk(server).capture_carbon(amount=1, metadata=metadata)  # type: ignore[arg-type]
    assert server.requests[-1][2] == 400
    assert server.captures == []


@pytest.mark.parametrize("key", ["live_production_key", "nokeyprefix", "test_"])
def test_sandbox_server_checks_keys(server: FakeOneClickImpact, key: str) -> None:
    with pytest.raises(OneClickImpactError, match="API Key does not exist") as info:
        sdk(server, key).who_am_i()
    assert getattr(info.value.__context__, "error_type", None) == "key_error"
    assert server.requests[-1] == ("GET", "/v1/whoami", 401)
    response = raw(server, "GET", "/v1/whoami", key=key)
    assert response.status_code == 401
    assert response.json() == {"type": "key_error", "message": "API Key does not exist"}
    assert raw(server, "GET", "/v1/whoami", key="").status_code == 401


def test_production_server_and_explicit_key_list() -> None:
    with FakeOneClickImpact(environment="production") as prod:
        client = OneClickImpact(api_key="live_abc", environment=Environment.PRODUCTION)
        client.base_url = prod.url
        assert client.who_am_i().user_id.startswith("U")
        with pytest.raises(OneClickImpactError):
            sdk(prod, "test_abc").who_am_i()
    with FakeOneClickImpact(api_keys=["test_only_this"]) as strict:
        assert sdk(strict, "test_only_this").who_am_i().user_id
        with pytest.raises(OneClickImpactError, match="API Key does not exist"):
            sdk(strict, "test_another").capture_carbon(amount=1)
        strict.api_keys = {"test_only_this", "test_another"}  # a key can be enabled later
        assert sdk(strict, "test_another").capture_carbon(amount=1).carbon_captured == 1
    with pytest.raises(ValueError, match="sandbox"):
        FakeOneClickImpact(environment="staging")


def test_whoami_and_impact(server: FakeOneClickImpact) -> None:
    client = sdk(server)
    me = client.who_am_i()
    assert me.user_id.startswith("U") and "@" in me.email
    assert sdk(server, "test_other_user").who_am_i().user_id != me.user_id
    client.capture_carbon(amount=2)
    client.capture_carbon(amount=5)
    sdk(server, "test_other_user").capture_carbon(amount=100)
    impact = client.get_impact()
    assert impact.user_id == me.user_id
    assert impact.carbon_captured == 7
    assert impact.user_impact.carbon_captured == 7
    assert impact.tree_planted == 0


def test_records_have_metadata_and_only_the_carbon_key(server: FakeOneClickImpact) -> None:
    client = sdk(server)
    client.capture_carbon(amount=1, metadata={"carbonoffset_offset_id": "one"})
    client.capture_carbon(amount=2)
    body = raw(server, "GET", "/v1/records?filter_by=carbon_captured").json()
    first, second = body["user_records"]
    assert set(first) == {"user_id", "time_utc", "carbon_captured", "metadata"}
    assert set(second) == {"user_id", "time_utc", "carbon_captured"}
    assert "cursor" not in body
    # as the SDK sees them: carbon records, not misread as trees
    records = client.get_records(filter_by="carbon_captured").user_records
    assert all(isinstance(r, CarbonCapturedRecord) for r in records)
    assert [(r.carbon_captured, r.metadata) for r in records] == [
        (1, {"carbonoffset_offset_id": "one"}),
        (2, None),
    ]
    assert client.get_records(filter_by="tree_planted").user_records == []
    # records are per account
    assert sdk(server, "test_other_user").get_records().user_records == []


def test_records_page_with_a_cursor_through_the_sdk(server: FakeOneClickImpact) -> None:
    client = sdk(server)
    for i in range(25):
        client.capture_carbon(amount=i + 1, metadata={"i": str(i)})
    pages, cursor = [], None
    while True:
        page = client.get_records(filter_by="carbon_captured", cursor=cursor, limit=10)
        pages.append([int(r.metadata["i"]) for r in page.user_records])  # type: ignore[index]
        cursor = page.cursor
        if not cursor:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for p in pages for i in p] == list(range(25))
    # default page size is 10; descending order and date filters work
    assert len(client.get_records().user_records) == 10
    newest = client.get_records(sort_order="desc", limit=1).user_records[0]
    assert newest.carbon_captured == 25  # type: ignore[union-attr]
    today = dt.datetime.now(dt.timezone.utc).date()
    assert len(client.get_records(start_date=today.isoformat(), limit=1000).user_records) == 25
    tomorrow = (today + dt.timedelta(days=1)).isoformat()
    assert client.get_records(start_date=tomorrow).user_records == []
    yesterday = (today - dt.timedelta(days=1)).isoformat()
    assert client.get_records(end_date=yesterday).user_records == []


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "cursor=abc", "filter_by=bananas"])
def test_records_validate_the_query(server: FakeOneClickImpact, query: str) -> None:
    response = raw(server, "GET", f"/v1/records?{query}")
    assert response.status_code == 400
    assert response.json()["type"] == "invalid_request_error"


def test_cancel_impact_is_idempotent(server: FakeOneClickImpact) -> None:
    client = sdk(server)
    kept = client.capture_carbon(amount=4)
    gone = client.capture_carbon(amount=3)
    assert server.total_lb() == 7
    first = client.cancel_impact(user_id=gone.user_id, time_utc=gone.time_utc, reason="refund")
    assert (first.user_id, first.time_utc) == (gone.user_id, gone.time_utc)
    assert first.cancelled_on and first.message
    second = client.cancel_impact(user_id=gone.user_id, time_utc=gone.time_utc)
    assert second.cancelled_on == first.cancelled_on
    assert server.total_lb() == 4
    assert len(server.captures) == 2 and server.captures[1].cancelled_on is not None
    assert [r.time_utc for r in client.get_records().user_records] == [kept.time_utc]
    with pytest.raises(OneClickImpactError, match="No impact found"):
        client.cancel_impact(user_id=gone.user_id, time_utc="2000-01-01T00:00:00.000Z")
    with pytest.raises(OneClickImpactError):  # another account cannot cancel it
        sdk(server, "test_other_user").cancel_impact(user_id=kept.user_id, time_utc=kept.time_utc)
    assert server.total_lb() == 4


def test_unknown_endpoint(server: FakeOneClickImpact) -> None:
    response = raw(server, "GET", "/v1/plant_forest")
    assert response.status_code == 404
    assert response.json()["type"] == "invalid_request_error"


# ---------------------------------------------------------------- faults
def test_fault_status_does_not_act(server: FakeOneClickImpact) -> None:
    server.inject(Fault(status=500))
    with pytest.raises(OneClickImpactError) as info:
        sdk(server).capture_carbon(amount=1)
    assert getattr(info.value.__context__, "error_type", None) == "api_error"
    assert server.captures == []
    assert sdk(server).capture_carbon(amount=1).carbon_captured == 1  # applied once only


def test_fault_status_with_non_json_body(server: FakeOneClickImpact) -> None:
    server.inject(Fault(status=503, body="Service Unavailable", times=2))
    for _ in range(2):
        with pytest.raises(OneClickImpactError, match="1ClickImpact API Error"):
            sdk(server).capture_carbon(amount=1)
    assert server.captures == []
    assert [status for _, _, status in server.requests] == [503, 503]


def test_fault_status_with_json_body_without_type(server: FakeOneClickImpact) -> None:
    server.inject(Fault(status=429, body={"error": "slow down"}))
    with pytest.raises(OneClickImpactError, match="Request failed with status 429"):
        sdk(server).capture_carbon(amount=1)


def test_fault_drop_after_capture_acts_then_drops(server: FakeOneClickImpact) -> None:
    server.inject(Fault(drop_after_capture=True))
    with pytest.raises(OneClickImpactError, match="1ClickImpact API Error"):
        sdk(server).capture_carbon(amount=2, metadata={"carbonoffset_offset_id": "dropped"})
    assert server.total_lb() == 2
    (record,) = sdk(server).get_records().user_records
    assert record.metadata == {"carbonoffset_offset_id": "dropped"}


def test_fault_malformed_json_acts_then_garbles(server: FakeOneClickImpact) -> None:
    server.inject(Fault(malformed=True))
    with pytest.raises(OneClickImpactError, match="1ClickImpact API Error"):
        sdk(server).capture_carbon(amount=2)
    assert server.total_lb() == 2
    response = raw(server, "GET", "/v1/whoami")
    assert response.status_code == 200  # the fault was used up
    json.loads(response.text)


def test_fault_delay_and_endpoint_matching(server: FakeOneClickImpact) -> None:
    import time

    server.inject(Fault(endpoint="records", delay_s=0.3))
    server.inject(Fault(endpoint="*", status=500, times=1))
    client = sdk(server)
    with pytest.raises(OneClickImpactError):
        client.who_am_i()  # the "*" fault; the records fault waits for its endpoint
    started = time.monotonic()
    client.get_records()
    assert time.monotonic() - started >= 0.3
    server.inject(Fault(status=500, times=5))
    server.clear_faults()
    assert client.capture_carbon(amount=1).carbon_captured == 1
    server.delay_s = 0.2
    started = time.monotonic()
    client.who_am_i()
    assert time.monotonic() - started >= 0.2


def test_stop_refuses_connections_and_url_needs_a_running_server() -> None:
    fake = FakeOneClickImpact().start()
    url = fake.url
    fake.stop()
    fake.stop()  # idempotent
    client = OneClickImpact(api_key=KEY, environment=Environment.SANDBOX)
    client.base_url = url
    with pytest.raises(OneClickImpactError, match="1ClickImpact API Error"):
        client.who_am_i()
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.url


def test_stop_ends_serving_at_once_and_leaves_only_the_real_requests() -> None:
    """stop() wakes the serving loop itself (it polls once a second): it returns well before a
    poll would, records no request of its own, and the port is closed afterwards."""
    server = FakeOneClickImpact().start()
    sdk(server).capture_carbon(amount=1)
    url = server.url
    started = time.perf_counter()
    server.stop()
    assert time.perf_counter() - started < 0.5
    assert server.requests == [("POST", "/v1/capture_carbon", 200)]
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/v1/records", timeout=2)
