"""MetaPEFTTrainer: wiring against hand-written loops, the look-ahead reuse, exact resume, heads, logs."""

import copy
import json
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import metapeft
from metapeft.data.sampling import epoch_batches
from metapeft.heads import CosineClassifier
from metapeft.meta import hypergradient
from metapeft.meta.inner import ClippedRule, SGDRule
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet, first_meta_step_inputs, tiny_net_with_random_lora

COUNTS = [20, 12, 6, 4]


def quiet(**kwargs) -> TrainerConfig:
    """A config without progress bars on the paper's meta schedule (an exact meta step at every step; the shipped
    default is a first-order meta step every 5 steps) and without the scale warm-up (tests/trainer/test_meta_schedule.py
    covers it), so the first meta step is the one these tests take apart."""
    return TrainerConfig(**{"progress": False, "meta_mode": "exact", "meta_interval": 1, "meta_warmup_steps": 0,
                            **kwargs})


def test_config_rejects_bad_values():
    for bad, match in (({"epochs": 0}, "epochs"), ({"meta_ratio": 1.0}, "meta_ratio"), ({"lr": 0.0}, "lr"),
                       ({"meta_mode": "second"}, "meta_mode"), ({"resume": True}, "output_dir"),
                       ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"meta_batch_size": 0}, "meta_batch_size"),
                       ({"meta_interval": 0}, "meta_interval"), ({"meta_interval": "weekly"}, "meta_interval"),
                       ({"inner_optimizer": "adam"}, "inner_optimizer"),
                       ({"inner_optimizer": "adamw", "meta_module_lr": True}, "meta_module_lr needs")):
        with pytest.raises(ValueError, match=match):
            TrainerConfig(**bad)


@pytest.mark.parametrize("interval", [1, 3, "epoch"])
def test_meta_steps_follow_the_meta_interval(interval):
    """Meta steps at the global steps a brute-force schedule names: every ``interval`` steps, or the first step of
    every epoch."""
    data = LongTailedBlobs(COUNTS)
    trainer = MetaPEFTTrainer(TinyNet(), data, config=quiet(epochs=3, batch_size=16, meta_interval=interval,
                                                            meta_mode="first_order"))
    steps = []
    trainer.step.meta_step = lambda *args, run=trainer.step.meta_step: steps.append(trainer.global_step) or run(*args)
    trainer.fit()
    per_epoch = -(-len(data) // 16)
    every = per_epoch if interval == "epoch" else interval
    assert steps == [t for t in range(3 * per_epoch) if t % every == 0]


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adamw"])
def test_plain_peft_equals_a_hand_written_loop(inner_optimizer):
    data = LongTailedBlobs(COUNTS)
    torch.manual_seed(0)
    model = TinyNet(meta=False)
    twin = copy.deepcopy(model)
    trainer = MetaPEFTTrainer(model, data, config=quiet(epochs=2, batch_size=16, classifier="linear",
                                                        inner_optimizer=inner_optimizer))
    trainer.fit()
    assert trainer.meta_optimizer is None and trainer.rho == []

    params = [twin.l1.lora_A, twin.l1.lora_B, twin.l2.lora_A, twin.l2.lora_B, *twin.head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4) if inner_optimizer == "sgd" else \
        torch.optim.AdamW(params, lr=0.01, weight_decay=5e-4)
    total = 2 * 3
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS))
    step = 0
    for epoch in range(2):
        for batch in epoch_batches(torch.arange(len(data)), 16, seed=0, epoch=epoch):
            x, y = data.x[batch], torch.tensor(data.labels)[batch]
            for group in optimizer.param_groups:
                group["lr"] = 0.005 * (1 + torch.cos(torch.tensor(torch.pi * step / total))).item()
            optimizer.zero_grad()
            F.cross_entropy(twin(x) + log_prior, y).backward()
            optimizer.step()
            step += 1
    for (name, p), q in zip(trainer.model_state().items(), [twin.state_dict()[n] for n in trainer.model_state()]):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    assert torch.equal(model.l1.modulator, twin.l1.modulator)


