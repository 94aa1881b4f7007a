"""The coordinator's model label is bounded whatever names clients send."""

from __future__ import annotations

from coordinator.metrics import MAX_MODEL_LABELS, Metrics


def test_unknown_models_fold_into_one_label_and_distinct_names_are_capped() -> None:
    metrics = Metrics()
    for i in range(3000):
        metrics.refused(404, f"nope-{i}", "model_not_found")
    for i in range(MAX_MODEL_LABELS + 100):
        metrics.observe(status=200, model=f"m{i}", route="node", endpoint="chat/completions",
                        seconds=0.1, prompt_tokens=1)
    text = metrics.render().decode()
    assert "nope-" not in text
    assert 'model="_unknown"' in text
    models = {line.split('model="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("meshgate_coordinator_requests_total")}
    assert len(models) == MAX_MODEL_LABELS + 2  # the names kept, _unknown and _other
    assert "_other" in models
