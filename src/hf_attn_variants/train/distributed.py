"""Multi-process runs: FSDP on CPU (gloo), FSDP wrap units, saving a sharded model."""

from __future__ import annotations

import os

import torch

def cpu_fsdp_requested() -> bool:
    """An `accelerate launch --use_fsdp` run with several processes on a machine without an accelerator device."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.cuda.is_available()
    )


def enable_cpu_fsdp(accelerator) -> None:
    """Make `accelerator` shard with FSDP on CPU (gloo).

    accelerate (1.x) turns an FSDP launch into `DistributedType.FSDP` only on accelerator devices; on CPU the state
    stays `MULTI_CPU` and the model would silently be wrapped in DDP instead. torch's FSDP (1 and 2) runs on CPU with
    gloo (FSDP2, `fully_shard`; FSDP1 rejects a CPU device), so the state is switched to FSDP with a plugin read from
    the launcher's `FSDP_*` variables (auto-wrap policy `TRANSFORMER_BASED_WRAP` without class names wraps the model's
    `_no_split_modules`)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:  # pragma: no cover - accelerate changed
        raise RuntimeError(f"expected a MULTI_CPU accelerate state to switch to FSDP, got {state.distributed_type}")
    plugin = FullyShardedDataParallelPlugin(sync_module_states=False, cpu_ram_efficient_loading=False)
    if plugin.fsdp_version != 2:
        # torch's FSDP1 wrapper resolves the CPU `device_id` to cpu:0 and rejects it ("Inconsistent compute device").
        raise ValueError("FSDP on CPU needs FSDP2: launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`.")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Every `AcceleratorState()` made later copies the process state over its own: switch that one too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def wrap_present_no_split_modules(plugin, model) -> None:
    """FSDP units = the model's `_no_split_modules` that it actually contains.

    accelerate's transformer auto-wrap takes every class named in `_no_split_modules` and raises for one the model
    lacks; the family lists `AttnVariantLlamaLayerShortcut`, which exists only with `layer_shortcut=True`."""
    if plugin is None or plugin.transformer_cls_names_to_wrap is not None:
        return  # the launcher named the classes itself
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {type(m).__name__ for m in base.modules()}
    names = [name for name in (getattr(base, "_no_split_modules", None) or []) if name in present]
    if names:
        plugin.transformer_cls_names_to_wrap = names



def save_trained(trainer, output_dir: str) -> None:
    """`trainer.save_model`, except under FSDP2 on CPU, where the full state dict accelerate gathers (with
    `cpu_offload=True`, a no-op on CPU) points at freed all-gather buffers: gather it here without offloading."""
    state = trainer.accelerator.state
    if not (trainer.is_fsdp_enabled and getattr(state, "is_fsdp2", False) and not torch.cuda.is_available()):
        trainer.save_model(output_dir)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state_dict = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    if trainer.args.should_save:
        state_dict = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        model = trainer.accelerator.unwrap_model(trainer.model)
        sharded_class = type(model)
        # fully_shard swaps the class for FSDP<Name>(FSDPModule, Name), defined in torch: save_pretrained would copy
        # torch's FSDP files as "remote code" and record that name. Save under the model's own class.
        if sharded_class.__name__.startswith("FSDP"):
            model.__class__ = sharded_class.__bases__[-1]
        try:
            model.save_pretrained(output_dir, state_dict=state_dict)
        finally:
            model.__class__ = sharded_class
    trainer.accelerator.wait_for_everyone()


def sharded_module_classes(model) -> list[str]:
    """Class names of the modules FSDP made units of (FSDP1 wrappers or FSDP2 `fully_shard`ed modules)."""
    names = set()
    for module in model.modules():
        cls = type(module).__name__
        if cls == "FullyShardedDataParallel":
            names.add(type(module._fsdp_wrapped_module).__name__)
        elif cls.startswith("FSDP") and len(cls) > 4:  # FSDP2 renames the class of each unit to FSDP<name>
            names.add(cls[4:])
    return sorted(names)

