import threading

import pytest
import torch

from mobiquant import quantized_linears
from mobiquant.route import attach_thresholds_


@pytest.fixture
def routed_llama(tiny_llama, routed_model):
    routed_model(tiny_llama)
    attach_thresholds_(tiny_llama, "layer", "band")
    return tiny_llama


def _own_scores(linear, x):
    with torch.no_grad():
        return linear.router(x).reshape(-1)


def test_siblings_share_one_group_per_block(routed_llama):
    q = quantized_linears(routed_llama)
    for i in range(2):
        p = f"model.layers.{i}."
        attn, mlp = q[p + "self_attn.q_proj"].shared_input, q[p + "mlp.gate_proj"].shared_input
        assert attn is not None and mlp is not None and attn is not mlp
        assert q[p + "self_attn.k_proj"].shared_input is attn and q[p + "self_attn.v_proj"].shared_input is attn
        assert q[p + "mlp.up_proj"].shared_input is mlp
        assert q[p + "self_attn.o_proj"].shared_input is None and q[p + "mlp.down_proj"].shared_input is None
    assert q["model.layers.0.self_attn.q_proj"].shared_input is not q["model.layers.1.self_attn.q_proj"].shared_input


def test_shared_scores_equal_each_router_and_follow_the_input(routed_llama):
    q = quantized_linears(routed_llama)
    members = [q[f"model.layers.1.self_attn.{n}_proj"] for n in "qkv"]
    group = members[0].shared_input
    x = torch.randn(1, 1, 64) * 3
    for m in members:
        torch.testing.assert_close(torch.tensor(group.scores(m, x)), _own_scores(m, x), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(1, 1, 64)  # another tensor: scored afresh
    torch.testing.assert_close(torch.tensor(group.scores(members[2], x2)), _own_scores(members[2], x2),
                               rtol=1e-5, atol=1e-5)
    x2.mul_(-2)  # the same tensor changed in place: scored afresh
    torch.testing.assert_close(torch.tensor(group.scores(members[1], x2)), _own_scores(members[1], x2),
                               rtol=1e-5, atol=1e-5)


def test_a_router_changed_in_place_reaches_the_group(routed_llama):
    m = quantized_linears(routed_llama)["model.layers.0.mlp.up_proj"]
    x = torch.randn(1, 1, 64)
    before = torch.tensor(m.shared_input.scores(m, x))
    with torch.no_grad():
        m.router.fc2.bias.add_(1.0)
        m.router.input_scale.mul_(2.0)
    after = torch.tensor(m.shared_input.scores(m, x.clone()))
    torch.testing.assert_close(after, _own_scores(m, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_threads_scoring_their_own_inputs_get_their_own_scores(routed_llama):
    q = quantized_linears(routed_llama)
    members = [q[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv"]
    group = members[0].shared_input
    inputs = [torch.randn(1, 1, 64) for _ in range(2)]
    expected = [[_own_scores(m, x) for m in members] for x in inputs]
    errors = []

    def work(t):
        for _ in range(300):
            for j, m in enumerate(members):
                got = torch.tensor(group.scores(m, inputs[t]))
                if not torch.allclose(got, expected[t][j], rtol=1e-5, atol=1e-5):
                    errors.append((t, j))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
