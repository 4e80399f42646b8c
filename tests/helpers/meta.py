"""Small models, batches and the brute-force oracle of the meta-step tests.

Oracle: the same parameters run through a twin model whose LoRA / adapter layers are ``metapeft.reference``'s
unfused computation, differentiated twice by ``torch.func`` through the unrolled SGD look-ahead, in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import metapeft
from metapeft.layers import MetaPEFTModule
from metapeft.meta import trainable_phi
from metapeft.reference import brute_force_hypergradient


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def randomize_lora(model: nn.Module, std: float = 0.2) -> None:
    """Nonzero LoRA B / adapter up projection (and gamma away from 1): every second-order term is exercised."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, metapeft.FusedMetaLoRA):
                layer.lora_B.normal_(std=std)
            if isinstance(layer, metapeft.FusedMetaAdapter):
                layer.up_weight.normal_(std=std)
                layer.up_bias.normal_(std=std)
            if isinstance(layer, metapeft.layers.MetaPEFTModule):
                layer.modulator.uniform_(-0.5, 1.0)


def lora_mlp(segments: int, dropout: float = 0.0, gamma: str = "scalar") -> nn.Module:
    """Three FusedMetaLoRA layers (the middle one with ``segments`` segments; gamma per segment or, with
    ``gamma="channel"``, per output channel) and a trainable head."""
    model = nn.Sequential(
        metapeft.FusedMetaLoRA(nn.Linear(10, 12), rank=3, dropout=dropout, gamma=gamma), nn.Tanh(),
        metapeft.FusedMetaLoRA(nn.Linear(12, 18), rank=2, segments=segments, alpha=4.0, dropout=dropout, gamma=gamma),
        nn.GELU(),
        metapeft.FusedMetaLoRA(nn.Linear(18, 9, bias=False), rank=2, dropout=dropout, gamma=gamma), nn.Tanh(),
        nn.Linear(9, 4),
    ).double()
    randomize_lora(model)
    return metapeft.mark_only_peft_trainable(model, extra=(model[6],))


def lora_vit() -> nn.Module:
    """A tiny timm ViT with FusedMetaLoRA on qkv (S = 3), proj, fc1 and fc2 of every block; head trainable."""
    import timm  # 12 s on the loaded test machine: not paid by the spawned workers that never build a ViT

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5)
    for block in model.blocks:
        block.attn.qkv = metapeft.FusedMetaLoRA(block.attn.qkv, rank=2, segments=3)
        block.attn.proj = metapeft.FusedMetaLoRA(block.attn.proj, rank=2)
        block.mlp.fc1 = metapeft.FusedMetaLoRA(block.mlp.fc1, rank=2)
        block.mlp.fc2 = metapeft.FusedMetaLoRA(block.mlp.fc2, rank=2)
    model = model.double().eval()
    randomize_lora(model, std=0.05)
    return metapeft.mark_only_peft_trainable(model, extra=(model.head,))


def batches(model_kind: str):
    """A float64 (train, val) pair of batches for ``"vit"`` (3 and 5 images) or the MLPs (7 and 5 rows)."""
    if model_kind == "vit":
        shape, classes = (3, 3, 32, 32), 5
    else:
        shape, classes = (7, 10), 4
    train = (torch.randn(*shape, dtype=torch.float64), torch.randint(0, classes, shape[:1]))
    val = (torch.randn(5, *shape[1:], dtype=torch.float64), torch.randint(0, classes, (5,)))
    return train, val


