"""Prompts, few-shot selection, label distributions and backend settings: pure code, no model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import ValidationError

from services.common.fewshot import Demonstration, FewShotSet, select_demonstrations
from services.common.projects import LabelSpec, ProjectSpec
from services.inference.distributions import FLOOR_LOGPROB, mean_logprob, normalise
from services.inference.prompts import LabelPrompt, generation_messages, render
from services.inference.settings import InferenceSettings

PROJECT = ProjectSpec(
    project_id="p",
    name="P",
    labels=(LabelSpec("billing", "Invoices and refunds."), LabelSpec("outage", "The service is down.")),
    instructions="Route the support ticket.",
    target_accuracy=0.9,
    audit_rate=0.0,
)


def test_the_shared_prefix_comes_first_and_is_identical_for_every_item() -> None:
    prompt = LabelPrompt.build(PROJECT, [Demonstration("d", "refund please", "billing")])
    a, _ = render(prompt.messages("first ticket"), None)
    b, sep = render(prompt.messages("another ticket"), None)
    shared = a[: a.index("first ticket")]
    assert b.startswith(shared) and "Route the support ticket." in shared and "refund please" in shared
    assert a.endswith("Text: first ticket\nLabel:") and sep == " "


def test_prompt_hash_follows_instructions_labels_and_demos() -> None:
    base = LabelPrompt.build(PROJECT).prompt_hash
    assert LabelPrompt.build(PROJECT).prompt_hash == base
    assert LabelPrompt.build(dataclasses.replace(PROJECT, instructions="x")).prompt_hash != base
    assert LabelPrompt.build(PROJECT, [Demonstration("d", "t", "outage")]).prompt_hash != base
    # A demonstration of a label the project does not have is left out, hash included.
    assert LabelPrompt.build(PROJECT, [Demonstration("d", "t", "gone")]).prompt_hash == base


def test_generation_prompt_names_the_label_and_refuses_unknown_ones() -> None:
    text = generation_messages(PROJECT, "outage")[0]["content"]
    assert "'outage'" in text and "The service is down." in text
    with pytest.raises(ValueError):
        generation_messages(PROJECT, "nope")


def test_demonstrations_are_balanced_deterministic_and_bounded() -> None:
    texts = [f"billing text {i}" for i in range(10)] + [f"outage text {i}" for i in range(3)] + ["x" * 500]
    labels = ["billing"] * 10 + ["outage"] * 3 + ["outage"]
    ids = [f"i{i}" for i in range(len(texts))]
    picked = select_demonstrations(texts, labels, per_label=2, max_chars=400, item_ids=ids)
    assert [d.label for d in picked] == ["billing", "outage", "billing", "outage"]
    assert all(len(d.text) <= 100 for d in picked)
    # Input order does not matter.
    again = select_demonstrations(texts[::-1], labels[::-1], per_label=2, max_chars=400, item_ids=ids[::-1])
    assert again == picked
    assert select_demonstrations([], [], per_label=2, max_chars=100) == []


def test_fewshot_set_round_trips_through_protobuf() -> None:
    s = FewShotSet("p", 3, (Demonstration("i1", "t", "billing"),))
    assert FewShotSet.from_proto(s.to_proto()) == s


def test_distributions_are_always_valid() -> None:
    for scores in ([-1.0, -2.0], [float("nan"), -3.0], [None, None], [float("-inf"), 0.0], [-1e9, -1e9]):
        p = normalise(scores)
        assert np.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6
    assert normalise([-0.1, -5.0]).argmax() == 0
    assert mean_logprob([-1.0, -3.0]) == -2.0 and mean_logprob([]) == FLOOR_LOGPROB


def test_llm_backends_need_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_INFERENCE_BACKEND", "vllm")
    with pytest.raises(ValidationError):
        InferenceSettings()
    monkeypatch.setenv("TANDEM_INFERENCE_MODEL", "/models/m")
    monkeypatch.setenv("TANDEM_INFERENCE_GPU_MEMORY_UTILIZATION", "0.85")
    monkeypatch.setenv("TANDEM_INFERENCE_MAX_CONCURRENCY", "128")
    s = InferenceSettings()
    assert (s.backend, s.model, s.gpu_memory_utilization, s.max_concurrency) == (
        "vllm",
        "/models/m",
        0.85,
        128,
    )
    monkeypatch.setenv("TANDEM_INFERENCE_BACKEND", "openai")
    with pytest.raises(ValidationError):
        InferenceSettings()


def test_the_encoder_is_chosen_by_name_and_the_old_embedder_name_still_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (InferenceSettings().encoder, InferenceSettings().embedder) == ("minilm", "sentence")
    monkeypatch.setenv("TANDEM_INFERENCE_ENCODER", "mpnet")
    monkeypatch.setenv("TANDEM_INFERENCE_EMBEDDER", "minilm")
    s = InferenceSettings()
    assert (s.encoder, s.embedder) == ("mpnet", "sentence")
    monkeypatch.setenv("TANDEM_INFERENCE_ENCODER", "bert")
    with pytest.raises(ValidationError):
        InferenceSettings()
