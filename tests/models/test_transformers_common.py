"""transformers' own `ModelTesterMixin` (and `ConfigTester`) run against every variant of the family, as transformers'
tests/models/llama/test_modeling_llama.py does for Llama.

The mixins come from the sdist of the installed transformers release, fetched at test time (see `hf_common`); without
network access the module is skipped. Tests that cannot apply to a variant are skipped below with their reason; every
other failure is a model-side bug.
"""

import sys
import unittest
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `hf_common`
from hf_common import UpstreamTestsUnavailable, load_upstream_tests

try:
    _upstream = load_upstream_tests()
except UpstreamTestsUnavailable as _error:
    pytest.skip(f"transformers' test mixins unavailable: {_error}", allow_module_level=True)

from hf_attn_variants.models import attn_variant_llama as family
from hf_attn_variants.models.attn_variant_llama import modeling_attn_variant_llama as modeling
from hf_attn_variants.testing import VARIANTS

CausalLMModelTest = _upstream.causal_lm_tester.CausalLMModelTest
CausalLMModelTester = _upstream.causal_lm_tester.CausalLMModelTester


def _head(name: str):
    """A task head of the family, if it has one (tested as soon as it exists)."""
    return getattr(family, name, None) or getattr(modeling, name, None)


_SEQUENCE_CLASSIFICATION = _head("AttnVariantLlamaForSequenceClassification")
_TOKEN_CLASSIFICATION = _head("AttnVariantLlamaForTokenClassification")
_QUESTION_ANSWERING = _head("AttnVariantLlamaForQuestionAnswering")
ALL_MODEL_CLASSES = tuple(
    model_class
    for model_class in (
        family.AttnVariantLlamaModel,
        family.AttnVariantLlamaForCausalLM,
        _SEQUENCE_CLASSIFICATION,
        _TOKEN_CLASSIFICATION,
        _QUESTION_ANSWERING,
    )
    if model_class is not None
)



def _tester(variant: str) -> type:
    return type(
        f"AttnVariantLlama{variant.title().replace('_', '')}ModelTester",
        (CausalLMModelTester,),
        {
            "config_class": family.AttnVariantLlamaConfig,
            "base_model_class": family.AttnVariantLlamaModel,
            "causal_lm_class": family.AttnVariantLlamaForCausalLM,
            "sequence_classification_class": _SEQUENCE_CLASSIFICATION,
            "token_classification_class": _TOKEN_CLASSIFICATION,
            "question_answering_class": _QUESTION_ANSWERING,
            "config_overrides": VARIANTS[variant],
        },
    )


class _FamilyModelTest(CausalLMModelTest):
    all_model_classes = ALL_MODEL_CLASSES
    # Upstream runs `test_can_init_all_missing_weights` only for models whose config file carries a copyright year of
    # 2023 or later; ours carries none, and the check (every weight is set by `_init_weights`) matters here: the
    # shortcut's zero-initialised projections and the stick-breaking remainder bias are initialised there.
    test_can_init_all_missing_weights_before_2023 = True


# ---------------------------------------------------------------------------------------------------------------------
# One test class per variant. `_skip(...)` replaces an upstream test that cannot apply to the variant, with the reason.
# ---------------------------------------------------------------------------------------------------------------------


def _skip(reason: str):
    def test(self):
        self.skipTest(reason)

    return test


class AttnVariantLlamaSoftmaxModelTest(_FamilyModelTest, unittest.TestCase):
    model_tester_class = _tester("softmax")


_NO_ROPE = (
    "stick-breaking layers use no rotary embeddings (`use_rope=None` resolves to off): RoPE scaling cannot change "
    "their outputs"
)


class AttnVariantLlamaStickbreakingModelTest(_FamilyModelTest, unittest.TestCase):
    model_tester_class = _tester("stickbreaking")

    test_model_rope_scaling_from_config_0_linear = _skip(_NO_ROPE)
    test_model_rope_scaling_from_config_1_dynamic = _skip(_NO_ROPE)
    test_model_rope_scaling_from_config_2_yarn = _skip(_NO_ROPE)


class AttnVariantLlamaShortcutDepthModelTest(_FamilyModelTest, unittest.TestCase):
    model_tester_class = _tester("shortcut_depth")


class AttnVariantLlamaShortcutDepthContextModelTest(_FamilyModelTest, unittest.TestCase):
    model_tester_class = _tester("shortcut_depth_context")


class AttnVariantLlamaStickbreakingShortcutModelTest(_FamilyModelTest, unittest.TestCase):
    model_tester_class = _tester("stickbreaking_shortcut")

    test_model_rope_scaling_from_config_0_linear = _skip(_NO_ROPE)
    test_model_rope_scaling_from_config_1_dynamic = _skip(_NO_ROPE)
    test_model_rope_scaling_from_config_2_yarn = _skip(_NO_ROPE)
