import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

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
def session_fake_stripe():
    """The stateful fake Stripe the session cluster's worker talks to (a
    handler may ask Stripe for an object; tests never reach the internet)."""
    from fake_stripe import FakeStripe
    fake = FakeStripe(seed=1)
    fake.base = fake.serve()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def pg(session_fake_stripe):
    """A cluster configured like a development deployment with test keys."""
    cluster = Cluster("main", env=TEST_KEYS,
                      conf={"qes_billing.stripe_api_base": f"'{session_fake_stripe.base}'"}).start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    yield cluster
    amcheck_and_stop(cluster)


@pytest.fixture(scope="module")
def pg_nokeys():
    """A cluster with none of the seed's variables set."""
    cluster = Cluster("nokeys").start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    yield cluster
    amcheck_and_stop(cluster)


def amcheck_and_stop(cluster):
    """The last step on a cluster: every billing index passes amcheck
    (bt_index_check with heapallindexed), else the run fails (an error at
    teardown makes pytest exit non-zero).  The cluster is stopped either way.
    Cluster.stop() fails a cluster that was stopped without this."""
    cluster.amchecked = True
    try:
        checked, failures, skipped = cluster.amcheck()
    finally:
        cluster.stop()
    for index in skipped:
        print(f"amcheck {cluster.name}: skipped {index} (not valid or not ready)")
    assert checked > 0, f"amcheck {cluster.name}: no billing index found"
    assert not failures, f"amcheck {cluster.name}: " + "; ".join(failures)


@pytest.fixture
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    yield client
    client.close()


def tenant_claims(tenant_id, sub="user@tenant"):
    return {"role": "qes_tenant", "tenant_id": tenant_id, "sub": sub}


ADMIN = {"role": "qes_admin", "sub": "ops@qes.example"}


def _stripe_mock_binary():
    for cand in (os.environ.get("QES_STRIPE_MOCK"),
                 os.path.expanduser("~/.cache/qes_billing/bin/stripe-mock"),
                 shutil.which("stripe-mock")):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.fail("stripe-mock is not installed: run test/tools/deps.sh")


@pytest.fixture(scope="session")
def stripe_mock():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([_stripe_mock_binary(), "-http-port", str(port), "-https-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            fixture_get(base, "customers/cus_1")
            break
        except Exception:
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(10)


def fixture_get(base, path):
    req = urllib.request.Request(f"{base}/v1/{path}", headers={"Authorization": "Bearer sk_test_123"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


