"""The fused LoRA forward (liandan.lora_fusion) computes what PEFT computes, with the same gradients."""

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from liandan.config import LoraConfig, SFTConfig
from liandan.lora_fusion import fuse_lora_layers
from liandan.models import load_model
from liandan.prepare import attach_trainable
from liandan.training_setup import freeze_in_bf16


def lora_model(model_dir, **lora):
    model, _ = load_model(str(model_dir), dtype="float32")
    model = attach_trainable(model, SFTConfig(data=["x"], lora=LoraConfig(rank=4, alpha=12, **lora)), [])
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT starts lora_B at zero, which would hide a wrong scale or sum
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def loss_and_grads(model, autocast=False):
    ids = torch.tensor([[5, 9, 23, 7, 41, 3, 18, 2]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), logits.detach().float(), grads


def fused_layers(model):
    return [m for m in model.modules() if type(m) is LoraLinear and "forward" in m.__dict__]


def test_fused_forward_equals_peft_in_value_and_gradient(chat_model_dir):
    model = lora_model(chat_model_dir)
    expected = loss_and_grads(model)
    unfuse = fuse_lora_layers(model)
    layers = fused_layers(model)
    assert len(layers) == sum(type(m) is LoraLinear for m in model.modules()) > 0
    assert all(m.scaling["default"] == 3.0 for m in layers)
    loss, logits, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected[1], rtol=1e-4, atol=1e-4)
    assert grads.keys() == expected[2].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-4, atol=1e-5, msg=name)
    unfuse()
    assert fused_layers(model) == []
    torch.testing.assert_close(loss_and_grads(model)[0], expected[0])


def test_fused_forward_under_bf16_autocast_with_bf16_frozen_weights(chat_model_dir):
    model = lora_model(chat_model_dir)
    reference = loss_and_grads(model)  # fp32, PEFT
    freeze_in_bf16(model)
    peft_bf16 = loss_and_grads(model, autocast=True)
    fuse_lora_layers(model)
    loss, logits, grads = loss_and_grads(model, autocast=True)
    # rounding of the same order as PEFT's own bf16 run, against the fp32 reference
    assert abs(loss - reference[0]) <= 2 * abs(peft_bf16[0] - reference[0]) + 1e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        error = (grad - reference[2][name]).norm() / reference[2][name].norm()
        assert error < 0.05, name


def test_disabled_adapters_give_the_base_model(chat_model_dir):
    model = lora_model(chat_model_dir)
    base, _ = load_model(str(chat_model_dir), dtype="float32")
    fuse_lora_layers(model)
    ids = torch.tensor([[5, 9, 23, 7]])
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids).logits
    with torch.no_grad():
        on = model(input_ids=ids).logits
    torch.testing.assert_close(off, base(input_ids=ids).logits)
    assert not torch.allclose(on, off)


def test_layers_with_dropout_keep_pefts_forward(chat_model_dir):
    model = lora_model(chat_model_dir, dropout=0.1)
    fuse_lora_layers(model)
    assert fused_layers(model) == []


def test_dora_layers_keep_pefts_forward(chat_model_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, _ = load_model(str(chat_model_dir), dtype="float32")
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert sum(type(m) is LoraLinear for m in model.modules()) > 0
    fuse_lora_layers(model)
    assert fused_layers(model) == []