def test_meta_false_config_freezes_learnable_modulators():
    model = TinyNet(meta=True)
    before = model.l1.modulator.detach().clone()
    trainer = MetaPEFTTrainer(model, LongTailedBlobs(COUNTS), config=quiet(epochs=1, batch_size=16, meta=False))
    trainer.fit()
    assert torch.equal(model.l1.modulator, before) and not model.l1.modulator.requires_grad


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse_lookahead", "recompute"])
def test_meta_step_applies_the_hypergradient_and_the_lookahead(reuse):
    data = LongTailedBlobs(COUNTS)
    model = tiny_net_with_random_lora()
    config = quiet(batch_size=16, meta_lr=0.05, classifier="linear", meta_reuse_lookahead=reuse)
    trainer = MetaPEFTTrainer(model, data, config=config)
    twin = copy.deepcopy(model)
    batch_indices, (x, y), val, loss_fn = first_meta_step_inputs(trainer, data, COUNTS)

    expected = hypergradient(twin, loss_fn, (x, y), val, lr=0.01, weight_decay=5e-4, mode="exact")
    trainer.train_step(x, y, batch_indices)
    for rho, rho0, g in zip(metapeft.meta_parameters(model), metapeft.meta_parameters(twin), expected.meta_grads):
        # Adam's first step moves by lr * g / (|g| + eps) = lr * sign(g)
        assert torch.allclose(rho, rho0 - 0.05 * g.sign(), rtol=0, atol=1e-7)
    if reuse:
        lookahead = expected.lookahead
    else:
        with torch.no_grad():
            for rho, new in zip(metapeft.meta_parameters(twin), metapeft.meta_parameters(model)):
                rho.copy_(new)
        phi = metapeft.meta.trainable_phi(twin)
        grads = torch.autograd.grad(loss_fn(twin, (x, y)), phi)
        lookahead = [p - 0.01 * (g + 5e-4 * p) for p, g in zip(phi, grads)]
    for p, q in zip(metapeft.meta.trainable_phi(model), lookahead):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected.lookahead[0], lookahead[0]) or reuse


def test_a_clipped_inner_step_lands_on_the_clipped_lookahead():
    """With max_grad_norm the meta step's look-ahead clips as the real step does (ClippedRule): the modulators take
    the hypergradient through the clipped step, and the real step lands on its phi_1."""
    data = LongTailedBlobs(COUNTS)
    model = tiny_net_with_random_lora()
    trainer = MetaPEFTTrainer(model, data, config=quiet(batch_size=16, meta_lr=0.05, classifier="linear",
                                                        max_grad_norm=0.05))
    twin = copy.deepcopy(model)
    batch_indices, (x, y), val, loss_fn = first_meta_step_inputs(trainer, data, COUNTS)
    clipped = ClippedRule(SGDRule(0.01, 0.9, 5e-4), 0.05)
    expected = hypergradient(twin, loss_fn, (x, y), val, inner_rule=clipped, mode="exact")
    unclipped = hypergradient(twin, loss_fn, (x, y), val, lr=0.01, weight_decay=5e-4, mode="exact")
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in expected.phi_grads])) > 0.05
    results = []
    trainer.step.hypergradient = lambda *args, run=trainer.step.hypergradient: results.append(run(*args)) or results[-1]
    trainer.train_step(x, y, batch_indices)
    for got, want, other in zip(results[0].meta_grads, expected.meta_grads, unclipped.meta_grads):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9) and not torch.allclose(got, other, rtol=1e-2)
    for rho, rho0, g in zip(metapeft.meta_parameters(model), metapeft.meta_parameters(twin), expected.meta_grads):
        assert torch.allclose(rho, rho0 - 0.05 * g.sign(), rtol=0, atol=1e-7)
    for p, q, r in zip(metapeft.meta.trainable_phi(model), expected.lookahead, unclipped.lookahead):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7) and not torch.allclose(p, r, rtol=1e-3, atol=1e-5)


def test_gradient_clipping_bounds_the_step():
    model = TinyNet(meta=False)
    trainer = MetaPEFTTrainer(model, LongTailedBlobs(COUNTS), config=quiet(
        batch_size=16, momentum=0.0, weight_decay=0.0, max_grad_norm=0.05, classifier="linear"))
    before = [p.detach().clone() for p in trainer.phi]
    logs = trainer.train_step(trainer.train_set.x[:16], torch.tensor(trainer.train_set.labels[:16]), torch.arange(16))
    assert float(logs["grad_norm"]) > 0.1
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainer.phi, before)))
    assert float(step) == pytest.approx(0.01 * 0.05, rel=1e-4)  # clip_grad_norm_ divides by norm + 1e-6


