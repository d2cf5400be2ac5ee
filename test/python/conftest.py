import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pgcluster import Cluster  # noqa: E402
from postgrest import PostgREST  # noqa: E402

TEST_KEYS = {
    "QES_ENVIRONMENT": "development",
    "QES_BASE_URL": "https://sign.example.test",
    "STRIPE_TEST_SECRET_KEY": "sk_test_51PytestSecretKeyNeverShown",
    "STRIPE_TEST_PUBLISHABLE_KEY": "pk_test_51PytestPublishable",
    "STRIPE_TEST_WEBHOOK_SECRET": "whsec_pytest_signing_secret",
}


@pytest.fixture(scope="session")
def pg():
    """A cluster configured like a development deployment with test keys."""
    cluster = Cluster("main", env=TEST_KEYS).start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def pg_nokeys():
    """A cluster with none of the seed's variables set."""
    cluster = Cluster("nokeys").start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    yield cluster
    cluster.stop()


@pytest.fixture
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    yield client
    client.close()


def tenant_claims(tenant_id, sub="user@tenant"):
    return {"role": "qes_tenant", "tenant_id": tenant_id, "sub": sub}


ADMIN = {"role": "qes_admin", "sub": "ops@qes.example"}
