"""o_proj's router partials from the attention's epilogue against the router launch's, element by element (GPU).

`router.route_attention` stores, per head, the same fc1 partial that `route_partials(o, chunk_k=Dh)` stores, from the
same code (`decode_step.fc1_tile`, `fc1_partial`) on tiles of the same layout. On the H100 most of them differ in the
last bit (KERNEL_NOTES.md, "Seventeenth session" and "Eighteenth session"). This prints, for two shapes, how many
differ, by how much, how far each is from the float64 sum, and whether either equals torch's fp32 sum of the same
products, and writes the table to $OUT/attention_partials_diag_h100.json.

    OUT=/tmp PYTHONPATH=<package> python3 -P benchmarks/experiments/attention_partials_diag.py
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parents[2] / "tests" / "kernels"))
from mobiquant.kernels import router as rk  # noqa: E402
from test_router_fused import attention_case, flags, router_stack  # noqa: E402


def main():
    g = torch.Generator().manual_seed(3)
    res = dict(info=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")), rows=[])
    for H, KV, DH, S, pos, hidden in ((4, 2, 128, 160, 130, 16), (32, 8, 128, 1024, 700, 16)):
        q, kc, vc, p = attention_case(H, KV, DH, S, pos, g)
        K = H * DH
        o_ref = rk.decode_attention(q, kc, vc, p, 0, DH ** -0.5)
        rt = router_stack(1, hidden, K, 4, g)
        tau = torch.zeros(1, device="cuda")
        fl = flags(1, 4, g, given_p=0.0)
        plan = rk.route_attention(q, kc, vc, p, 0, DH ** -0.5, *rt, tau, *fl)
        shape = (plan.meta["SPLIT"], plan.meta["HP"])
        n = shape[0] * shape[1]
        got = plan.ws[:n].clone().view(shape)[:, :hidden]
        ref = rk.route_partials(o_ref, *rt, tau, *fl, chunk_k=DH).ws[:n].clone().view(shape)[:, :hidden]
        s, w1 = rt[0][0], rt[1][0]
        exact = (w1.double() * (o_ref.double().reshape(-1) / s.double())[None, :]).reshape(hidden, H, DH).sum(-1).t()
        prod = (w1 * (o_ref.float().reshape(-1) / s)[None, :]).reshape(hidden, H, DH)
        row = dict(heads=H, kv_heads=KV, head_dim=DH, pos=pos, hidden=hidden, x_equal=bool(torch.equal(plan.x, o_ref)),
                   partials=got.numel(), differ=int((got != ref).sum()), max_abs_diff=(got - ref).abs().max().item(),
                   max_err_attention=(got.double() - exact).abs().max().item(),
                   max_err_router=(ref.double() - exact).abs().max().item(),
                   torch_fp32_sum_equals_attention=bool(torch.equal(prod.sum(-1).t(), got)),
                   torch_fp32_sum_equals_router=bool(torch.equal(prod.sum(-1).t(), ref)))
        res["rows"].append(row)
        print(row)
    out = Path(os.environ.get("OUT", "/tmp")) / "attention_partials_diag_h100.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
