import threading

import pytest
from word_tokenizer import WordTokenizer

from mobiquant import MoBiQuantError
from mobiquant.generate import BudgetControl, budget_range, elastic_generate


@pytest.fixture
def model(tiny_llama, routed_model):
    tiny_llama.config.eos_token_id = None  # no early stop: every test generates the tokens it asks for
    return routed_model(tiny_llama)


def test_steps_carry_a_trace(model):
    steps = list(elastic_generate(model, WordTokenizer(), "w1 w2 w3", BudgetControl(4.0), max_new_tokens=6))
    assert len(steps) == 6 and [s.index for s in steps] == list(range(6))
    for s in steps:
        assert s.slices.shape == (2, 7) and s.slices.min() >= 1 and 2 <= s.bits <= 8
        assert s.text.strip().startswith("w") and 0 < s.prob <= 1 and len(s.top) == 5
    assert budget_range(model) == (2.0, 8.0)


def test_budget_changes_between_two_decode_steps(model):
    control = BudgetControl(2.0)
    seen = []
    for step in elastic_generate(model, WordTokenizer(), "w5 w6", control, max_new_tokens=8):
        seen.append((step.budget, step.slices.float().mean().item()))
        if step.index == 3:
            control.budget = 8.0  # the next token runs at the new budget
    assert [b for b, _ in seen] == [2.0] * 4 + [8.0] * 4
    assert all(m == 1.0 for _, m in seen[:4]) and all(m == 4.0 for _, m in seen[4:])


def test_uniform_mode_and_stop(model):
    control = BudgetControl(5.0, mode="uniform")
    steps = []
    for s in elastic_generate(model, WordTokenizer(), "w1", control, max_new_tokens=10):
        steps.append(s)
        if s.index == 2:
            control.stop = True
    assert len(steps) == 3 and all(s.bits == 4.0 and (s.slices == 2).all() for s in steps)


def test_two_threads_two_budgets_own_traces(model):
    results = {}

    def run(budget):
        ctl = BudgetControl(budget)
        results[budget] = [s.bits for s in elastic_generate(model, WordTokenizer(), "w1 w2", ctl, max_new_tokens=12)]

    threads = [threading.Thread(target=run, args=(b,)) for b in (2.0, 8.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[2.0] == [2.0] * 12 and results[8.0] == [8.0] * 12


def test_seeded_sampling_is_reproducible(model):
    run = lambda: [s.token_id for s in elastic_generate(model, WordTokenizer(), "w1 w2", BudgetControl(4.0),
                                                       max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)]
    assert run() == run()


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"budget": float("nan")}, "positive finite"),
    ({"budget": -2.0}, "positive finite"),
    ({"budget": 9.0}, "outside this model's range"),
    ({"budget": 1e9}, "outside this model's range"),
    ({"max_new_tokens": 0}, "positive integer"),
    ({"prompt": " ".join(["w1"] * 200)}, "at most"),
    ({"mode": "bogus"}, "unknown mode"),
])
def test_bad_input(model, kwargs, message):
    ctl = BudgetControl(kwargs.get("budget", 4.0), mode=kwargs.get("mode", "router"))
    with pytest.raises(MoBiQuantError, match=message):
        next(elastic_generate(model, WordTokenizer(), kwargs.get("prompt", "w1"), ctl,
                              max_new_tokens=kwargs.get("max_new_tokens", 4)))
