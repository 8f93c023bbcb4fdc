"""Labeling configs are accepted by the real Label Studio; results are validated strictly."""

from __future__ import annotations

import pytest

from components.annotation.labeling import InvalidResult, ParsedResult, label_config, make_result, parse_result


@pytest.mark.parametrize("kind, k", [("binary", 2), ("pairwise", 2), ("best_of_k", 3), ("best_of_k", 4)])
def test_configs_create_real_label_studio_projects(stack_project, kind, k):
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=stack_project.label_studio_url, api_key=stack_project.credentials.ls_api_key)
    project = client.projects.create(title=f"config-{kind}-{k}", label_config=label_config(kind, k))
    try:
        stored = client.projects.get(id=project.id).label_config
        assert 'name="choice"' in stored and 'name="critique"' in stored
        if kind != "binary":
            assert stored.count('<View style="flex: 1">') == (2 if kind == "pairwise" else k)
    finally:
        client.projects.delete(id=project.id)


def test_round_trip_of_choices_and_critiques():
    result = make_result("pairwise", "tie", "both show three circles")
    assert parse_result("pairwise", result) == ParsedResult("tie", "both show three circles")
    assert parse_result("binary", make_result("binary", "bad")).critique == ""
    assert parse_result("best_of_k", make_result("best_of_k", "image 3", k=3), k=3).choice == "image 3"


@pytest.mark.parametrize(
    "kind, result, reason",
    [
        ("binary", [{"from_name": "choice", "type": "choices", "value": {"choices": ["maybe"]}}], "unknown choice 'maybe'"),
        ("pairwise", [{"from_name": "critique", "type": "textarea", "value": {"text": ["hm"]}}], "missing the required choice"),
        ("pairwise", [{"from_name": "choice", "type": "choices", "value": {"choices": ["left", "right"]}}], "exactly one"),
        ("binary", [{"from_name": "rating", "type": "rating", "value": {"rating": 3}}], "unexpected region 'rating'"),
        ("binary", {"choices": ["good"]}, "must be a list"),
        ("binary", [{"from_name": "choice", "type": "choices"}], "no value object"),
        ("best_of_k", [{"from_name": "choice", "type": "choices", "value": {"choices": ["image 4"]}}], "unknown choice 'image 4'"),
    ],
)
def test_malformed_results_are_rejected_with_a_reason(kind, result, reason):
    with pytest.raises(InvalidResult, match=reason):
        parse_result(kind, result, k=3)
