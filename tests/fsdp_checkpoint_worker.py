"""Run by test_checkpoints.py under ``torch.distributed.run`` with 2 CPU processes (gloo): a tiny
Llama with LoRA, sharded with FSDP2 (``fully_shard``), trained 4 steps straight through, and
again 2 steps + `save_checkpoint`, then a fresh model + `load_checkpoint` + 2 steps. Writes both
runs' losses and final adapter weights (gathered whole) to ``OUT/result-RANK.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from liandan.checkpoints import FULL, gather_trained, load_checkpoint, save_checkpoint

FINGERPRINT = {"settings": {"lr": 0.01}, "data_sha256": "same data"}


def build(lora_seed: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    torch.manual_seed(lora_seed)  # a resumed run must not depend on its own fresh LoRA init
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, n: int) -> float:
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(100 * n + rank)  # each process its own batch
    ids = torch.randint(0, 64, (2, 12), generator=generator)
    # Dropout-like randomness drawn from the global RNG, which a checkpoint must restore.
    noise = torch.rand(()) * 1e-3
    loss = model(input_ids=ids, labels=ids).loss + noise
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP, is_main_process=rank == 0, process_index=rank,
        num_processes=dist.get_world_size(), wait_for_everyone=dist.barrier, unwrap_model=lambda m: m,
    )  # fmt: skip
    torch.manual_seed(1)
    model, optimizer, scheduler = build(lora_seed=1)
    straight = [step(model, optimizer, scheduler, n) for n in range(4)]
    straight_weights, _ = gather_trained(accelerator, model, optimizer)

    torch.manual_seed(1)
    model, optimizer, scheduler = build(lora_seed=1)
    first = [step(model, optimizer, scheduler, n) for n in range(2)]
    state = {"step": 2, "skipped_steps": 0, "fingerprint": FINGERPRINT}
    checkpoint = save_checkpoint(accelerator, out, model, optimizer, scheduler, state, keep=2)
    torch.manual_seed(99)  # what the process did after the checkpoint must not matter
    model, optimizer, scheduler = build(lora_seed=2)
    restored = load_checkpoint(accelerator, out, model, optimizer, scheduler, FINGERPRINT, allow_changes=False)
    rest = [step(model, optimizer, scheduler, n) for n in range(2, 4)]
    resumed_weights, _ = gather_trained(accelerator, model, optimizer)

    result = {"straight": straight, "resumed": first + rest, "restored_step": restored["step"]}
    if rank == 0:
        saved = load_file(checkpoint / "weights.safetensors")
        full_shapes = {k: list(v.shape) for k, v in saved.items()}
        result.update(
            saved_shapes=full_shapes,
            max_weight_diff=max(float((straight_weights[k] - resumed_weights[k]).abs().max()) for k in straight_weights),
            weight_names=sorted(straight_weights) == sorted(resumed_weights) == sorted(saved),
            optimizer_keys=sorted(torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"])[:2],
        )
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    assert FULL.full_state_dict
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
