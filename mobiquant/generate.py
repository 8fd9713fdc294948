"""Step 5 of the data flow: elastic generation, one token at a time, with a routing trace per token.

    control = mobiquant.BudgetControl(budget=4.0)           # owned by the caller (the app's session state)
    for step in mobiquant.elastic_generate(model, tok, "Tell me about owls.", control, max_new_tokens=64):
        print(step.text, step.bits, step.slices.shape)       # (layers, linears) slice counts of this token
        control.budget = 3.0                                 # takes effect from the next token

The budget is read from ``control`` before every step, so a caller can steer a running generation (a slider) or stop
it (``control.stop = True``). Each step runs inside ``precision(...)``: nothing is stored in the model, so several
generations (threads, app sessions) can share one model at different budgets.

On CUDA, a LLaMA-family model runs on the decode engine (engine.py: static KV cache, CUDA graph, routing on the
device) with the same TokenSteps; it serves one generation at a time (a concurrent one takes the path below) and
uses the layer thresholds where the model's table is adaptive.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .api import quantized_linears
from .errors import MoBiQuantError
from .precision import check_budget, precision
from .trace import RoutingTrace

MODES = ("router", "uniform", "random")


@dataclass
class BudgetControl:
    """Caller-owned knobs read before each decode step. mode: "router" (routers pick k per token and layer),
    "uniform" (every token at the most slices whose bits fit the budget) or "random" (the baseline)."""

    budget: float
    mode: str = "router"
    stop: bool = False


@dataclass
class TokenStep:
    index: int  # 0 = first generated token
    token_id: int
    text: str  # the new text this token adds
    budget: float  # budget in force when this token was computed
    mode: str
    bits: float  # realized bits of the forward pass that produced it (weighted over linears)
    slices: torch.Tensor  # (layers, linears) slice counts of that forward pass, last position
    linears: list[str]  # column names of ``slices``
    seconds: float  # wall time of this step (the first includes the prompt's prefill)
    prob: float  # probability of the chosen token
    top: list[tuple[str, float]] = field(default_factory=list)  # the 5 most likely tokens


def _precisions(model) -> list[int]:
    linears = quantized_linears(model)
    if not linears:
        raise MoBiQuantError("this model is not quantized: run quantize_ or calibrate_ first")
    return next(iter(linears.values())).precisions


def budget_range(model) -> tuple[float, float]:
    """Smallest and largest average bits the model's quantized linears can run at."""
    precisions = _precisions(model)
    return float(precisions[0]), float(precisions[-1])


def _step_precision(precisions: list[int], control: BudgetControl, seed: int):
    """(budget, precision() kwargs) for the next step, from the caller's control; a bad value is a clear error."""
    budget = check_budget(control.budget, precisions[0], precisions[-1])
    if control.mode not in MODES:
        raise MoBiQuantError(f"unknown mode {control.mode!r}; use one of {MODES}")
    if control.mode == "uniform":  # the most slices whose bits fit the budget
        return budget, dict(k=max(i for i, b in enumerate(precisions, start=1) if b <= budget + 1e-9))
    return budget, dict(budget=budget, mode=control.mode, seed=seed)


def next_token(logits: torch.Tensor, tokenizer, generated: list[int], text_so_far: str, temperature: float,
               top_p: float, gen: torch.Generator) -> tuple[int, str, str, float, list[tuple[str, float]]]:
    """Pick the next token from (vocab,) logits and append it to ``generated``: (token, the text it adds, the whole
    text, its probability, the 5 most likely tokens). Shared by the eager loop and the decode engine."""
    logits = logits.float()
    tok = _sample(logits, temperature, top_p, gen)
    probs = torch.softmax(logits, dim=-1)
    top_p_vals, top_ids = probs.topk(5)
    generated.append(tok)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    top = [(tokenizer.decode([int(t)]), float(p)) for t, p in zip(top_ids, top_p_vals)]
    return tok, text[len(text_so_far):], text, float(probs[tok]), top


