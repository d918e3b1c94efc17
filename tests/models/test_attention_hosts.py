"""Hosts that swap the attention function (vLLM's transformers backend writes `config._attn_implementation = "vllm"`
and registers its own paged softmax attention under that name): softmax variants run it; a stick-breaking model
refuses it with one clear ValueError however the name arrives, instead of silently computing softmax attention."""

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.testing import VARIANTS, tiny_config_kwargs

HOST = "vllm"
REFUSAL = r"`attn_implementation`='vllm' cannot run stick-breaking attention"


@pytest.fixture(autouse=True)
def host_attention():
    """A stand-in for vLLM's attention: registered globally under its name (sdpa underneath), removed afterwards."""
    calls = []

    def host_attention_forward(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register(HOST, host_attention_forward)
    yield calls
    AttentionInterface._global_mapping.pop(HOST, None)


def config(variant: str, **overrides) -> AttnVariantLlamaConfig:
    return AttnVariantLlamaConfig(**tiny_config_kwargs(**VARIANTS[variant], **overrides))


def ids():
    return torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["softmax", "shortcut_depth"])
def test_softmax_variants_run_the_hosts_attention(variant, host_attention):
    torch.manual_seed(0)
    model = AttnVariantLlamaForCausalLM(config(variant)).eval()
    with torch.no_grad():
        expected = model(ids()).logits
        model.set_attn_implementation(HOST)
        logits = model(ids()).logits
    assert len(host_attention) == model.config.num_hidden_layers
    torch.testing.assert_close(logits, expected)


def _config_field_before_building():
    stickbreaking = config("stickbreaking")
    stickbreaking._attn_implementation = HOST  # what vLLM does before it builds the model
    return AutoModelForCausalLM.from_config(stickbreaking)


def _config_argument():
    return AttnVariantLlamaForCausalLM(config("stickbreaking", attn_implementation=HOST))


def _from_pretrained(tmp_path):
    AttnVariantLlamaForCausalLM(config("stickbreaking")).save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=HOST)


def _set_attn_implementation():
    model = AttnVariantLlamaForCausalLM(config("stickbreaking"))
    try:
        model.set_attn_implementation(HOST)
    finally:
        assert model.config._attn_implementation == "sdpa"  # unchanged


def _config_field_after_building():
    model = AttnVariantLlamaForCausalLM(config("stickbreaking")).eval()
    model.config._attn_implementation = HOST  # written past validation: refused at the next forward
    with torch.no_grad():
        model(ids())


@pytest.mark.parametrize(
    "arrival",
    [_config_field_before_building, _config_argument, _from_pretrained, _set_attn_implementation,
     _config_field_after_building],
)
def test_stickbreaking_refuses_the_hosts_attention_however_it_arrives(arrival, tmp_path, host_attention):
    with pytest.raises(ValueError, match=REFUSAL):
        arrival(tmp_path) if arrival is _from_pretrained else arrival()
    assert not host_attention  # never ran
