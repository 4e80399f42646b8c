"""A timm ViT with metapeft LoRA or adapters on every position under ``torch.compile(fullgraph=True)``: no graph
breaks, and forward, gradients and one SGD step equal eager by the 2x rule against a float64 eager oracle, with
dropout on and off. Dropout seeds are device tensors drawn inside the graph: a compiled step gets a fresh mask.

Inductor (CPU) compiles take ~1 min each on a loaded 2-core machine: those tests are ``slow``; the default run
compiles with ``aot_eager`` (the same graph capture and autograd, no code generation).
"""

import copy

import pytest
import torch
import torch._inductor.config as inductor_config

import metapeft
from tests.helpers.oracle import assert_2x_rule
from tests.helpers.vit import images, randomize, tiny_vit

SEED = 5


def peft_vit(method: str, dropout: float, dtype=torch.float32) -> torch.nn.Module:
    """A one-block tiny ViT with ``method`` on every position, random PEFT weights, in training mode."""
    model = tiny_vit(depth=1)
    metapeft.inject(model, method=method, rank=4, dropout=dropout)
    randomize(model)
    return model.to(dtype).train()


def step(model: torch.nn.Module, x: torch.Tensor, run=None) -> tuple[torch.Tensor, dict, dict]:
    """Logits of ``run`` (default: ``model`` itself; e.g. its compiled wrapper), gradients of ``model``'s trainable
    parameters, and those parameters after one SGD step (lr 0.5)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(SEED)  # the dropout seeds: the same draws in every run
    logits = (model if run is None else run)(x)
    logits.square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in params.items()}
    torch.optim.SGD(params.values(), lr=0.5).step()
    return logits.detach(), grads, {name: p.detach().clone() for name, p in params.items()}


def check_compiled_step(method: str, dropout: float, backend: str) -> None:
    model = peft_vit(method, dropout)
    oracle_model = copy.deepcopy(model).double()
    compiled_model = copy.deepcopy(model)
    x = images(2)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # fallback_random: inductor draws the dropout seeds with torch's generator, as eager does, instead of its own
    with inductor_config.patch(fallback_random=True):
        compiled = step(compiled_model, x, torch.compile(compiled_model, fullgraph=True, backend=backend))
    eager = step(model, x)
    oracle = step(oracle_model, x.double())
    assert_2x_rule("logits", compiled[0], eager[0], oracle[0])
    for part, label in ((1, "grad"), (2, "after SGD")):
        assert set(compiled[part]) == set(oracle[part])
        for name in oracle[part]:
            assert_2x_rule(f"{label} {name}", compiled[part][name], eager[part][name], oracle[part][name])


def test_lora_vit_with_dropout_compiles_without_graph_breaks_and_matches_eager():
    check_compiled_step("lora", 0.2, "aot_eager")


@pytest.mark.parametrize("method", ["lora", "adapter", "adaptformer"])
def test_compiling_before_any_eager_call_selects_the_backend_without_graph_breaks(method):
    # no cached selection: it is made while tracing (it reads the environment and the recorded GPU default)
    model = peft_vit(method, 0.0)
    metapeft.ops.refresh_backends()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(images(2))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert {m.last_backend for m in model.modules() if isinstance(m, metapeft.layers.MetaPEFTModule)} == {"torch"}


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_model_compiled_first_compiles_once_across_calls_and_eager_calls(method):
    # neither the backend selection cache nor a layer's last_backend may be a guard of the compiled code
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = peft_vit(method, 0.0)
    metapeft.ops.refresh_backends()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    x = images(2)
    compiled(x)
    compiled(x)
    model(x)  # an eager call fills the selection cache and sets last_backend
    compiled(x)
    assert len(graphs) == 1


def test_compiled_dropout_draws_a_fresh_mask_every_step():
    model = peft_vit("lora", 0.5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = images(2)
    first, second = compiled(x), compiled(x)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(compiled(x), compiled(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("method", ["lora", "adapter", "adaptformer"])
def test_vit_under_inductor_matches_eager(method, dropout):
    check_compiled_step(method, dropout, "inductor")
