"""Our own version of transformers' `tests/causal_lm_tester.py` (not in the sdist), for a third-party model family.

Loaded by `hf_common.load_upstream_tests()` as `hf_upstream_tests.causal_lm_tester`, so the relative imports below
reach the sdist's `test_modeling_common` / `test_configuration_common` and the stand-ins next to this file.

- `CausalLMModelTester`: tiny config + inputs (`prepare_config_and_inputs_for_common()` etc.); a subclass names the
  config / model classes and `config_overrides`, the variant's config fields.
- `CausalLMModelTest(ModelTesterMixin, GenerationTesterMixin)`: upstream's common tests plus config, forward and
  classification-head checks. Two adaptations for a family whose class names transformers does not know:
  * `setUp` adds the family's classes to the auto-mapping *name* tables (`MODEL_MAPPING_NAMES`, ...) for the duration
    of each test: the mixin keys many decisions on them (skip the base model in training tests, pick the base model for
    the RoPE tests, find the causal-LM classes for the loss tests).
  * `_prepare_for_class(return_labels=True)` adds the labels each head takes, by the tester's class roles.
"""

import unittest.mock
import warnings
from typing import ClassVar

import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from .generation.test_utils import GenerationTesterMixin
from .test_configuration_common import ConfigTester
from .test_modeling_common import ModelTesterMixin, ids_tensor

# Role on the model tester -> auto-mapping name table of transformers that lists such classes.
_ROLE_MAPPINGS = {
    "base_model_class": "MODEL_MAPPING_NAMES",
    "causal_lm_class": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "sequence_classification_class": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification_class": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "question_answering_class": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


class CausalLMModelTester:
    config_class = None
    base_model_class = None
    causal_lm_class = None
    sequence_classification_class = None
    token_classification_class = None
    question_answering_class = None
    config_overrides: ClassVar[dict] = {}

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        type_sequence_label_size=2,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ):
        for role in ("config_class", "base_model_class", "causal_lm_class"):
            if getattr(self, role) is None:
                raise ValueError(f"{type(self).__name__} must set `{role}`.")
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.type_sequence_label_size = type_sequence_label_size
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.head_dim = hidden_size // num_attention_heads

    @property
    def all_model_classes(self):
        roles = ("base_model_class", "causal_lm_class", "sequence_classification_class", "token_classification_class")
        return tuple(getattr(self, role) for role in roles if getattr(self, role) is not None)

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            **self.config_overrides,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Rows of increasing length (right padding), as upstream's tester builds it.
        input_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None
        sequence_labels = token_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
        return self.get_config(), input_ids, input_mask, sequence_labels, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, sequence_labels, token_labels):
        model = self.base_model_class(config=config).to(torch_device).eval()
        with torch.no_grad():
            masked = model(input_ids, attention_mask=input_mask)
            result = model(input_ids)
        expected = (self.batch_size, self.seq_length, self.hidden_size)
        self.parent.assertEqual(tuple(masked.last_hidden_state.shape), expected)
        self.parent.assertEqual(tuple(result.last_hidden_state.shape), expected)


class CausalLMModelTest(ModelTesterMixin, GenerationTesterMixin):
    model_tester_class = None

    def setUp(self):
        # The models are tiny: one thread is faster, and on a busy 2-core machine several OpenMP threads per op spin
        # against each other (a 32x32 linear then takes milliseconds instead of 0.1 ms).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        # The project's pytest config ignores FutureWarning, but upstream tests assert that deprecated arguments warn
        # (`past_key_values` -> `cache` in transformers 5.24): let those through, for this test only.
        guard = warnings.catch_warnings()
        guard.__enter__()
        self.addCleanup(guard.__exit__, None, None, None)
        warnings.filterwarnings("always", message=r"`\w+` is deprecated", category=FutureWarning)
        if self.model_tester_class is None:
            raise ValueError(f"{type(self).__name__} must set `model_tester_class`.")
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(
            self, config_class=self.model_tester.config_class, **self.model_tester.config_overrides
        )
        if not self.all_model_classes:
            self.all_model_classes = self.model_tester.all_model_classes
        model_type = self.model_tester.config_class.model_type
        for role, table in _ROLE_MAPPINGS.items():
            model_class = getattr(self.model_tester, role)
            if model_class is not None and hasattr(modeling_auto, table):
                patcher = unittest.mock.patch.dict(getattr(modeling_auto, table), {model_type: model_class.__name__})
                patcher.start()
                self.addCleanup(patcher.stop)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=False)
        if return_labels:
            tester = self.model_tester
            batch, length = tester.batch_size, tester.seq_length
            if model_class in (tester.causal_lm_class, tester.token_classification_class):
                inputs_dict["labels"] = torch.zeros((batch, length), dtype=torch.long, device=torch_device)
            elif model_class is tester.sequence_classification_class:
                inputs_dict["labels"] = torch.zeros(batch, dtype=torch.long, device=torch_device)
            elif model_class is tester.question_answering_class:
                inputs_dict["start_positions"] = torch.zeros(batch, dtype=torch.long, device=torch_device)
                inputs_dict["end_positions"] = torch.zeros(batch, dtype=torch.long, device=torch_device)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def _check_classification_head(self, model_class, problem_type, make_labels, expected_shape):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.num_labels = 3
        config.problem_type = problem_type
        model = model_class(config).to(torch_device).eval()
        labels = make_labels(config)
        with torch.no_grad():
            result = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
        self.assertEqual(tuple(result.logits.shape), expected_shape)
        self.assertTrue(torch.isfinite(result.loss))

    def test_sequence_classification_model(self):
        tester = self.model_tester
        if tester.sequence_classification_class is None:
            self.skipTest("the family has no sequence-classification head")
        for problem_type, make_labels in (
            (None, lambda c: ids_tensor([tester.batch_size], tester.type_sequence_label_size)),
            ("single_label_classification", lambda c: ids_tensor([tester.batch_size], c.num_labels)),
            ("multi_label_classification", lambda c: ids_tensor([tester.batch_size, c.num_labels], 2).float()),
        ):
            with self.subTest(problem_type=problem_type):
                self._check_classification_head(
                    tester.sequence_classification_class, problem_type, make_labels, (tester.batch_size, 3)
                )

    def test_token_classification_model(self):
        tester = self.model_tester
        if tester.token_classification_class is None:
            self.skipTest("the family has no token-classification head")
        self._check_classification_head(
            tester.token_classification_class,
            None,
            lambda c: ids_tensor([tester.batch_size, tester.seq_length], c.num_labels),
            (tester.batch_size, tester.seq_length, 3),
        )
