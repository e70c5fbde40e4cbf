"""The training path reused from HF: Trainer on a tiny model, joint exit loss."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.models import convert  # noqa: E402

from ..tiny import ParityTask, tiny_classifier  # noqa: E402


def exit_accuracy(model, data):
    with torch.no_grad():
        out = model(data.ids, torch.ones_like(data.ids))
    return (out.exit_logits.argmax(-1) == data.labels[None]).float().mean(dim=1)  # per exit


def test_trainer_joint_loss_decreases_and_exits_learn(tmp_path):
    hf = tiny_classifier("bert", seed=5)
    hf.config.num_labels = 2
    hf.classifier = torch.nn.Linear(32, 2)
    ee = convert(hf, init="random")
    train, dev = ParityTask(512, seed=1), ParityTask(256, seed=2)
    before = exit_accuracy(ee.eval(), dev)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=80, learning_rate=3e-3,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=ee, args=args, train_dataset=train)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 4
    assert losses[-1] < 0.5 * losses[0], losses
    after = exit_accuracy(ee.eval(), dev)
    assert (after[:-1] > 0.85).all(), f"internal exits did not learn: {before} -> {after}"
    assert after.mean() > before.mean() + 0.2


def test_loss_weights_and_stages():
    ee = convert(tiny_classifier("bert"))
    w = ee._exit_loss_weights()
    assert torch.allclose(w, torch.tensor([1.0, 2, 3, 4]) / 10)  # w_i = i / sum j (past-future eq. 9)
    ee.loss_weighting = "sum"
    assert torch.allclose(ee._exit_loss_weights(), torch.full((4,), 0.25))
    ee.set_training_stage("internal")  # DeeBERT stage 2: backbone frozen, internal heads train
    assert not any(p.requires_grad for p in ee.hf.parameters())
    assert all(p.requires_grad for p in ee.heads.parameters())
    assert ee._exit_loss_weights()[-1] == 0
    ee.set_training_stage("final")
    assert not any(p.requires_grad for p in ee.heads.parameters())
    assert torch.equal(ee._exit_loss_weights(), torch.tensor([0.0, 0, 0, 1]))
    with pytest.raises(ValueError):
        ee.set_training_stage("policy")


def test_regression_uses_mse():
    hf = tiny_classifier("roberta")
    hf.config.num_labels = 1
    hf.classifier.out_proj = torch.nn.Linear(32, 1)
    ee = convert(hf)
    data = ParityTask(16, seed=3)
    out = ee(data.ids, torch.ones_like(data.ids), labels=data.labels.float())
    z = out.exit_logits.squeeze(-1)
    expect = sum(w * torch.nn.functional.mse_loss(z[i], data.labels.float()) for i, w in enumerate(ee._exit_loss_weights()))
    assert torch.allclose(out.loss, expect, atol=1e-6)
