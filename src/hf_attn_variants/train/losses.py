"""The losses: LM, KL distillation from a teacher, layer-local attention transfer; held-out loss."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """Token-mean KL(teacher || student) of the next-token distributions at temperature `temperature` (scaled by
    temperature**2 so its gradients keep their size), in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lm_loss(logits, input_ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def decoder_attention_layers(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(decoder layer, its `self_attn`) pairs of `model` in order, through any peft/DDP/FSDP wrapping."""
    layers = {}
    for name, module in model.named_modules():
        match = re.search(r"(?:^|\.)layers\.(\d+)$", name)
        if match and hasattr(module, "self_attn"):
            layers[int(match.group(1))] = (module, module.self_attn)
    return [layers[i] for i in sorted(layers)]


class AttentionTransfer:
    """Layer-local distillation of the token attention (LoLCATs' "attention transfer"): every student decoder layer
    gets the teacher's residual-stream input to that layer, and the loss is the relative squared error between the
    student's and the teacher's attention outputs, averaged over layers. The layers learn in parallel from one teacher
    and one student forward; gradients reach only the attention (and its input norm), never earlier layers.

    Implemented with forward hooks, so the student still runs through its (DDP/FSDP) wrapper's forward."""

    def __init__(self, student, teacher):
        self.student_layers, self.teacher_layers = decoder_attention_layers(student), decoder_attention_layers(teacher)
        if not self.student_layers or len(self.student_layers) != len(self.teacher_layers):
            raise ValueError("attention transfer needs teacher and student with the same number of decoder layers")
        self.active = False
        self.inputs, self.targets, self.outputs = {}, {}, {}
        for i, ((t_layer, t_attn), (s_layer, s_attn)) in enumerate(zip(self.teacher_layers, self.student_layers)):
            t_layer.register_forward_pre_hook(self._capture_input(i), with_kwargs=True)
            t_attn.register_forward_hook(self._capture(i, self.targets, detach=True))
            s_layer.register_forward_pre_hook(self._replace_input(i), with_kwargs=True)
            s_attn.register_forward_hook(self._capture(i, self.outputs, detach=False))

    @staticmethod
    def _hidden_states(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def _capture_input(self, i):
        def hook(module, args, kwargs):
            if self.active:
                self.inputs[i] = self._hidden_states(args, kwargs).detach()
        return hook

    def _replace_input(self, i):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            if args:
                return (self.inputs[i], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.inputs[i]}
        return hook

    def _capture(self, i, store, detach):
        def hook(module, args, output):
            if self.active:
                out = output[0] if isinstance(output, tuple) else output
                store[i] = out.detach() if detach else out
        return hook

    @staticmethod
    def _skip(*args, **kwargs):
        return torch.zeros_like(args[0] if args else next(iter(kwargs.values())))

    def loss(self, student, teacher, input_ids):
        self.active = True
        # The student's MLPs feed only the next layer, whose input is replaced by the teacher's: skip them.
        mlps = [layer.mlp for layer, _ in self.student_layers if hasattr(layer, "mlp")]
        for mlp in mlps:
            mlp.forward = self._skip
        try:
            with torch.no_grad():
                teacher(input_ids=input_ids, logits_to_keep=1)
            student(input_ids=input_ids, logits_to_keep=1)
            errors = [
                (self.outputs[i].float() - self.targets[i].float()).pow(2).sum()
                / self.targets[i].float().pow(2).sum().clamp_min(1e-12)
                for i in range(len(self.student_layers))
            ]
            return torch.stack(errors).mean()
        finally:
            for mlp in mlps:
                del mlp.forward  # back to the class's forward
            self.active = False
            for store in (self.inputs, self.targets, self.outputs):  # the hooks hold these very dicts
                store.clear()



@torch.no_grad()
def held_out_loss(model, dataset, batch_size: int) -> float:
    """Mean LM loss of `model` over `dataset` (equal-length chunks), single process."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(dataset), batch_size):
        ids = torch.tensor(dataset[start : start + batch_size]["input_ids"], device=device)
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    return total / len(dataset)