def run_to_end(output_dir, max_steps=None, resume=False):
    torch.manual_seed(0)
    model = TinyNet(dropout=0.2)
    config = quiet(epochs=2, batch_size=16, meta_lr=0.05, output_dir=str(output_dir), resume=resume, log_every=1)
    trainer = MetaPEFTTrainer(model, LongTailedBlobs(COUNTS), config=config)
    trainer.fit(max_steps=max_steps)
    return trainer


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    reference = run_to_end(tmp_path / "a")
    run_to_end(tmp_path / "b", max_steps=2)  # stops inside epoch 0 (3 steps per epoch)
    shutil.copy(tmp_path / "b" / "checkpoint.pt", tmp_path / "step2.pt")
    run_to_end(tmp_path / "b", max_steps=5, resume=True)  # inside epoch 1, logs steps 3..5
    shutil.copy(tmp_path / "step2.pt", tmp_path / "b" / "checkpoint.pt")  # as if it crashed after step 2
    resumed = run_to_end(tmp_path / "b", resume=True)
    assert resumed.global_step == reference.global_step == 6
    for (name, a), b in zip(reference.model_state().items(), resumed.model_state().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in lines if r["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert all(r["meta_loss"] > 0 for r in lines if r["event"] == "step")
    assert set(lines[-1]["gammas"]) == {"l1", "l2"}
    assert (tmp_path / "a" / "model.safetensors").exists()
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet(
        epochs=3, batch_size=16, meta_lr=0.05, output_dir=str(tmp_path / "b"), resume=True, log_every=1))
    with pytest.raises(ValueError, match="epochs"):
        trainer.fit()


def test_cosine_head_starts_from_class_mean_features():
    data = LongTailedBlobs(COUNTS)
    model = TinyNet()
    trainer = MetaPEFTTrainer(model, data, config=quiet(batch_size=16))
    assert isinstance(model.head, CosineClassifier) and model.head.scale == 25.0
    trainer.init_head_from_class_means()
    with torch.no_grad():
        features, labels = model.features(data.x), torch.tensor(data.labels)
    for c in range(len(COUNTS)):
        expected = F.normalize(features[labels == c].mean(0), dim=0)
        assert torch.allclose(model.head.weight[c], expected, atol=1e-6)


def test_a_val_set_is_the_meta_batch_source(monkeypatch):
    train, val = LongTailedBlobs(COUNTS, seed=1), LongTailedBlobs([6, 6, 6, 6], seed=2)
    seen = []

    def spy(model, loss_fn, train_batch, val_batch, **kwargs):
        seen.append(val_batch)
        return hypergradient(model, loss_fn, train_batch, val_batch, **kwargs)

    monkeypatch.setattr("metapeft.trainer.step.hypergradient", spy)
    trainer = MetaPEFTTrainer(TinyNet(), train, val, config=quiet(epochs=1, batch_size=16, meta_batch_size=8))
    trainer.fit()
    assert trainer.train_indices.numel() == len(train) and len(seen) == 3
    for x, y in seen:
        rows = (x[:, None, :] == val.x[None]).all(-1)
        assert rows.any(1).all() and rows.float().argmax(1).unique().numel() == len(y) == 8  # distinct val samples


def test_meta_training_turns_a_harmful_position_down():
    data = LongTailedBlobs([60, 30, 15, 8], noise=0.7)
    torch.manual_seed(0)
    model = TinyNet()
    # harmful by construction: l2's LoRA starts large and sees half its input dropped at random, so its
    # output is mostly per-sample noise on the features
    model.l2.dropout = 0.5
    with torch.no_grad():
        model.l2.lora_B.normal_(std=1.0)
    trainer = MetaPEFTTrainer(model, data, config=quiet(epochs=3, batch_size=32, meta_lr=0.05))
    trainer.fit()
    gammas = trainer.gammas()
    assert gammas["l2"][0] < 0.85 and gammas["l2"][0] < gammas["l1"][0] - 0.1, gammas


def test_timm_vit_with_segmented_qkv_lora_trains_with_a_cosine_head():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                            num_classes=3)
    block = vit.blocks[0]
    block.attn.qkv = metapeft.FusedMetaLoRA(block.attn.qkv, rank=2, segments=3)
    block.mlp.fc1 = metapeft.FusedMetaLoRA(block.mlp.fc1, rank=2)

    class Images(torch.utils.data.Dataset):
        targets = [0, 1, 2, 0, 1, 2, 0, 0, 1, 0]

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)) + self.targets[i], \
                self.targets[i]

    trainer = MetaPEFTTrainer(vit, Images(), config=quiet(epochs=1, batch_size=5, meta_batch_size=3))
    before = {k: list(v) for k, v in trainer.gammas().items()}
    result = trainer.fit(eval_set=Images())
    assert isinstance(vit.get_classifier(), CosineClassifier)
    assert len(before["blocks.0.attn.qkv"]) == 3 and trainer.gammas() != before
    assert 0.0 <= result["accuracy"] <= 1.0 and result["global_step"] == 2
    assert not vit.blocks[0].attn.qkv.base.weight.requires_grad and vit.head.weight.requires_grad


