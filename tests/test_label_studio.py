"""The embedded Label Studio: healthy, token auth works, anonymous API use is refused."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest


def test_health_endpoint(stack_project):
    with urllib.request.urlopen(stack_project.label_studio_url + "/health", timeout=10) as resp:
        assert resp.status == 200 and b"UP" in resp.read()


def test_authenticated_api_call_with_generated_token(stack_project):
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=stack_project.label_studio_url, api_key=stack_project.credentials.ls_api_key)
    assert client.users.whoami().email == stack_project.credentials.ls_username
    project = client.projects.create(title="foundation-smoke", label_config=(
        '<View><Image name="image" value="$image"/>'
        '<Choices name="aligned" toName="image"><Choice value="good"/><Choice value="bad"/></Choices></View>'))
    try:
        assert any(p.id == project.id for p in client.projects.list())
    finally:
        client.projects.delete(id=project.id)


def test_anonymous_api_call_is_refused(stack_project):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stack_project.label_studio_url + "/api/projects", timeout=10)
    assert refused.value.code in (401, 403)