def _encode(tokenizer, prompt: str | torch.Tensor, chat: bool) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        return prompt.reshape(1, -1).long()
    if not isinstance(prompt, str) or not prompt.strip():
        raise MoBiQuantError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids.reshape(1, -1).long()
    return torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs): the prompt's logits are then
    computed for its last position only, not a (prompt, vocabulary) product that nothing reads (a quarter of a
    40-token prefill on the CPU for the embedded model)."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


@torch.no_grad()
def elastic_generate(model, tokenizer, prompt: str | torch.Tensor, control: BudgetControl, max_new_tokens: int = 64,
                     *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = True,
                     max_prompt_tokens: int | None = None, int8_activations: bool = False,
                     head_slices: int | None = None) -> Iterator[TokenStep]:
    """Yield one ``TokenStep`` per generated token (see the module docstring). The decode engine's options (engine.py;
    CUDA only, other numerics): ``int8_activations``, the linears' inputs rounded to int8 per group of 128;
    ``head_slices``, lm_head sliced like the linears and run at that many slices."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MoBiQuantError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (temperature >= 0 and 0 < top_p <= 1):
        raise MoBiQuantError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    precisions = _precisions(model)  # a model that is not quantized fails here
    _step_precision(precisions, control, seed)  # a bad budget fails before any work
    ids = _encode(tokenizer, prompt, chat)
    limit = max_prompt_tokens or getattr(model.config, "max_position_embeddings", 2048) - max_new_tokens
    if ids.shape[1] > limit:
        raise MoBiQuantError(f"the prompt has {ids.shape[1]} tokens; at most {limit} fit with {max_new_tokens} new")
    device = next(model.parameters()).device
    options = [n for n, on in (("int8_activations", int8_activations), ("head_slices", head_slices is not None)) if on]
    if options and device.type != "cuda":
        raise MoBiQuantError(f"{' and '.join(options)} {'is an option' if len(options) == 1 else 'are options'} "
                             f"of the CUDA decode engine; this model is on {device.type}")
    gen = torch.Generator().manual_seed(seed)
    eos = set(filter(lambda t: t is not None, [tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)]))
    if device.type == "cuda":  # the decode engine (static cache, CUDA graph); None: unsupported model or busy
        from .engine import engine_for, engine_steps

        eng = engine_for(model, ids.shape[1] + max_new_tokens, int8_activations=int8_activations,
                         head_slices=head_slices)
        steps = eng and engine_steps(eng, tokenizer, ids, control, precisions, max_new_tokens, temperature, top_p,
                                     seed, eos)
        if steps is not None:
            yield from steps
            return
        if options:  # the torch path below has neither option: say so rather than run without
            raise MoBiQuantError(f"{' and '.join(options)} need the decode engine, which cannot serve this "
                                 "generation now (an unsupported model, or another generation holds it)")
    cache, inp, generated, text_so_far = None, ids.to(device), [], ""
    stream: dict = {}  # the adaptive threshold mode's score history for this generation
    last_only = {"logits_to_keep": 1} if _keeps_logits(model) else {}  # the prompt's head: its last position only
    for i in range(max_new_tokens):
        if control.stop:
            return
        t0 = time.perf_counter()
        budget, kw = _step_precision(precisions, control, seed + i)
        trace = RoutingTrace(keep=True)
        with precision(trace=trace, **kw, **({"stream": stream} if "budget" in kw else {})):
            out = model(input_ids=inp, past_key_values=cache, use_cache=True, **last_only)
        cache = out.past_key_values
        tok, piece, text_so_far, prob, top = next_token(out.logits[0, -1], tokenizer, generated, text_so_far,
                                                        temperature, top_p, gen)
        slices, names = trace.matrix()
        yield TokenStep(i, tok, piece, budget, control.mode, trace.realized_bits(), slices, names,
                        time.perf_counter() - t0, prob, top)
        if tok in eos:
            return
        inp = torch.tensor([[tok]], device=device)