def test_bf16_autocast_on_cpu_trains_with_finite_losses(tmp_path):
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet(
        epochs=1, batch_size=16, amp="bf16", output_dir=str(tmp_path), log_every=1))
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] is not None and r["meta_loss"] is not None for r in lines if r["event"] == "step")


@pytest.mark.gpu
def test_cuda_bf16_training_runs():
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet(epochs=1, batch_size=16))
    assert trainer.device.type == "cuda"
    result = trainer.fit(eval_set=LongTailedBlobs(COUNTS))
    assert result["accuracy"] is not None and all(v[0] > 0 for v in trainer.gammas().values())


def test_model_without_a_findable_head_is_rejected():
    with pytest.raises(ValueError, match="head"):
        MetaPEFTTrainer(nn.Sequential(metapeft.FusedMetaLoRA(nn.Linear(12, 4), 2)), LongTailedBlobs(COUNTS))


def test_evaluate_reports_count_based_groups():
    data = LongTailedBlobs(COUNTS)
    trainer = MetaPEFTTrainer(TinyNet(), data, config=quiet(class_split="from_counts"))
    assert trainer.class_split == {"many": [], "medium": [0], "few": [1, 2, 3]}
    result = trainer.evaluate(data)
    assert result["many_accuracy"] is None and result["num_samples"] == len(data)
    with torch.no_grad():
        predictions = trainer.model(data.x).argmax(1)
    labels = torch.tensor(data.labels)
    assert result["medium_accuracy"] == pytest.approx(float((predictions[labels == 0] == 0).float().mean()))
    with pytest.raises(ValueError, match="class_split"):
        TrainerConfig(class_split="by_size")


def test_sequential_adapters_meta_train_through_the_trainer():
    class AdapterNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(12, 16)
            self.adapter = metapeft.FusedMetaAdapter(16, 4, kind="sequential")
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.adapter(torch.tanh(self.body(x))))

    model = AdapterNet()
    trainer = MetaPEFTTrainer(model, LongTailedBlobs(COUNTS), config=quiet(epochs=1, batch_size=16, meta_lr=0.05))
    before = model.adapter.gamma.detach().clone()
    trainer.fit()
    assert not model.body.weight.requires_grad and trainer.outer_step == 3
    assert not torch.equal(model.adapter.gamma.detach(), before)
    assert {id(p) for p in trainer.phi} == {id(p) for p in [*model.adapter.peft_parameters(), *model.head.parameters()]}


def test_a_batch_no_smaller_than_the_training_set_is_refused_up_front_naming_a_working_one(tmp_path):
    """The default batch of 128 on 42 samples failed at the first meta step with "the re-sampled meta set is
    empty"; now fit refuses before claiming its directory, naming batch_size, the sizes and a batch that works."""
    data = LongTailedBlobs(COUNTS)
    trainer = MetaPEFTTrainer(TinyNet(), data, config=quiet(epochs=1, output_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match=r"batch_size 128 is too large for the training set of 42 samples: .*"
                                         r"meta_ratio 0.2.*use batch_size <= 37"):
        trainer.fit()
    assert not (tmp_path / "run").exists()
    assert MetaPEFTTrainer(TinyNet(), data, config=quiet(epochs=1, batch_size=37)).fit()["global_step"] == 2
