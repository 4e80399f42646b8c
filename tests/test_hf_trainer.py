"""``metapeft.hf_trainer``: MetaPEFT inside ``transformers.Trainer`` on a tiny Llama built from a config (no
download): the meta set carved from the train dataset, meta steps in every mode with K = 1 and 2 through the
Trainer's own AdamW, gammas in the Trainer's logs; and the same run as metapeft's own trainer on the same data and
schedule."""

from __future__ import annotations

import copy

import pytest
import torch

import metapeft
from metapeft.meta.optim import inner_rule_for
from metapeft.params import meta_parameters, trainable_phi

transformers = pytest.importorskip("transformers")
from metapeft.hf_trainer import HFMetaPEFTTrainer, MetaArguments, carve_meta_set, torch_optimizer  # noqa: E402

VOCAB, LENGTH = 64, 12


def tiny_llama() -> torch.nn.Module:
    """LlamaForCausalLM (hidden 32, 2 layers, vocab 64) from a config, LoRA on q_proj and v_proj."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    metapeft.inject(model, target_modules=("q_proj", "v_proj"), rank=4)
    return model


def token_dataset(n: int) -> list[dict[str, torch.Tensor]]:
    """n sequences of a repeating pattern (learnable) with a random offset."""
    starts = torch.randint(0, VOCAB, (n, 1))
    ids = (starts + torch.arange(LENGTH) * 3) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(tmp_path, **kwargs) -> transformers.TrainingArguments:
    defaults = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2,
                "logging_steps": 2, "report_to": "none", "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
                "seed": 0}
    return transformers.TrainingArguments(**{**defaults, **kwargs})


def test_the_meta_set_is_a_seeded_carve_of_the_train_dataset():
    data = token_dataset(50)
    train, meta = carve_meta_set(data, 0.2, seed=3)
    assert meta.numel() == 10 and train.numel() == 40
    assert not set(train.tolist()) & set(meta.tolist())
    again, other = carve_meta_set(data, 0.2, seed=3)[1], carve_meta_set(data, 0.2, seed=4)[1]
    assert torch.equal(again, meta) and not torch.equal(other, meta)


@pytest.mark.parametrize("steps", [1, 2], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("mode", ["exact", "finite_difference", "first_order"])
def test_tiny_llama_learns_gammas_through_the_trainers_adamw(tmp_path, mode, steps):
    model = tiny_llama()
    start = [p.detach().clone() for p in meta_parameters(model)]
    trainer = HFMetaPEFTTrainer(model, training_args(tmp_path), token_dataset(40),
                                meta_args=MetaArguments(meta_interval=2, meta_mode=mode, meta_lookahead_steps=steps,
                                                        meta_lr=0.05))
    assert len(trainer.train_dataset) == 32 and len(trainer.meta_dataset) == 8
    trainer.train()
    optimizer = torch_optimizer(trainer.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)  # the Trainer's default, which the look-ahead followed
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not held & {id(p) for p in meta_parameters(model)}, "rho must stay out of the Trainer's optimizer"
    assert trainer.outer_step == 2  # steps 0 and 2 of 4
    assert all(not torch.equal(p, s) for p, s in zip(meta_parameters(model), start)), "every gamma must move"
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 2
    for record in records:
        assert "meta_loss" in record
        gammas = {k: v for k, v in record.items() if k.startswith("gamma/")}
        assert sorted(gammas) == sorted(f"gamma/model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv")
    assert records[-1]["gamma/model.layers.0.self_attn.q_proj"] == pytest.approx(
        model.model.layers[0].self_attn.q_proj.gamma.item())


def test_the_lookahead_starts_from_the_trainers_optimizer_state(tmp_path):
    """After training, the AdamW state the look-ahead reads is the Trainer's: exp_avg, exp_avg_sq and step of
    every phi tensor."""
    model = tiny_llama()
    trainer = HFMetaPEFTTrainer(model, training_args(tmp_path, max_steps=3), token_dataset(20),
                                meta_args=MetaArguments(meta_interval=1))
    trainer.train()
    optimizer = torch_optimizer(trainer.optimizer)
    rule, state = inner_rule_for(optimizer, trainable_phi(model))
    assert rule.lr == optimizer.param_groups[0]["lr"]
    for p, s in zip(trainable_phi(model), state):
        assert s.exp_avg is optimizer.state[p]["exp_avg"] and s.step == 3.0


def test_one_meta_step_per_optimizer_step_under_gradient_accumulation(tmp_path):
    model = tiny_llama()
    trainer = HFMetaPEFTTrainer(model, training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2,
                                                     per_device_train_batch_size=2), token_dataset(20),
                                meta_args=MetaArguments(meta_interval=1))
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.outer_step == 3


def test_a_model_without_modulators_is_refused(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=1, num_attention_heads=4,
                                                                   vocab_size=VOCAB))
    with pytest.raises(ValueError, match="no learnable modulators"):
        HFMetaPEFTTrainer(model, training_args(tmp_path), token_dataset(10))
    with pytest.raises(ValueError, match="meta_mode"):
        MetaArguments(meta_mode="second")


class TokenClassifier(torch.nn.Module):
    """A tiny LlamaModel and a linear head on the last token: logits for metapeft's trainer (``model(x)``), a loss
    for the HF Trainer (``model(input_ids=..., labels=...)``)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        self.backbone = transformers.LlamaModel(config)
        self.head = torch.nn.Linear(32, classes)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.backbone(input_ids=input_ids).last_hidden_state[:, -1])
        if labels is None:
            return logits
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Pairs(torch.utils.data.Dataset):
    """(x, y) samples for metapeft's trainer, with the ``targets`` it reads labels from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.targets = x, y

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize(("mode", "optimizer", "clip"), [("exact", "sgd", None), ("first_order", "sgd", None),
                                                         ("exact", "adamw", None), ("first_order", "adamw", None),
                                                         ("exact", "adamw", 0.05)])
def test_hf_trainer_equals_metapefts_own_trainer(tmp_path, mode, optimizer, clip):
    """The same model, data, batch order, meta batches and cosine schedule through metapeft's trainer and through
    the HF Trainer: the same phi and rho at the end (checked to 1e-12), with SGD (momentum 0.9) and with AdamW
    (metapeft's ``inner_optimizer="adamw"``, the HF Trainer's ``adamw_torch``) as the inner optimizer; and with
    gradients clipped (both clip the real step and the look-ahead)."""
    from metapeft.data.sampling import epoch_batches
    from metapeft.trainer import MetaPEFTTrainer, TrainerConfig

    classes, batch, seed = 3, 4, 7
    x, y = torch.randint(0, VOCAB, (16, LENGTH)), torch.randint(0, classes, (16,))
    meta_x, meta_y = torch.randint(0, VOCAB, (8, LENGTH)), torch.randint(0, classes, (8,))
    model = TokenClassifier(classes).double()
    metapeft.inject(model, target_modules=("q_proj", "v_proj"), rank=2, modules_to_save=("head",))
    hf_model = copy.deepcopy(model)
    start = [p.detach().clone() for p in meta_parameters(model)]

    lr = 0.05 if optimizer == "sgd" else 0.01
    config = TrainerConfig(epochs=1, batch_size=batch, lr=lr, momentum=0.9, weight_decay=0.0, schedule="cosine",
                           inner_optimizer=optimizer, max_grad_norm=clip,
                           meta_lr=0.05, meta_interval=2, meta_mode=mode, meta_batch_size=batch,
                           meta_reuse_lookahead=False, meta_warmup_steps=0, loss="ce", classifier="linear",
                           head="head", amp="none", device="cpu", seed=seed, progress=False, num_classes=classes)
    MetaPEFTTrainer(model, Pairs(x, y), Pairs(meta_x, meta_y), config=config).fit()

    order = torch.cat(epoch_batches(torch.arange(16), batch, seed, 0))  # metapeft's batch order, fed in sequence
    as_dicts = [{"input_ids": x[i], "labels": y[i]} for i in order]
    meta_dicts = [{"input_ids": meta_x[i], "labels": meta_y[i]} for i in range(8)]
    args = training_args(tmp_path, per_device_train_batch_size=batch, max_steps=-1, num_train_epochs=1,
                         learning_rate=lr, weight_decay=0.0,
                         **({"optim": "sgd", "optim_args": "momentum=0.9"} if optimizer == "sgd" else
                            {"optim": "adamw_torch"}),
                         lr_scheduler_type="cosine", max_grad_norm=clip or 0.0, train_sampling_strategy="sequential",
                         seed=seed)
    trainer = HFMetaPEFTTrainer(hf_model, args, as_dicts, meta_dataset=meta_dicts,
                                meta_args=MetaArguments(meta_interval=2, meta_mode=mode, meta_lr=0.05))
    trainer.train()
    assert trainer.outer_step == 2
    for (name, p), q in zip(model.named_parameters(), hf_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15, msg=lambda m, name=name: f"{name}: {m}")
    assert all((p - s).abs().min() > 1e-4 for p, s in zip(meta_parameters(model), start)), "every gamma must move"


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "metapeft.hf_trainer")
    with pytest.raises(ImportError, match=r'metapeft\[hf\]'):
        importlib.import_module("metapeft.hf_trainer")


def test_gamma_logs_name_every_module_segment_and_channel_summary():
    from metapeft.hf_trainer import gamma_logs

    model = torch.nn.Sequential(metapeft.FusedMetaLoRA(torch.nn.Linear(6, 6), rank=2),
                                metapeft.FusedMetaLoRA(torch.nn.Linear(6, 9), rank=2, segments=3),
                                metapeft.FusedMetaLoRA(torch.nn.Linear(6, 4), rank=2, gamma="channel"))
    with torch.no_grad():
        model[2].modulator.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    logs = gamma_logs(model)
    assert sorted(logs) == ["gamma/0", "gamma/1/0", "gamma/1/1", "gamma/1/2", "gamma/2", "gamma_std/2"]
    channel = torch.nn.functional.softplus(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert logs["gamma/0"] == pytest.approx(1.0) and logs["gamma/2"] == pytest.approx(channel.mean().item())
    assert logs["gamma_std/2"] == pytest.approx(channel.std(correction=0).item())


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Stopped after step 3 and resumed from its checkpoint, a run ends with the weights, gammas, outer-step count
    and outer optimizer state of one that ran through (float64, meta step every step); a checkpoint without the meta
    state is refused, naming the file."""
    data = token_dataset(24)

    def trainer(output_dir, model=None, **kwargs):
        torch.manual_seed(0)
        model = tiny_llama().double() if model is None else model
        args = training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=3, **kwargs)
        return HFMetaPEFTTrainer(model, args, data, meta_args=MetaArguments(meta_interval=1, meta_mode="exact"))

    through = trainer(tmp_path / "through")
    through.train()
    first = trainer(tmp_path / "resumed")
    first.train()  # the same run; its checkpoint-3 is where the second trainer starts
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.outer_step == through.outer_step == 6
    for (name, p), q in zip(through.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15, msg=lambda m, name=name: f"{name}: {m}")
    exp_avg = [s["exp_avg"] for s in resumed.meta_optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(exp_avg, through.meta_optimizer.state_dict()["state"]
                                                            .values()))

    (tmp_path / "resumed" / "checkpoint-3" / "meta_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3/meta_state.pt is missing"):
        trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))


