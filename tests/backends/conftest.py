"""The back-ends work whatever grant-table version the guest chose: every
back-end test runs against a v1 and a v2 table."""
import pytest

import fakefront


@pytest.fixture(autouse=True, params=[1, 2], ids=["gnttab_v1", "gnttab_v2"])
def grant_version(request, monkeypatch):
    monkeypatch.setattr(fakefront, "GRANT_VERSION", request.param)
    return request.param