def brute_force(model, train_batch, val_batch, *, lr, momentum=0.0, buffers=None, weight_decay=0.0,
                lookahead_batches=()):
    """(hypergradient, direct term, phi_K, g_0) of ``classification_loss`` from the float64 oracle
    ``metapeft.reference.brute_force_hypergradient`` (torch.func through the reference twin, K unrolled SGD steps)."""
    kwargs = {"lr": lr, "momentum": momentum, "momentum_buffers": buffers, "weight_decay": weight_decay,
              "lookahead_batches": lookahead_batches}
    exact = brute_force_hypergradient(model, classification_loss, train_batch, val_batch, **kwargs)
    direct = brute_force_hypergradient(model, classification_loss, train_batch, val_batch, first_order=True, **kwargs)
    return exact.meta_grads, direct.meta_grads, exact.lookahead, exact.phi_grads


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    a, e = torch.cat([t.flatten() for t in actual]), torch.cat([t.flatten() for t in expected])
    return ((a - e).norm() / e.norm()).item()


def momentum_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Random SGD momentum buffers, one per trainable_phi parameter."""
    return [torch.randn_like(p) for p in trainable_phi(model)]



class AdapterNet(nn.Module):
    """A LoRA layer, an AdaptFormer (parallel) adapter beside a frozen MLP, a Houlsby (sequential) adapter, a head;
    ``gamma``: the modules' gamma granularity ("scalar" or "channel")."""

    def __init__(self, gamma: str = "scalar") -> None:
        super().__init__()
        self.lora = metapeft.FusedMetaLoRA(nn.Linear(10, 12), rank=2, gamma=gamma)
        self.mlp = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12))
        self.parallel = metapeft.FusedMetaAdapter(12, 3, alpha=0.5, kind="parallel", activation="gelu", gamma=gamma)
        self.sequential = metapeft.FusedMetaAdapter(12, 2, kind="sequential", activation="gelu", gamma=gamma)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.tanh(self.lora(x))
        h = h + self.parallel(h, residual=self.mlp(h))
        return self.head(self.sequential(h))



def more_train_batches(steps: int, classes: int = 4, features: int = 10) -> list:
    """Train batches for look-ahead steps 2..``steps``, of sizes 6, 4, ... (different from the first batch's 7)."""
    return [(torch.randn(8 - 2 * k, features, dtype=torch.float64), torch.randint(0, classes, (8 - 2 * k,)))
            for k in range(1, steps)]




def adapter_net(gamma: str = "scalar") -> nn.Module:
    """:class:`AdapterNet` in float64 with random PEFT weights and modulators; PEFT weights and head trainable."""
    model = AdapterNet(gamma).double()
    randomize_lora(model)
    return metapeft.mark_only_peft_trainable(model, extra=(model.head,))


def independent_lr_scales(model: nn.Module):
    """The oracle's module-wise learning rates, written apart from ``metapeft.params.module_lr_scales``: for every
    PEFT module named ``m``, ``D = softplus(rho)`` of ``m.modulator`` on each of its PEFT weights, LoRA segment j's
    gamma on segment j's rows of A and B. Per-channel gammas: each on the row it scales (B's rows, an adapter's up
    rows and up bias), their segment's mean on A's rank block and on an adapter's down projection."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, MetaPEFTModule)}

    def scales(rho: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in modules.items():
            gamma = F.softplus(rho[f"{name}.modulator"])
            for weight in module.peft_parameter_names:
                rows = getattr(module, weight).shape[0]
                channel = module.granularity == "channel"
                if isinstance(module, metapeft.FusedMetaLoRA) and channel:
                    blocks = gamma.chunk(len(module.active_segments))
                    out[f"{name}.{weight}"] = gamma.unsqueeze(1) if weight == "lora_B" else torch.cat(
                        [g.mean().expand(module.rank, 1) for g in blocks])
                elif isinstance(module, metapeft.FusedMetaLoRA):
                    out[f"{name}.{weight}"] = torch.cat([g.expand(rows // gamma.numel(), 1) for g in gamma])
                elif channel:
                    up = {"up_weight": gamma.unsqueeze(1), "up_bias": gamma}
                    out[f"{name}.{weight}"] = up.get(weight, gamma.mean())
                else:
                    out[f"{name}.{weight}"] = gamma
        return out

    return scales
