"""What reaches the upstream's headers (upstream/headers.py) and how it is configured
(settings.py: ATLAS_STRIP_HEADERS, ATLAS_INFERENCE_OBJECTIVES, ATLAS_STAMP_FAIRNESS_ID)."""

from __future__ import annotations

import pytest

from atlas_gateway.settings import Settings, SettingsError
from atlas_gateway.upstream.headers import FAIRNESS_HEADERS, OBJECTIVE_HEADERS, UpstreamHeaders
from tests.fixtures.steering import STEERING

KEPT = {
    "openai-beta": "assistants=v2",
    "x-stainless-lang": "python",
    "user-agent": "OpenAI/Python",
    "x-session-id": "s-1",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


def test_no_steering_identity_or_hop_header_of_a_client_reaches_the_upstream():
    headers = UpstreamHeaders().stamp({**STEERING, **KEPT}, "req-1")
    assert headers == {**KEPT, "x-request-id": "req-1"}


def test_atlas_stamps_the_objective_of_the_effective_priority_and_the_fairness_id_under_both_names():
    rules = UpstreamHeaders("Bearer up", objectives={"Critical": "chat-critical", "Sheddable": "batch"}, fairness=True)
    headers = rules.stamp(dict(STEERING), "req-2", "Sheddable", "search/team-search")
    for name in OBJECTIVE_HEADERS:
        assert headers[name] == "batch"  # the client's objective is gone
    for name in FAIRNESS_HEADERS:
        assert headers[name] == "search/team-search"
    assert headers["authorization"] == "Bearer up"
    assert "x-gateway-model-name-rewrite" not in headers and "x-envoy-retry-on" not in headers
    # a class without an objective gets none (the endpoint picker's default), not the client's
    standard = rules.stamp({"x-llm-d-inference-objective": "critical"}, "req-3", "Standard", "search/k")
    assert not set(OBJECTIVE_HEADERS) & set(standard)


def test_without_configuration_nothing_is_stamped():
    headers = UpstreamHeaders().stamp({}, "req-4", "Critical", "search/team-search")
    assert headers == {"x-request-id": "req-4"}


def test_configured_names_and_prefixes_are_stripped_too():
    rules = UpstreamHeaders(strip_names=("x-user-id",), strip_prefixes=("x-internal-",))
    headers = rules.stamp({"x-user-id": "1", "x-internal-tenant": "a", "x-internal": "kept", "x-user": "kept"})
    assert headers == {"x-internal": "kept", "x-user": "kept"}


def env(**values: str) -> dict[str, str]:
    return {"ATLAS_UPSTREAM_URL": "http://127.0.0.1:9", **values}


def test_settings_read_the_inference_gateway_configuration():
    settings = Settings.from_env(
        env(
            ATLAS_STRIP_HEADERS="X-User-Id, x-internal-*  x-team",
            ATLAS_INFERENCE_OBJECTIVES='{"Critical": "chat-critical", "Sheddable": "batch.v2"}',
            ATLAS_STAMP_FAIRNESS_ID="true",
        )
    )
    assert settings.strip_headers == ("x-user-id", "x-team")
    assert settings.strip_header_prefixes == ("x-internal-",)
    assert settings.inference_objectives == {"Critical": "chat-critical", "Sheddable": "batch.v2"}
    assert settings.stamp_fairness_id is True
    rules = UpstreamHeaders.from_settings(settings)
    assert rules.stamp({"x-internal-a": "1", "x-team": "t"}, None, "Critical", "ns/q") == {
        **dict.fromkeys(OBJECTIVE_HEADERS, "chat-critical"),
        **dict.fromkeys(FAIRNESS_HEADERS, "ns/q"),
    }
    default = Settings.from_env(env())
    assert (
        default.strip_headers,
        default.strip_header_prefixes,
        default.inference_objectives,
        default.stamp_fairness_id,
    ) == ((), (), {}, False)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("ATLAS_STRIP_HEADERS", "x-ok, bad header:", "'header:'"),
        ("ATLAS_STRIP_HEADERS", "*", "'*'"),
        ("ATLAS_INFERENCE_OBJECTIVES", "critical", "JSON object"),
        ("ATLAS_INFERENCE_OBJECTIVES", '{"Urgent": "x"}', "'Urgent' is not a priority class"),
        ("ATLAS_INFERENCE_OBJECTIVES", '{"Critical": "Not A Name"}', "objective of Critical"),
        ("ATLAS_INFERENCE_OBJECTIVES", '{"Critical": 3}', "objective of Critical"),
        ("ATLAS_STAMP_FAIRNESS_ID", "sometimes", "ATLAS_STAMP_FAIRNESS_ID"),
    ],
)
def test_a_wrong_inference_gateway_setting_is_refused_naming_it(name, value, says):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(env(**{name: value}))
    assert says in str(exc.value)
