"""Property-based requests from the app's own OpenAPI schema: no 5xx, ever.

Schemathesis generates valid and invalid requests for every documented
operation and sends them in-process over ASGI to the app with the fake model;
any 5xx fails. Examples are bounded and derandomized, so a run is repeatable.
"""

from __future__ import annotations

import os

# MLflow's usage telemetry would call out of the machine; tests stay local.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
)

from serving.app import create_app  # noqa: E402
from serving.config import ServingSettings  # noqa: E402
from tests.fakes import FakeMlflowClient, FakeSource, reporter_factory  # noqa: E402

TOKEN = "fuzzing-admin-token-0123456789"
EXAMPLES_PER_OPERATION = 60


def fuzzed_app():
    """An app that follows a fake registry and reports to a fake MLflow."""
    mlflow_client = FakeMlflowClient()
    settings_ = ServingSettings(
        tracking_uri="fake://tracking",
        report_interval_s=3600,
        admin_token=TOKEN,
        max_k=20,
        max_history=10,
        max_batch=8,
    )

    reporter = reporter_factory(mlflow_client)

    return create_app(settings_, reporter_factory=reporter, source=FakeSource())


# Loaded at import, not through schemathesis.pytest.from_fixture: that path
# reads pytest's private Function._nodeid, which pytest 9 no longer has. The
# plugin ends the app's lifespan after each test and restarts it on demand.
schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_generated_requests_never_get_a_server_error(case):
    # With the token, the admin reload runs too instead of stopping at 401.
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[
            not_a_server_error,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
