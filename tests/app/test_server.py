"""gradio_client against a launched `mobiquant app` (tests/app/conftest.py): generation, a budget change in the
middle of a generation, two concurrent sessions, and bad input that must fail clearly while the server keeps going."""

from __future__ import annotations

import json
import time

import pytest
import requests

pytestmark = pytest.mark.model

LONG = "Count from 1 to 200, separated by commas."


def gen_args(prompt=LONG, budget=2.0, max_new=24, mode="uniform", sampling=False, seed=0):
    return (prompt, budget, max_new, sampling, 0.8, 0.95, seed, mode, "all layers", "all")


def final_trace(job) -> list[dict]:
    return job.outputs()[-1][4]


def test_generate_streams_tokens_trace_and_metrics(client):
    job = client.submit(*gen_args(budget=5.0, mode="router", max_new=12), api_name="/generate")
    job.result()
    outputs = job.outputs()
    assert len(outputs) >= 2  # streamed: one update per token plus the final one
    text, heatmap, metrics, series, trace = outputs[-1]
    assert 1 <= len(trace) <= 12
    assert text.count('class="mq-tok') == len(trace)
    assert 'data-state="done"' in metrics and "tokens / s" in metrics and "process RSS" in metrics
    assert all(1 <= r["slices"] <= 4 and 2 <= r["bits"] <= 8 for r in trace)
    assert abs(sum(r["bits"] for r in trace) / len(trace) - 5.0) < 1.0  # routed around the budget
    assert heatmap is not None and series is not None


def test_budget_change_mid_generation_changes_later_tokens(client):
    job = client.submit(*gen_args(budget=2.0, max_new=48), api_name="/generate")
    deadline = time.time() + 120
    while len(job.outputs()) < 6 and not job.done() and time.time() < deadline:
        time.sleep(0.05)
    assert not job.done(), "the generation ended before the budget could be changed"
    client.predict(8.0, api_name="/set_budget")
    job.result()
    trace = final_trace(job)
    budgets = [r["budget"] for r in trace]
    switch = budgets.index(8.0)
    assert 0 < switch < len(trace) - 1
    assert all(b == 2.0 for b in budgets[:switch]) and all(b == 8.0 for b in budgets[switch:])
    assert all(r["slices"] == 1 for r in trace[:switch])  # uniform at 2 bits: the base slice only
    assert all(r["slices"] == 4 for r in trace[switch:])  # then every slice
    assert '⇢ 8 b' in job.outputs()[-1][0]  # the switch point is marked in the text


def test_two_concurrent_sessions_keep_their_own_budgets(app_server):
    from gradio_client import Client

    a, b = Client(app_server, verbose=False), Client(app_server, verbose=False)
    try:
        ja = a.submit(*gen_args(budget=2.0, max_new=20), api_name="/generate")
        jb = b.submit(*gen_args(budget=8.0, max_new=20), api_name="/generate")
        time.sleep(1.0)
        a.predict(2.0, api_name="/set_budget")  # a's setter must not touch b's generation
        ta, tb = (json.loads(json.dumps(j.result()[4])) for j in (ja, jb))
    finally:
        a.close()
        b.close()
    assert {r["slices"] for r in ta} == {1} and {r["budget"] for r in ta} == {2.0}
    assert {r["slices"] for r in tb} == {4} and {r["budget"] for r in tb} == {8.0}


@pytest.mark.parametrize("args, message", [
    (gen_args(prompt=""), "empty"),
    (gen_args(prompt="   \n"), "empty"),
    (gen_args(prompt="x" * 5000), "limit is 4,000"),
    (gen_args(budget=-1.0), "minimum"),
    (gen_args(budget=1e9), "maximum"),
    (gen_args(max_new=10**6), "maximum"),
    (gen_args(mode="fastest"), "fastest"),
])
def test_bad_generate_input_gives_a_clear_error_and_the_server_stays_up(client, args, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")
    assert len(client.predict(*gen_args(max_new=2), api_name="/generate")[4]) >= 1  # still serving


@pytest.mark.parametrize("value", ["NaN", "Infinity", '"3 bits"'])
def test_malformed_budget_over_raw_http_is_rejected(app_server, value):
    """What a hand-written client can send that gradio_client cannot: non-finite and non-numeric budgets."""
    base = app_server.rstrip("/") + "/gradio_api/call"
    body = f'{{"data": ["hi", {value}, 4, false, 0.8, 0.95, 0, "uniform", "all layers", "all"]}}'
    r = requests.post(f"{base}/generate", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    if r.status_code == 200:  # accepted into the queue: the stream must end with an error event
        stream = requests.get(f"{base}/generate/{r.json()['event_id']}", timeout=60).text
        assert "event: error" in stream, stream[:500]
    else:
        assert 400 <= r.status_code < 500
    for _ in range(3):  # and the server answers the next request
        r = requests.post(f"{base}/set_budget", json={"data": [4.0]}, timeout=30)
        assert r.status_code == 200


def test_set_budget_rejects_out_of_range_values(client):
    from gradio_client.exceptions import AppError

    for bad in (-3.0, 100.0):
        with pytest.raises(AppError):
            client.predict(bad, api_name="/set_budget")
    client.predict(3.0, api_name="/set_budget")


def test_stop_ends_a_running_generation(client):
    job = client.submit(*gen_args(max_new=200), api_name="/generate")
    while len(job.outputs()) < 3 and not job.done():
        time.sleep(0.05)
    client.predict(api_name="/stop")
    trace = job.result()[4]
    assert len(trace) < 200
    assert 'data-state="stopped"' in job.outputs()[-1][2]


def test_outliers_and_compare(client):
    summary, fig, jac = client.predict(
        "The first transistor was built in 1947. By 2020, a chip held fifty billion of them; quantization stores "
        "each weight with fewer bits, and outlier tokens decide the error.", "model.layers.1.self_attn.q_proj", 4.0,
        api_name="/outliers")
    assert "Lowest overlap" in summary and fig is not None and jac is not None
    summary, a, b = client.predict(LONG, 2.0, 8.0, 12, 0, False, api_name="/compare")
    assert 'data-testid="mq-compare-summary"' in summary
    assert a.count('class="mq-tok') >= 1 and b.count('class="mq-tok') >= 1