@pytest.mark.parametrize(("mode", "kind"), [("exact", "classifier"), ("first_order", "classifier"),
                                            ("exact", "causal_lm")])
def test_an_accumulated_step_meta_learns_as_one_batch(tmp_path, mode, kind):
    """Two micro-batches of 4 accumulated into each optimizer step give the same weights and gammas as batches of 8
    (float64, to 1e-12): the meta step's look-ahead takes the whole step's gradient, not the first micro-batch's;
    for a loss the Trainer divides by the accumulation steps (a classifier) and for one the model normalises by the
    step's token count (a causal LM, ``num_items_in_batch``)."""
    torch.manual_seed(0)
    if kind == "classifier":
        classes = 3
        x, y = torch.randint(0, VOCAB, (16, LENGTH)), torch.randint(0, classes, (16,))
        data = [{"input_ids": x[i], "labels": y[i]} for i in range(16)]
        meta = [{"input_ids": i, "labels": j} for i, j in zip(torch.randint(0, VOCAB, (8, LENGTH)),
                                                              torch.randint(0, classes, (8,)))]
        model = TokenClassifier(classes).double()
        metapeft.inject(model, target_modules=("q_proj", "v_proj"), rank=2, modules_to_save=("head",))
    else:
        data, meta, model = token_dataset(16), token_dataset(8), tiny_llama().double()
    runs = []
    for micro, accumulation in ((8, 1), (4, 2)):
        run = copy.deepcopy(model)
        args = training_args(tmp_path / f"{micro}x{accumulation}", per_device_train_batch_size=micro,
                             gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=0.01,
                             train_sampling_strategy="sequential", max_grad_norm=0.0)
        HFMetaPEFTTrainer(run, args, data, meta_dataset=meta,
                          meta_args=MetaArguments(meta_interval=1, meta_mode=mode, meta_lr=0.05,
                                                  meta_batch_size=4)).train()
        runs.append(run)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15, msg=lambda m, name=name: f"{name}: {m}")
